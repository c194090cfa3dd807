"""Linear layers shaped for tensor parallelism (world size 1 today).

Owns: `ColumnParallelLinear` (output dim split across ranks), `MergedColumnParallelLinear`
(gate/up packed), `QKVParallelLinear` (q/k/v packed), `RowParallelLinear` (input dim split).
Each parameter carries a `weight_loader(param, loaded, shard_id)` so the model loader can put
HF's separate q/k/v or gate/up tensors into the packed parameter without knowing its layout.
"""

from __future__ import annotations

from typing import List, Optional

import torch
from torch import nn

from radixlm.layers import cpu_linear
from radixlm.layers.parallel_state import get_tp_rank, get_tp_size


def _attach(param: nn.Parameter, loader) -> nn.Parameter:
    param.weight_loader = loader  # type: ignore[attr-defined]
    return param


def default_weight_loader(param: nn.Parameter, loaded: torch.Tensor) -> None:
    if param.shape != loaded.shape:
        raise ValueError(f"shape mismatch: parameter {tuple(param.shape)} vs checkpoint {tuple(loaded.shape)}")
    param.data.copy_(loaded)


class ColumnParallelLinear(nn.Module):
    """y = x W^T + b with W's output rows split over the tensor-parallel ranks."""

    def __init__(self, input_size: int, output_sizes: List[int], bias: bool = False,
                 params_dtype: Optional[torch.dtype] = None):
        super().__init__()
        tp = get_tp_size()
        for s in output_sizes:
            if s % tp:
                raise ValueError(f"output size {s} is not divisible by tp_size {tp}")
        self.input_size = input_size
        self.output_sizes = [s // tp for s in output_sizes]  # per-rank shard sizes
        out = sum(self.output_sizes)
        dtype = params_dtype or torch.get_default_dtype()
        self.weight = _attach(nn.Parameter(torch.empty(out, input_size, dtype=dtype), requires_grad=False),
                              self.weight_loader)
        self.bias = (_attach(nn.Parameter(torch.empty(out, dtype=dtype), requires_grad=False), self.weight_loader)
                     if bias else None)
        self.cpu_packed_weight: Optional[torch.Tensor] = None  # set by cpu_linear.prepack_model

    def _shard_offset(self, shard_id: Optional[int]) -> tuple:
        if shard_id is None:
            return 0, sum(self.output_sizes)
        return sum(self.output_sizes[:shard_id]), self.output_sizes[shard_id]

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: Optional[int] = None) -> None:
        offset, size = self._shard_offset(shard_id)
        full = loaded.shape[0] // get_tp_size()
        if full != size:
            raise ValueError(f"checkpoint shard has {loaded.shape[0]} rows, expected {size * get_tp_size()}")
        loaded = loaded.narrow(0, get_tp_rank() * size, size)
        param.data.narrow(0, offset, size).copy_(loaded)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cpu_linear.linear(x, self.weight, self.bias, self.cpu_packed_weight)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """gate_proj and up_proj packed into one matmul; shard ids 0 and 1."""


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v projections packed into one matmul; shard ids "q", "k", "v"."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool = False,
                 params_dtype: Optional[torch.dtype] = None):
        super().__init__(hidden_size, [num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim],
                         bias=bias, params_dtype=params_dtype)

    def weight_loader(self, param, loaded, shard_id=None):
        idx = {"q": 0, "k": 1, "v": 2}[shard_id] if shard_id is not None else None
        super().weight_loader(param, loaded, idx)


class RowParallelLinear(nn.Module):
    """y = x W^T + b with W's input columns split over the ranks (an all-reduce follows when tp > 1)."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False,
                 params_dtype: Optional[torch.dtype] = None):
        super().__init__()
        tp = get_tp_size()
        if input_size % tp:
            raise ValueError(f"input size {input_size} is not divisible by tp_size {tp}")
        self.input_size_per_rank = input_size // tp
        dtype = params_dtype or torch.get_default_dtype()
        self.weight = _attach(nn.Parameter(torch.empty(output_size, self.input_size_per_rank, dtype=dtype),
                                           requires_grad=False), self.weight_loader)
        self.bias = (_attach(nn.Parameter(torch.empty(output_size, dtype=dtype), requires_grad=False),
                             default_weight_loader) if bias else None)
        self.cpu_packed_weight: Optional[torch.Tensor] = None  # set by cpu_linear.prepack_model

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        size = self.input_size_per_rank
        param.data.copy_(loaded.narrow(1, get_tp_rank() * size, size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = cpu_linear.linear(x, self.weight, None, self.cpu_packed_weight)
        if get_tp_size() > 1:  # pragma: no cover - multi-rank path arrives with tensor parallelism
            torch.distributed.all_reduce(y)
        if self.bias is not None:
            y = y + self.bias
        return y
