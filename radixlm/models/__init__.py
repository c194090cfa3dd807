"""Model registry: HF architecture name -> radixlm model class (imported lazily)."""

from __future__ import annotations

import importlib
from typing import Dict, Tuple

_REGISTRY: Dict[str, Tuple[str, str]] = {
    "LlamaForCausalLM": ("radixlm.models.llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("radixlm.models.llama", "MistralForCausalLM"),
    "MixtralForCausalLM": ("radixlm.models.mixtral", "MixtralForCausalLM"),
    "Qwen2ForCausalLM": ("radixlm.models.llama", "Qwen2ForCausalLM"),
    "Qwen3ForCausalLM": ("radixlm.models.llama", "Qwen3ForCausalLM"),
    "Qwen3MoeForCausalLM": ("radixlm.models.qwen3_moe", "Qwen3MoeForCausalLM"),
}


def supported_architectures():
    return sorted(_REGISTRY)


def get_model_class(architecture: str):
    if architecture not in _REGISTRY:
        raise ValueError(f"Architecture {architecture!r} is not supported. Supported: {', '.join(supported_architectures())}")
    module, name = _REGISTRY[architecture]
    return getattr(importlib.import_module(module), name)
