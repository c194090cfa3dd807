"""SiLU-and-multiply: the gated MLP activation over a packed [gate, up] tensor.

`forward_native` is the torch reference; on CUDA, `forward` runs the fused Triton kernel of
`radixlm.layers.triton_ops` (one read of x, one write), unless built with `fused=False` or fused
kernels are switched off (RADIXLM_DISABLE_FUSED_KERNELS=1, see that module).
"""

import torch
import torch.nn.functional as F
from torch import nn

from radixlm.layers import triton_ops


class SiluAndMul(nn.Module):
    def __init__(self, fused: bool = True):
        super().__init__()
        self.fused = fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused and triton_ops.use_fused(x):
            return triton_ops.ops().silu_and_mul(x)
        return self.forward_native(x)

    def forward_native(self, x: torch.Tensor) -> torch.Tensor:
        d = x.shape[-1] // 2
        return F.silu(x[..., :d]) * x[..., d:]
