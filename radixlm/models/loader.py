"""Builds a model from a ModelConfig: constructs it in the target dtype on the target device and
fills it from the checkpoint's safetensors (single file or sharded with an index), or with seeded
random values for `load_format="dummy"` (real shapes, no weight file read).

Quantized checkpoints (ModelConfig.quant_config, layers/quantization): the model is built inside
`quantization_scope`, so its linear layers hold FP8 weights; fp8 tensors and their `weight_scale_inv`
reach the layers' loaders in their own dtypes (every other tensor is cast to the model dtype).
A loader error names the checkpoint tensor it happened on.
"""

from __future__ import annotations

import glob
import json
import logging
import os
from typing import Iterator, List, Tuple

import torch
from torch import nn

from radixlm.layers.cpu_linear import prepack_model
from radixlm.layers.moe import configure_moe_runner
from radixlm.layers.quantization import drop_ignored_modules, quantization_scope
from radixlm.layers.quantization.fp8_utils import FP8_DTYPE, FP8_MAX
from radixlm.models import get_model_class
from radixlm.models.model_config import ModelConfig

logger = logging.getLogger(__name__)

LOAD_FORMATS = ("auto", "safetensors", "dummy")


def safetensors_files(model_path: str) -> List[str]:
    index = os.path.join(model_path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(model_path, n) for n in names]
    files = sorted(glob.glob(os.path.join(model_path, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {model_path!r} (use load_format='dummy' for random weights)")
    return files


def iterate_weights(model_path: str, show_progress: bool = False) -> Iterator[Tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    files = safetensors_files(model_path)
    it = files
    if show_progress:
        from tqdm import tqdm
        it = tqdm(files, desc="Loading safetensors shards", unit="shard")
    for path in it:
        with safe_open(path, framework="pt", device="cpu") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def init_dummy_weights(model: nn.Module, seed: int = 0, low: float = -1e-3, high: float = 1e-3) -> None:
    """Seeded uniform values drawn on each parameter's own device (an 8B model in seconds on a GPU)."""
    for i, (name, p) in enumerate(model.named_parameters()):
        if name.endswith("norm.weight"):
            p.data.fill_(1.0)
            continue
        if name.endswith("weight_scale_inv"):  # FP8: q uniform in +-448 times this scale = uniform(low, high)
            p.data.fill_(max(abs(low), abs(high)) / FP8_MAX)
            continue
        gen = torch.Generator(device=p.device).manual_seed(seed * 100003 + i)
        if p.dtype == FP8_DTYPE:
            p.data.copy_(torch.empty(p.shape, device=p.device).uniform_(-FP8_MAX, FP8_MAX, generator=gen))
            continue
        p.data.uniform_(low, high, generator=gen)


def _keeps_dtype(name: str, tensor: torch.Tensor) -> bool:
    """FP8 weights and their scales go to the layers as stored; the rest is cast to the model dtype."""
    return tensor.dtype == FP8_DTYPE or name.endswith("_scale_inv")


def _load_checkpoint(model: nn.Module, cfg: ModelConfig, show_progress: bool) -> None:
    current = {"name": None}

    def weights():
        for name, t in iterate_weights(cfg.model_path, show_progress):
            current["name"] = name
            yield name, (t if _keeps_dtype(name, t) else t.to(cfg.dtype))

    try:
        loaded = model.load_weights(weights())
    except ValueError as e:
        if current["name"] is None:
            raise
        raise ValueError(f"checkpoint {cfg.model_path!r}, tensor {current['name']!r}: {e}") from None
    # --quantization fp8: scales are computed from the weights, not read
    expected = {n for n, p in model.named_parameters() if not getattr(p, "filled_by_weight", False)}
    missing = sorted(expected - loaded)
    if missing:
        raise ValueError(f"checkpoint {cfg.model_path!r} lacks weights for: {', '.join(missing[:8])}")


def load_model(cfg: ModelConfig, device: str, load_format: str = "auto", seed: int = 0,
               show_progress: bool = False, moe_runner_backend: str = "auto") -> nn.Module:
    """`moe_runner_backend`: the expert runner of MoE layers (radixlm/layers/moe/; ignored by dense models)."""
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format {load_format!r} is not supported. Valid: {', '.join(LOAD_FORMATS)}")
    cls = get_model_class(cfg.architecture)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(cfg.dtype)
    try:
        with torch.device(device), quantization_scope(cfg.quant_config):
            model = cls(cfg)
            if cfg.quant_config is not None:
                drop_ignored_modules(model, cfg.quant_config)
    finally:
        torch.set_default_dtype(prev)
    if load_format == "dummy":
        init_dummy_weights(model, seed)
    else:
        _load_checkpoint(model, cfg, show_progress)
    for module in model.modules():
        if getattr(module, "quant_method", None) is not None:
            module.quant_method.process_weights_after_loading(module)
    configure_moe_runner(model, moe_runner_backend, device)
    if torch.device(device).type == "cpu":
        prepack_model(model)  # oneDNN layout for the CPU matmuls (radixlm/layers/cpu_linear.py)
    return model.eval()
