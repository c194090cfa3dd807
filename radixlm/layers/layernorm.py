"""RMSNorm, with the fused residual-add form used between decoder layers.

Computes in float32 and casts back, in the same order as HF transformers, so float32 checkpoints
give bit-comparable activations. `forward_native` is that torch code and the reference; on CUDA,
`forward` runs the fused Triton kernels of `radixlm.layers.triton_ops` instead (one pass for the
residual add and the norm), unless the layer was built with `fused=False` or fused kernels are
switched off (RADIXLM_DISABLE_FUSED_KERNELS=1, see that module).
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
from torch import nn

from radixlm.layers import triton_ops


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6, params_dtype: Optional[torch.dtype] = None,
                 fused: bool = True):
        super().__init__()
        self.fused = fused
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=params_dtype or torch.get_default_dtype()),
                                   requires_grad=False)
        self.eps = eps

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.to(torch.float32)
        var = x.pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(var + self.eps)).to(dtype)

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None
                ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        if self.fused and triton_ops.use_fused(x) and (residual is None or residual.dtype == x.dtype):
            if residual is None:
                return triton_ops.ops().rmsnorm(x, self.weight, self.eps)
            return triton_ops.ops().fused_add_rmsnorm(x, residual, self.weight, self.eps)
        return self.forward_native(x, residual)

    def forward_native(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None
                       ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        if residual is None:
            return self._norm(x)
        x = x + residual
        return self._norm(x), x
