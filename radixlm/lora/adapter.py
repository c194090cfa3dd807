"""A PEFT LoRA adapter read from disk into host memory, checked against the base model.

Owns the adapter's on-disk format (PEFT's `adapter_config.json` + `adapter_model.safetensors`), the
name mapping from PEFT tensors (`...layers.{i}.self_attn.q_proj.lora_A.weight`) to (layer, module),
and every check that makes a bad adapter a clear `LoRAError` (a 400 at the server) instead of a crash:
unreadable or corrupt files, rank above `--max-lora-rank`, target modules the model lacks or that
`--lora-target-modules` leaves out, shapes that do not match the model, unsupported PEFT options.
The scaling (`lora_alpha / r`, or `/ sqrt(r)` with rsLoRA) is folded into B at load time.
It never touches the device: the slot pool (lora/manager.py) copies the weights there.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Set, Tuple

import torch

# HF module names a LoRA can target, and the packed layer each lives in (piece index inside it)
MODULE_PACKING: Dict[str, Tuple[str, int]] = {
    "q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2), "o_proj": ("o_proj", 0),
    "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1), "down_proj": ("down_proj", 0),
}
PACKED_PIECES: Dict[str, List[str]] = {
    "qkv_proj": ["q_proj", "k_proj", "v_proj"], "o_proj": ["o_proj"],
    "gate_up_proj": ["gate_proj", "up_proj"], "down_proj": ["down_proj"],
}
TARGET_CHOICES = tuple(MODULE_PACKING) + ("qkv_proj", "gate_up_proj", "all")
_KEY = re.compile(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.default)?\.weight$")


class LoRAError(ValueError):
    """An adapter that cannot be used (bad files, rank, targets, shapes): a 400 naming the problem."""


def expand_target_modules(names: Iterable[str]) -> Set[str]:
    """HF module names for --lora-target-modules values (packed names and `all` expand)."""
    out: Set[str] = set()
    for n in names:
        if n == "all":
            out |= set(MODULE_PACKING)
        elif n in PACKED_PIECES:
            out |= set(PACKED_PIECES[n])
        elif n in MODULE_PACKING:
            out.add(n)
        else:
            raise LoRAError(f"target module {n!r} is not one of {', '.join(TARGET_CHOICES)}")
    return out


def module_shapes(model_config) -> Dict[str, Tuple[int, int]]:
    """(in_features, out_features) of every targetable module of a Llama-family model."""
    h, d = model_config.hidden_size, model_config.head_dim
    q, kv, inter = model_config.num_heads * d, model_config.num_kv_heads * d, model_config.get("intermediate_size")
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}


@dataclass
class LoRAAdapter:
    """One adapter in host memory: per (layer, module) A [r, in] and scaled B [out, r]."""

    name: str
    path: str
    rank: int
    scaling: float
    target_modules: Set[str]
    weights: Dict[Tuple[int, str], Tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    uid: int = 0  # distinct for every load: the radix-cache namespace of its KV

    @property
    def nbytes(self) -> int:
        return sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in self.weights.values())


def _read_config(path: str) -> dict:
    cfg_path = os.path.join(path, "adapter_config.json")
    if not os.path.isfile(cfg_path):
        raise LoRAError(f"adapter {path!r}: no adapter_config.json (a PEFT LoRA adapter directory is expected)")
    try:
        with open(cfg_path) as f:
            cfg = json.load(f)
    except (OSError, ValueError) as e:
        raise LoRAError(f"adapter {path!r}: adapter_config.json is not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise LoRAError(f"adapter {path!r}: adapter_config.json is not a JSON object")
    if cfg.get("peft_type", "LORA") != "LORA":
        raise LoRAError(f"adapter {path!r}: peft_type {cfg.get('peft_type')!r} is not LORA")
    for key, ok in (("use_dora", False), ("fan_in_fan_out", False)):
        if cfg.get(key) not in (None, ok):
            raise LoRAError(f"adapter {path!r}: {key}={cfg[key]!r} is not supported")
    if cfg.get("bias", "none") != "none":
        raise LoRAError(f"adapter {path!r}: bias={cfg['bias']!r} is not supported (only 'none')")
    for key in ("rank_pattern", "alpha_pattern", "modules_to_save", "layers_to_transform", "lora_bias",
                "target_parameters", "layer_replication", "trainable_token_indices"):
        if cfg.get(key):
            raise LoRAError(f"adapter {path!r}: {key} is not supported")
    r = cfg.get("r")
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise LoRAError(f"adapter {path!r}: r must be a positive integer, got {r!r}")
    return cfg


def _read_tensors(path: str) -> Dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    st = os.path.join(path, "adapter_model.safetensors")
    if not os.path.isfile(st):
        raise LoRAError(f"adapter {path!r}: no adapter_model.safetensors")
    try:
        return load_file(st, device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise LoRAError(f"adapter {path!r}: adapter_model.safetensors is corrupt or unreadable ({e})") from None


def load_adapter(name: str, path: str, model_config, max_rank: int, allowed_modules: Set[str],
                 uid: int = 0) -> LoRAAdapter:
    """Reads and checks an adapter; raises LoRAError naming the problem."""
    if not isinstance(path, str) or not os.path.isdir(path):
        raise LoRAError(f"adapter {name!r}: lora_path {path!r} is not a directory")
    cfg = _read_config(path)
    rank = cfg["r"]
    if rank > max_rank:
        raise LoRAError(f"adapter {name!r}: rank {rank} is above --max-lora-rank {max_rank}")
    alpha = cfg.get("lora_alpha", rank)
    scaling = alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank
    shapes = module_shapes(model_config)
    raw: Dict[Tuple[int, str], Dict[str, torch.Tensor]] = {}
    for key, t in _read_tensors(path).items():
        m = _KEY.search(key)
        if m is None:
            raise LoRAError(f"adapter {name!r}: tensor {key!r} is not a LoRA weight of a decoder layer "
                            "(embedding / lm_head adapters are not supported)")
        layer, module, ab = int(m.group(1)), m.group(2), m.group(3)
        if module not in shapes:
            raise LoRAError(f"adapter {name!r}: target module {module!r} does not exist in this model "
                            f"(it has {', '.join(shapes)})")
        if layer >= model_config.num_layers:
            raise LoRAError(f"adapter {name!r}: layer {layer} does not exist (the model has "
                            f"{model_config.num_layers})")
        raw.setdefault((layer, module), {})[ab] = t
    targets = {mod for _, mod in raw}
    for mod in _config_targets(cfg):
        if mod not in shapes:
            raise LoRAError(f"adapter {name!r}: target module {mod!r} does not exist in this model "
                            f"(it has {', '.join(shapes)})")
    missing = sorted(targets - allowed_modules)
    if missing:
        raise LoRAError(f"adapter {name!r}: target modules {', '.join(missing)} are not enabled "
                        f"(--lora-target-modules allows {', '.join(sorted(allowed_modules))})")
    if not raw:
        raise LoRAError(f"adapter {name!r}: adapter_model.safetensors holds no LoRA weights")
    adapter = LoRAAdapter(name, path, rank, scaling, targets, uid=uid)
    for (layer, module), ab in raw.items():
        if set(ab) != {"A", "B"}:
            raise LoRAError(f"adapter {name!r}: layer {layer} {module} lacks lora_{'B' if 'A' in ab else 'A'}")
        a, b = ab["A"].float(), ab["B"].float()
        fan_in, fan_out = shapes[module]
        if a.shape != (rank, fan_in) or b.shape != (fan_out, rank):
            raise LoRAError(f"adapter {name!r}: layer {layer} {module} has shapes A {tuple(a.shape)}, B "
                            f"{tuple(b.shape)}; expected A ({rank}, {fan_in}), B ({fan_out}, {rank})")
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise LoRAError(f"adapter {name!r}: layer {layer} {module} has non-finite weights")
        adapter.weights[(layer, module)] = (a.contiguous(), (b * scaling).contiguous())
    return adapter


def _config_targets(cfg: dict) -> List[str]:
    t = cfg.get("target_modules")
    if isinstance(t, list):
        return [str(x).rsplit(".", 1)[-1] for x in t]
    return []  # a regex (or none): the tensors say which modules it targets
