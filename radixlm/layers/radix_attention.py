"""The attention layer models call: forwards q/k/v to the step's attention backend."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from radixlm.attention.forward_context import get_forward_batch


class RadixAttention(nn.Module):
    def __init__(self, num_heads: int, head_dim: int, scaling: float, num_kv_heads: int, layer_id: int,
                 sliding_window: Optional[int] = None):
        super().__init__()
        # a query at position p attends to keys at positions (p - sliding_window, p]; None: all of [0, p]
        self.sliding_window = sliding_window if sliding_window and sliding_window > 0 else None
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.scaling = scaling
        self.num_kv_heads = num_kv_heads
        self.layer_id = layer_id

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        fb = get_forward_batch()
        return fb.attn_backend.forward(q, k, v, self, fb)
