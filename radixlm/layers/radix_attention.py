"""The attention layer models call: forwards q/k/v to the step's attention backend."""

from __future__ import annotations

import torch
from torch import nn

from radixlm.attention.forward_context import get_forward_batch


class RadixAttention(nn.Module):
    def __init__(self, num_heads: int, head_dim: int, scaling: float, num_kv_heads: int, layer_id: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.scaling = scaling
        self.num_kv_heads = num_kv_heads
        self.layer_id = layer_id

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        fb = get_forward_batch()
        return fb.attn_backend.forward(q, k, v, self, fb)
