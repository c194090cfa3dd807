"""Weight quantization: which method a checkpoint uses, and the scope in which layers are built with it.

Owns `parse_quant_config` (config.json's `quantization_config` and the `--quantization` flag -> an
`Fp8Config` or None, one clear error line for anything unsupported) and `quantization_scope`: the
loader builds the model inside it, and each linear layer asks `current_linear_method()` at
construction whether its weight is FP8 (so the model classes need no quantization argument). After
construction `drop_ignored_modules` turns the modules a checkpoint keeps in bf16
(`modules_to_not_convert` / `ignored_layers`) back into plain layers. Only block-quantized FP8 is
supported (fp8.py); MoE experts in FP8 are not (their models are refused at load).
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Dict, Iterator, Optional, Sequence, Tuple

from radixlm.layers.quantization.fp8 import Fp8Config, Fp8LinearMethod

QUANTIZATION_METHODS = ("fp8",)

_CURRENT: contextvars.ContextVar[Optional[Fp8Config]] = contextvars.ContextVar("radixlm_quant_config",
                                                                               default=None)


def is_moe_architecture(architecture: str) -> bool:
    return "Moe" in architecture or "MoE" in architecture or "Mixtral" in architecture


def parse_quant_config(hf_config: Dict[str, Any], architecture: str,
                       quantization: Optional[str] = None) -> Optional[Fp8Config]:
    """The quantization the model loads with: the checkpoint's `quantization_config` if it has one
    (then `quantization`, when given, must name the same method), else `quantization` applied while
    loading (None: unquantized)."""
    if quantization is not None and quantization not in QUANTIZATION_METHODS:
        raise ValueError(f"quantization: {quantization!r} is not supported. Valid: {', '.join(QUANTIZATION_METHODS)}")
    qc = hf_config.get("quantization_config")
    config = None
    if qc:
        if not isinstance(qc, dict):
            raise ValueError(f"config.json: quantization_config must be an object, got {type(qc).__name__}")
        method = qc.get("quant_method")
        if method not in QUANTIZATION_METHODS:
            raise ValueError(f"config.json: quantization_config.quant_method {method!r} is not supported "
                             f"(radixlm loads: {', '.join(QUANTIZATION_METHODS)})")
        if quantization is not None and quantization != method:
            raise ValueError(f"quantization: {quantization!r} given, but the checkpoint is already quantized "
                             f"with {method!r}")
        config = Fp8Config.from_hf(qc)
    elif quantization == "fp8":
        config = Fp8Config(is_checkpoint_fp8_serialized=False)
    if config is not None and is_moe_architecture(architecture):
        raise ValueError(f"FP8 quantization of MoE models ({architecture}) is not supported yet: radixlm's FP8 "
                         "covers dense linear layers only, not MoE experts")
    return config


@contextlib.contextmanager
def quantization_scope(config: Optional[Fp8Config]) -> Iterator[None]:
    """Linear layers built inside take `config`'s method (None: plain weights)."""
    token = _CURRENT.set(config)
    try:
        yield
    finally:
        _CURRENT.reset(token)


def current_linear_method() -> Optional[Fp8LinearMethod]:
    config = _CURRENT.get()
    return None if config is None else Fp8LinearMethod(config)


def hf_module_names(name: str, stacked_params_mapping: Sequence[Tuple[str, str, Any]]) -> list:
    """The HF module names a radixlm module loads from: a packed `qkv_proj` from q/k/v_proj."""
    names = [name.replace(packed, hf) for packed, hf, _ in stacked_params_mapping if name.endswith(packed)]
    return names or [name]


def drop_ignored_modules(model, config: Fp8Config) -> int:
    """Turns the FP8 linear layers whose HF names the config ignores into plain layers (before
    loading); returns how many. A packed layer must have all or none of its pieces ignored."""
    if not config.ignored_modules:
        return 0
    mapping = getattr(model, "stacked_params_mapping", [])
    n = 0
    for name, module in model.named_modules():
        if getattr(module, "quant_method", None) is None:
            continue
        pieces = hf_module_names(name, mapping)
        ignored = [config.is_ignored(p) for p in pieces]
        if any(ignored) and not all(ignored):
            raise ValueError(f"quantization_config ignores only some of {', '.join(pieces)}, which radixlm packs "
                             f"into one layer ({name}); it needs all or none of them in FP8")
        if all(ignored):
            module.drop_quantization()
            n += 1
    return n


__all__ = ["QUANTIZATION_METHODS", "Fp8Config", "Fp8LinearMethod", "current_linear_method", "drop_ignored_modules",
           "is_moe_architecture", "parse_quant_config", "quantization_scope"]
