"""Linear layers split across the tensor-parallel ranks (SGLang's / vLLM's shapes).

Owns: `ColumnParallelLinear` (output dim split across ranks), `MergedColumnParallelLinear`
(gate/up packed), `QKVParallelLinear` (q/k/v packed; KV heads split, or replicated when there are
fewer KV heads than ranks), `RowParallelLinear` (input dim split; its partial sums are all-reduced).
Each parameter carries a `weight_loader(param, loaded, shard_id)` that takes the full checkpoint
tensor and copies this rank's shard, so the model loader puts HF's separate q/k/v or gate/up
tensors into the packed parameter without knowing its layout or the rank.

Quantization: a layer built inside `quantization_scope` (layers/quantization) takes that method's
weight (block-FP8: `weight` in float8_e4m3fn plus `weight_scale_inv`); its loaders and forward are
then the method's, and `drop_quantization()` turns it back into a plain layer (modules a checkpoint
keeps in bf16).
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import nn

from radixlm.distributed.parallel_state import get_tp_rank, get_tp_size, tp_all_reduce
from radixlm.layers import cpu_linear
from radixlm.layers.quantization import current_linear_method


def _attach(param: nn.Parameter, loader) -> nn.Parameter:
    param.weight_loader = loader  # type: ignore[attr-defined]
    return param


def default_weight_loader(param: nn.Parameter, loaded: torch.Tensor) -> None:
    if param.shape != loaded.shape:
        raise ValueError(f"shape mismatch: parameter {tuple(param.shape)} vs checkpoint {tuple(loaded.shape)}")
    param.data.copy_(loaded)


def kv_head_sharding(num_heads: int, num_kv_heads: int, tp: int, rank: int) -> Tuple[int, int]:
    """(KV heads on this rank, index of this rank's KV shard) as SGLang does it: split when there are
    at least tp KV heads, else each rank holds the one KV head its query heads use (replicated)."""
    if num_heads % tp:
        raise ValueError(f"tp_size {tp} does not divide num_attention_heads {num_heads}")
    if num_kv_heads >= tp:
        if num_kv_heads % tp:
            raise ValueError(f"tp_size {tp} does not divide num_key_value_heads {num_kv_heads}")
        return num_kv_heads // tp, rank
    if tp % num_kv_heads:
        raise ValueError(f"num_key_value_heads {num_kv_heads} does not divide tp_size {tp} "
                         "(fewer KV heads than ranks are replicated, which needs tp_size to be a multiple)")
    return 1, rank // (tp // num_kv_heads)


class _LinearBase(nn.Module):
    """The weight of a linear layer: plain [rows, cols] in params_dtype, or the current quantization
    method's parameters (`quant_method` not None)."""

    def _create_weight(self, piece_rows: List[int], cols: int, dtype: torch.dtype) -> None:
        self.params_dtype = dtype
        self._piece_rows, self._cols = list(piece_rows), cols
        self.quant_method = current_linear_method()
        if self.quant_method is not None:
            self.quant_method.create_weights(self, piece_rows, cols)
        else:
            self.weight = _attach(nn.Parameter(torch.empty(sum(piece_rows), cols, dtype=dtype), requires_grad=False),
                                  self.weight_loader)

    def drop_quantization(self) -> None:
        """A plain weight in params_dtype instead of the quantized one (before loading)."""
        if self.quant_method is None:
            return
        device = self.weight.device
        self.quant_method.remove_weights(self)
        self.quant_method = None
        self.weight = _attach(nn.Parameter(torch.empty(sum(self._piece_rows), self._cols, dtype=self.params_dtype,
                                                       device=device), requires_grad=False), self.weight_loader)

    def _matmul(self, x: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        if self.quant_method is not None:
            return self.quant_method.apply(self, x, bias)
        return cpu_linear.linear(x, self.weight, bias, self.cpu_packed_weight, self.cpu_packed_key)


class ColumnParallelLinear(_LinearBase):
    """y = x W^T + b with W's output rows split over the tensor-parallel ranks. The packed pieces
    (`output_sizes`, full sizes) are each split evenly; `shards` overrides that with explicit
    (rows on this rank, shard index, number of shards) per piece (QKV's replicated KV heads)."""

    def __init__(self, input_size: int, output_sizes: List[int], bias: bool = False,
                 params_dtype: Optional[torch.dtype] = None,
                 shards: Optional[List[Tuple[int, int, int]]] = None):
        super().__init__()
        tp = get_tp_size()
        if shards is None:
            for s in output_sizes:
                if s % tp:
                    raise ValueError(f"output size {s} is not divisible by tp_size {tp}")
            shards = [(s // tp, get_tp_rank(), tp) for s in output_sizes]
        self.input_size = input_size
        self.shards = shards
        self.output_sizes = [size for size, _, _ in shards]  # per-rank shard sizes
        out = sum(self.output_sizes)
        dtype = params_dtype or torch.get_default_dtype()
        self._create_weight(self.output_sizes, input_size, dtype)
        self.bias = (_attach(nn.Parameter(torch.empty(out, dtype=dtype), requires_grad=False), self.weight_loader)
                     if bias else None)
        self.cpu_packed_weight: Optional[torch.Tensor] = None  # set by cpu_linear.prepack_model
        self.cpu_packed_key: Optional[int] = None

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: Optional[int] = None) -> None:
        if shard_id is None and len(self.shards) > 1:
            if get_tp_size() == 1 and (self.quant_method is None or param is self.bias):  # an already packed tensor
                default_weight_loader(param, loaded)
                return
            raise ValueError("a packed layer loads its pieces by shard id with tp_size > 1 or a quantized weight")
        shard_id = shard_id or 0
        if self.quant_method is not None and param is not self.bias:
            self.quant_method.load_column_piece(self, param, loaded, shard_id)
            return
        size, index, count = self.shards[shard_id]
        if loaded.shape[0] != size * count:
            raise ValueError(f"checkpoint shard has {loaded.shape[0]} rows, expected {size * count}")
        offset = sum(self.output_sizes[:shard_id])
        param.data.narrow(0, offset, size).copy_(loaded.narrow(0, index * size, size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._matmul(x, self.bias)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """gate_proj and up_proj packed into one matmul; shard ids 0 and 1."""


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v projections packed into one matmul; shard ids "q", "k", "v". This rank computes
    `num_heads_per_rank` query heads and `num_kv_heads_per_rank` KV heads."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool = False,
                 params_dtype: Optional[torch.dtype] = None):
        tp, rank = get_tp_size(), get_tp_rank()
        kv_per_rank, kv_index = kv_head_sharding(num_heads, num_kv_heads, tp, rank)
        kv_shards = num_kv_heads // kv_per_rank
        q = (num_heads // tp * head_dim, rank, tp)
        kv = (kv_per_rank * head_dim, kv_index, kv_shards)
        super().__init__(hidden_size, [], bias=bias, params_dtype=params_dtype, shards=[q, kv, kv])
        self.num_heads_per_rank = num_heads // tp
        self.num_kv_heads_per_rank = kv_per_rank

    def weight_loader(self, param, loaded, shard_id=None):
        idx = {"q": 0, "k": 1, "v": 2}[shard_id] if shard_id is not None else None
        super().weight_loader(param, loaded, idx)


class RowParallelLinear(_LinearBase):
    """y = x W^T + b with W's input columns split over the ranks; the partial products are summed
    by an all-reduce, then the bias (whole on every rank) is added once."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False,
                 params_dtype: Optional[torch.dtype] = None):
        super().__init__()
        tp = get_tp_size()
        if input_size % tp:
            raise ValueError(f"input size {input_size} is not divisible by tp_size {tp}")
        self.input_size_per_rank = input_size // tp
        dtype = params_dtype or torch.get_default_dtype()
        self._create_weight([output_size], self.input_size_per_rank, dtype)
        self.bias = (_attach(nn.Parameter(torch.empty(output_size, dtype=dtype), requires_grad=False),
                             default_weight_loader) if bias else None)
        self.cpu_packed_weight: Optional[torch.Tensor] = None  # set by cpu_linear.prepack_model
        self.cpu_packed_key: Optional[int] = None

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        if self.quant_method is not None:
            self.quant_method.load_row(self, param, loaded, get_tp_size(), get_tp_rank())
            return
        size = self.input_size_per_rank
        if loaded.shape[1] != size * get_tp_size() or loaded.shape[0] != param.shape[0]:
            raise ValueError(f"shape mismatch: checkpoint {tuple(loaded.shape)} vs parameter {tuple(param.shape)} "
                             f"x tp_size {get_tp_size()}")
        param.data.copy_(loaded.narrow(1, get_tp_rank() * size, size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = tp_all_reduce(self._matmul(x, None))
        if self.bias is not None:
            y = y + self.bias
        return y
