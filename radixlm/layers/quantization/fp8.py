"""Block-quantized FP8 linear layers: the checkpoint format of DeepSeek-V3 / Qwen3-FP8, and `--quantization fp8`.

Owns `Fp8Config` (parsed from config.json's `quantization_config`, or made by `--quantization fp8` for
a bf16/fp32 checkpoint) and `Fp8LinearMethod`, which the linear layers (layers/linear.py) use in place
of their plain weight: parameters `weight` [N, K] float8_e4m3fn and `weight_scale_inv`
[scale rows, ceil(K/bk)] float32 (real weight = weight * scale_inv per block, fp8_utils.py), plus a
buffer `fp8_row_index` [N] (each weight row's scale row: a packed layer stacks the scale rows of its
q/k/v or gate/up pieces, ceil(rows/bn) each, so pieces that are not block multiples stay exact).

Loading: the checkpoint tensors are full (unsharded); the loaders take this tensor-parallel rank's
rows (column-parallel) or columns (row-parallel) in whole blocks, and refuse with a clear error when
a rank's shard would start or end inside a block. A bf16/fp32 tensor arriving for an FP8 layer is
block-quantized here when the checkpoint is not FP8 (`--quantization fp8`), an error otherwise.

Forward: on CUDA with FP8 tensor cores (compute capability >= 8.9) the activations are quantized per
token and group of bk columns and the Triton block-scaled GEMM runs (fp8_kernel.py: W8A8, as the
format's "dynamic" activation scheme means). Elsewhere (the CPU, older GPUs) the reference path
dequantizes the weight in every forward and runs a plain matmul in the activations' dtype (W8A16):
by default the weights stay 1 byte per parameter in memory, which is what an FP8 checkpoint is for.
That costs speed on the CPU (torch's fp8 -> float conversion is slow: a 768 x 6144 layer took ~30 ms
per call vs ~0.6 ms for the prepacked bf16 one at 1 token, docs/benchmarks.md). With
RADIXLM_FP8_CPU_DEQUANT_CACHE=1 each CPU layer keeps a dequantized copy in the model dtype after
loading (as much memory as the bf16 model, plus oneDNN's packed copy) and runs the plain prepacked
matmul on it: same values, bf16 speed. Without the flag FP8 layers are never prepacked for oneDNN
(layers/cpu_linear.py skips them).
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from radixlm.layers import cpu_linear
from radixlm.layers.quantization import fp8_utils
from radixlm.layers.quantization.fp8_utils import FP8_DTYPE, FP8_MAX, block_quantize, cdiv, scale_row_index

logger = logging.getLogger(__name__)

ENV_CPU_DEQUANT_CACHE = "RADIXLM_FP8_CPU_DEQUANT_CACHE"  # 1: CPU layers keep a dequantized copy (speed)
SUPPORTED_FMTS = ("e4m3",)
SUPPORTED_ACTIVATION_SCHEMES = ("dynamic",)
DEFAULT_BLOCK = (128, 128)


@dataclass(frozen=True)
class Fp8Config:
    """`is_checkpoint_fp8_serialized`: the checkpoint holds fp8 weights + weight_scale_inv (False:
    `--quantization fp8` quantizes a bf16/fp32 checkpoint while loading). `ignored_modules`: HF module
    names (or name parts) that stay unquantized (modules_to_not_convert / ignored_layers)."""

    weight_block_size: Tuple[int, int] = DEFAULT_BLOCK
    is_checkpoint_fp8_serialized: bool = True
    activation_scheme: str = "dynamic"
    ignored_modules: Tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self):
        bs = self.weight_block_size
        if len(bs) != 2 or not all(isinstance(b, int) and b > 0 for b in bs):
            raise ValueError(f"quantization_config.weight_block_size {list(bs)} must be two positive integers")

    @classmethod
    def from_hf(cls, qc: Dict[str, Any]) -> "Fp8Config":
        fmt = qc.get("fmt", "e4m3")
        if fmt not in SUPPORTED_FMTS:
            raise ValueError(f"quantization_config: fp8 fmt {fmt!r} is not supported (supported: "
                             f"{', '.join(SUPPORTED_FMTS)})")
        scheme = qc.get("activation_scheme", "dynamic")
        if scheme not in SUPPORTED_ACTIVATION_SCHEMES:
            raise ValueError(f"quantization_config: fp8 activation_scheme {scheme!r} is not supported (supported: "
                             f"{', '.join(SUPPORTED_ACTIVATION_SCHEMES)})")
        block = qc.get("weight_block_size")
        if block is None:
            raise ValueError("quantization_config: fp8 without weight_block_size (per-tensor scales) is not "
                             "supported; radixlm loads block-quantized FP8 checkpoints")
        if not isinstance(block, (list, tuple)):
            raise ValueError(f"quantization_config.weight_block_size {block!r} must be a list of two integers")
        ignored = tuple(qc.get("modules_to_not_convert") or ()) + tuple(qc.get("ignored_layers") or ())
        return cls(tuple(block), True, scheme, ignored)

    def is_ignored(self, hf_module_name: str) -> bool:
        """HF's rule: a module stays unquantized when an entry of the list is part of its name."""
        return any(entry and entry in hf_module_name for entry in self.ignored_modules)


@functools.lru_cache(maxsize=None)
def fp8_kernel_usable(device_index: int, block_k: int) -> bool:
    """Triton is importable, this GPU has FP8 tensor cores (sm_89 / sm_90 and newer) and the kernel
    takes this block width (fp8_kernel.kernel_supports_block_k)."""
    if torch.cuda.get_device_capability(device_index) < (8, 9):
        return False
    try:
        from radixlm.layers.quantization.fp8_kernel import kernel_supports_block_k
    except ImportError:
        return False
    return kernel_supports_block_k(block_k)


class Fp8LinearMethod:
    """Creates, loads and applies a linear layer's block-FP8 weight (see the module docstring). The
    layer provides `weight_loader` (attached to the parameters) and `params_dtype`."""

    def __init__(self, config: Fp8Config):
        self.config = config
        self.block = config.weight_block_size

    # ------------------------------------------------------------------ parameters
    def create_weights(self, layer: nn.Module, piece_rows: Sequence[int], input_size: int) -> None:
        bn, bk = self.block
        rows = sum(piece_rows)
        layer.weight = nn.Parameter(torch.empty(rows, input_size, dtype=FP8_DTYPE), requires_grad=False)
        scale_rows = sum(cdiv(r, bn) for r in piece_rows)
        layer.weight_scale_inv = nn.Parameter(torch.ones(scale_rows, cdiv(input_size, bk), dtype=torch.float32),
                                              requires_grad=False)
        for p in (layer.weight, layer.weight_scale_inv):
            p.weight_loader = layer.weight_loader  # type: ignore[attr-defined]
        # --quantization fp8: the scales are computed from the weight, not read from the checkpoint
        layer.weight_scale_inv.filled_by_weight = not self.config.is_checkpoint_fp8_serialized
        layer.register_buffer("fp8_row_index", scale_row_index(piece_rows, bn), persistent=False)
        # every piece a whole number of blocks: row r's scale row is r // bn (the fast dequantize path)
        layer.fp8_rows_regular = all(r % bn == 0 for r in piece_rows)
        layer.fp8_dequant_cache = None  # set after loading with RADIXLM_FP8_CPU_DEQUANT_CACHE=1 on the CPU

    @staticmethod
    def remove_weights(layer: nn.Module) -> None:
        del layer.weight, layer.weight_scale_inv, layer.fp8_row_index, layer.fp8_rows_regular
        del layer.fp8_dequant_cache

    # ------------------------------------------------------------------ loading
    def _check_aligned(self, layer: nn.Module, dim: str, size: int, count: int, block: int) -> None:
        if count > 1 and size % block:
            raise ValueError(f"FP8 {type(layer).__name__}: each of the {count} tensor-parallel shards holds "
                             f"{size} {dim}, not a multiple of the {block}-wide quantization block: the shard "
                             f"boundaries fall inside blocks (use a tp_size whose shards are block-aligned)")

    def _check_scale(self, loaded: torch.Tensor, want: Tuple[int, int], weight_shape: Tuple[int, int]) -> None:
        if tuple(loaded.shape) != want:
            raise ValueError(f"weight_scale_inv has shape {tuple(loaded.shape)}, expected {want} for a weight of "
                             f"shape {weight_shape} with weight_block_size {list(self.block)} (ceil(rows/"
                             f"{self.block[0]}), ceil(cols/{self.block[1]}))")
        if not loaded.is_floating_point() or loaded.dtype == FP8_DTYPE:
            raise ValueError(f"weight_scale_inv has dtype {loaded.dtype}, expected float32 (or bf16/fp16)")
        if not torch.isfinite(loaded).all():
            raise ValueError("weight_scale_inv holds non-finite values (inf/nan): the checkpoint is corrupt")

    def _quantized(self, layer: nn.Module, shard: torch.Tensor) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """None for an fp8 tensor of an FP8 checkpoint; (q, scale_inv) for a float tensor under
        --quantization fp8; an error for anything else."""
        serialized = self.config.is_checkpoint_fp8_serialized
        if shard.dtype == FP8_DTYPE:
            if not serialized:
                raise ValueError("checkpoint weight is float8_e4m3fn but config.json has no fp8 "
                                 "quantization_config (its weight_scale_inv could not be placed)")
            return None
        if serialized or not shard.is_floating_point():
            raise ValueError(f"checkpoint weight has dtype {shard.dtype}, but quantization_config (fp8) expects "
                             "float8_e4m3fn; a module kept in higher precision must be listed in "
                             "modules_to_not_convert")
        return block_quantize(shard, self.block)

    def load_column_piece(self, layer: nn.Module, param: nn.Parameter, loaded: torch.Tensor, piece: int) -> None:
        """Column-parallel: this rank's rows of piece `piece` (q/k/v or gate/up; 0 when unpacked)."""
        bn, bk = self.block
        size, index, count = layer.shards[piece]
        full, k = size * count, layer.weight.shape[1]
        row_off = sum(layer.output_sizes[:piece])
        srow_off = sum(cdiv(s, bn) for s in layer.output_sizes[:piece])
        if param is layer.weight:
            if tuple(loaded.shape) != (full, k):
                raise ValueError(f"checkpoint weight has shape {tuple(loaded.shape)}, expected {(full, k)}")
            shard = loaded.narrow(0, index * size, size)
            q = self._quantized(layer, shard)
            if q is None:
                self._check_aligned(layer, "output rows", size, count, bn)
                layer.weight.data.narrow(0, row_off, size).copy_(shard)
            else:
                layer.weight.data.narrow(0, row_off, size).copy_(q[0])
                layer.weight_scale_inv.data.narrow(0, srow_off, cdiv(size, bn)).copy_(q[1])
        elif param is layer.weight_scale_inv:
            self._check_scale(loaded, (cdiv(full, bn), cdiv(k, bk)), (full, k))
            self._check_aligned(layer, "output rows", size, count, bn)
            rows = cdiv(size, bn)
            layer.weight_scale_inv.data.narrow(0, srow_off, rows).copy_(loaded.narrow(0, index * size // bn, rows))
        else:
            raise AssertionError("unknown FP8 parameter")

    def load_row(self, layer: nn.Module, param: nn.Parameter, loaded: torch.Tensor, tp: int, rank: int) -> None:
        """Row-parallel: this rank's input columns (in whole blocks of bk)."""
        bn, bk = self.block
        n, kp = layer.weight.shape
        full = kp * tp
        if param is layer.weight:
            if tuple(loaded.shape) != (n, full):
                raise ValueError(f"checkpoint weight has shape {tuple(loaded.shape)}, expected {(n, full)}")
            shard = loaded.narrow(1, rank * kp, kp)
            q = self._quantized(layer, shard)
            if q is None:
                self._check_aligned(layer, "input columns", kp, tp, bk)
                layer.weight.data.copy_(shard)
            else:
                layer.weight.data.copy_(q[0])
                layer.weight_scale_inv.data.copy_(q[1])
        elif param is layer.weight_scale_inv:
            self._check_scale(loaded, (cdiv(n, bn), cdiv(full, bk)), (n, full))
            self._check_aligned(layer, "input columns", kp, tp, bk)
            cols = cdiv(kp, bk)
            layer.weight_scale_inv.data.copy_(loaded.narrow(1, rank * kp // bk, cols))
        else:
            raise AssertionError("unknown FP8 parameter")

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        """RADIXLM_FP8_CPU_DEQUANT_CACHE=1 on the CPU: keep the dequantized weight (the model dtype)."""
        if layer.weight.device.type == "cpu" and os.environ.get(ENV_CPU_DEQUANT_CACHE, "0") not in ("", "0"):
            layer.fp8_dequant_cache = self.dequantized_weight(layer, layer.params_dtype)

    # ------------------------------------------------------------------ forward
    def dequantized_weight(self, layer: nn.Module, dtype: torch.dtype) -> torch.Tensor:
        rows = None if layer.fp8_rows_regular else layer.fp8_row_index
        return fp8_utils.block_dequantize(layer.weight, layer.weight_scale_inv, self.block, dtype, rows)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        if x.is_cuda and fp8_kernel_usable(x.device.index if x.device.index is not None else 0, self.block[1]):
            from radixlm.layers.quantization.fp8_kernel import fp8_block_linear

            y = fp8_block_linear(x, layer.weight, layer.weight_scale_inv, layer.fp8_row_index, self.block[1])
            return y if bias is None else y + bias
        cache = layer.fp8_dequant_cache
        if cache is not None and cache.dtype == x.dtype:
            return cpu_linear.linear(x, cache, bias, layer.cpu_packed_weight)
        return F.linear(x, self.dequantized_weight(layer, x.dtype), bias)


def weight_memory_bytes(model: nn.Module) -> Dict[str, int]:
    """Bytes of the model's parameters by dtype name (fp8 weights, their scales, the rest)."""
    out: Dict[str, int] = {}
    for p in model.parameters():
        key = str(p.dtype).replace("torch.", "")
        out[key] = out.get(key, 0) + p.numel() * p.element_size()
    return out


__all__: List[str] = ["Fp8Config", "Fp8LinearMethod", "FP8_MAX", "fp8_kernel_usable", "weight_memory_bytes"]
