"""ModelConfig: the facts about a checkpoint that the engine needs, read from its config.json
(and generation_config.json) without importing transformers.

Owns architecture name, shapes, rope settings, dtype, context length, EOS ids and the weight
quantization (`quant_config`: the checkpoint's quantization_config, or `--quantization`; parsed and
checked by radixlm/layers/quantization).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch

from radixlm.layers.quantization import parse_quant_config

_DTYPES = {"float32": torch.float32, "float": torch.float32, "float16": torch.float16, "half": torch.float16,
           "bfloat16": torch.bfloat16}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in _DTYPES:
        raise ValueError(f"dtype {name!r} is not supported. Valid: auto, {', '.join(sorted(_DTYPES))}")
    return _DTYPES[name]


# generation_config.json fields that are request sampling defaults (SGLang's --sampling-defaults model)
SAMPLING_DEFAULT_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def auto_dtype(cfg: Dict[str, Any], device: Optional[str] = None) -> torch.dtype:
    """dtype `auto`: the checkpoint's torch_dtype (float32 when it names none), except that a float32
    checkpoint runs in bfloat16 on CUDA. `device` None: CUDA when available."""
    name = cfg.get("torch_dtype") or cfg.get("dtype") or "float32"
    try:
        torch_dtype = parse_dtype(name)
    except ValueError:  # e.g. an FP8 checkpoint's "float8_e4m3fn": activations in bfloat16
        torch_dtype = torch.bfloat16
    on_cuda = torch.cuda.is_available() if device in (None, "auto") else torch.device(device).type == "cuda"
    if torch_dtype == torch.float32 and on_cuda:
        torch_dtype = torch.bfloat16
    return torch_dtype


def read_sampling_defaults(model_path: str) -> Dict[str, Any]:
    """The request sampling defaults in the checkpoint's generation_config.json (only the fields it
    sets, as numbers; {} when there is no file). HF's top_k 0 (no top-k) becomes SGLang's -1."""
    path = os.path.join(model_path, "generation_config.json")
    if not os.path.isfile(path):
        return {}
    try:
        with open(path) as f:
            gen = json.load(f)
    except ValueError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(gen, dict):
        return {}
    out = {}
    for k in SAMPLING_DEFAULT_FIELDS:
        v = gen.get(k)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = int(v) if k == "top_k" else float(v)
    if out.get("top_k") == 0:  # HF: 0 disables top-k; SGLang: -1
        out["top_k"] = -1
    return out


@dataclass
class ModelConfig:
    model_path: str
    architecture: str
    hf_config: Dict[str, Any]
    dtype: torch.dtype
    context_len: int
    eos_token_ids: List[int] = field(default_factory=list)
    quant_config: Optional[Any] = None  # layers.quantization.Fp8Config, or None: unquantized

    @classmethod
    def from_path(cls, model_path: str, dtype: str = "auto", context_length: Optional[int] = None,
                  overrides: Optional[Dict[str, Any]] = None, device: Optional[str] = None,
                  quantization: Optional[str] = None) -> "ModelConfig":
        """`device`: where the model will run (dtype auto turns a float32 checkpoint into bfloat16 on
        CUDA only); None = CUDA when available. A hub id is resolved first (radixlm/models/hub.py).
        `quantization`: SGLang's --quantization (None: the checkpoint's own quantization_config)."""
        if not os.path.isdir(model_path):
            from radixlm.models.hub import resolve_model_path

            model_path = resolve_model_path(model_path)
        path = os.path.join(model_path, "config.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"model_path {model_path!r} has no config.json (radixlm loads local HF directories)")
        with open(path) as f:
            cfg = json.load(f)
        cfg.update(overrides or {})
        archs = cfg.get("architectures") or []
        if not archs:
            raise ValueError(f"{path}: 'architectures' is missing")
        quant_config = parse_quant_config(cfg, archs[0], quantization)
        if dtype == "auto":
            torch_dtype = auto_dtype(cfg, device)
        else:
            torch_dtype = parse_dtype(dtype)
        max_pos = int(cfg.get("max_position_embeddings", 2048))
        if context_length is not None:
            if context_length < 1:
                raise ValueError("context_length must be at least 1")
            max_pos = context_length
        eos = cfg.get("eos_token_id")
        gen_path = os.path.join(model_path, "generation_config.json")
        if os.path.isfile(gen_path):
            with open(gen_path) as f:
                gen_eos = json.load(f).get("eos_token_id")
            eos = gen_eos if gen_eos is not None else eos
        eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
        return cls(model_path, archs[0], cfg, torch_dtype, max_pos, eos_ids, quant_config)

    # ------------------------------------------------------------------ shapes
    def get(self, key: str, default: Any = None) -> Any:
        return self.hf_config.get(key, default)

    @property
    def hidden_size(self) -> int:
        return self.hf_config["hidden_size"]

    @property
    def num_layers(self) -> int:
        return self.hf_config["num_hidden_layers"]

    @property
    def num_heads(self) -> int:
        return self.hf_config["num_attention_heads"]

    @property
    def num_kv_heads(self) -> int:
        return self.hf_config.get("num_key_value_heads") or self.num_heads

    @property
    def head_dim(self) -> int:
        return self.hf_config.get("head_dim") or self.hidden_size // self.num_heads

    @property
    def vocab_size(self) -> int:
        return self.hf_config["vocab_size"]

    @property
    def rope_theta(self) -> float:
        rp = self.hf_config.get("rope_parameters") or {}
        return float(self.hf_config.get("rope_theta") or rp.get("rope_theta") or 10000.0)

    @property
    def rope_scaling(self) -> Optional[Dict[str, Any]]:
        rs = self.hf_config.get("rope_scaling") or self.hf_config.get("rope_parameters")
        if not rs or rs.get("rope_type", rs.get("type", "default")) == "default":
            return None
        return rs

    def sliding_window_for_layer(self, layer_id: int) -> Optional[int]:
        """The attention window of layer `layer_id` (None: full causal attention), the way HF decides:
        `layer_types` when the config lists them; Qwen2/Qwen3: `sliding_window` only with
        `use_sliding_window`, on layers >= `max_window_layers`; Mistral (and others): every layer
        when `sliding_window` is set. A query at position p sees keys at positions (p - window, p]."""
        cfg = self.hf_config
        window = cfg.get("sliding_window")
        qwen = cfg.get("model_type") in ("qwen2", "qwen3") or self.architecture.startswith(("Qwen2", "Qwen3"))
        if qwen and not cfg.get("use_sliding_window", False):
            window = None
        if not window:
            return None
        layer_types = cfg.get("layer_types")
        if layer_types:
            return int(window) if layer_types[layer_id] == "sliding_attention" else None
        if qwen:
            mwl = cfg.get("max_window_layers")
            return int(window) if layer_id >= (28 if mwl is None else int(mwl)) else None
        return int(window)

    @property
    def num_experts(self) -> int:
        """Routed experts per MoE layer (Qwen3-MoE: num_experts; Mixtral, and transformers 5's
        spelling of both: num_local_experts); 0 for a dense model."""
        return int(self.hf_config.get("num_experts") or self.hf_config.get("num_local_experts") or 0)

    @property
    def moe_intermediate_size(self) -> Optional[int]:
        """One expert's intermediate size (Qwen3-MoE: moe_intermediate_size; Mixtral: intermediate_size)."""
        if not self.num_experts:
            return None
        return int(self.hf_config.get("moe_intermediate_size") or self.hf_config["intermediate_size"])

    @property
    def tie_word_embeddings(self) -> bool:
        return bool(self.hf_config.get("tie_word_embeddings", False))

    # ------------------------------------------------------------------ tensor parallelism
    def tensor_parallel_problems(self, tp_size: int) -> List[str]:
        """Why this model cannot be split over `tp_size` ranks (empty when it can): query heads and
        the MLP's intermediate size must divide; KV heads must divide, or (fewer KV heads than ranks,
        each then replicated) divide tp_size. The vocabulary is padded, so it needs nothing."""
        if tp_size == 1:
            return []
        problems = []
        if self.num_heads % tp_size:
            problems.append(f"num_attention_heads {self.num_heads} is not divisible by tp_size {tp_size}")
        kv = self.num_kv_heads
        if kv >= tp_size and kv % tp_size:
            problems.append(f"num_key_value_heads {kv} is not divisible by tp_size {tp_size}")
        if kv < tp_size and tp_size % kv:
            problems.append(f"tp_size {tp_size} is not a multiple of num_key_value_heads {kv} (needed to "
                            "replicate KV heads when there are fewer than ranks)")
        inter = self.get("intermediate_size")
        if inter is not None and inter % tp_size:
            problems.append(f"intermediate_size {inter} is not divisible by tp_size {tp_size}")
        moe_inter = self.moe_intermediate_size
        if moe_inter is not None and moe_inter != inter and moe_inter % tp_size:
            problems.append(f"moe_intermediate_size {moe_inter} is not divisible by tp_size {tp_size}")
        return problems

    def check_tensor_parallel(self, tp_size: int) -> None:
        """A clear ValueError naming tp_size when the model cannot be split over tp_size ranks."""
        problems = self.tensor_parallel_problems(tp_size)
        if problems:
            raise ValueError(f"tp_size {tp_size} cannot split {self.architecture} ({self.model_path}): "
                             + "; ".join(problems))
