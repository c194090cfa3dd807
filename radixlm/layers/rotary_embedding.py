"""Rotary position embedding (NeoX/HF "rotate half" layout) with Llama-3 and linear scaling.

Owns the cos/sin table for every position up to the context length; `forward(positions, q, k)`
rotates flattened per-token q and k. The table is built with HF transformers' arithmetic so that
float32 checkpoints match it. `forward_native` is the torch reference; on CUDA, `forward` runs the
fused Triton kernel of `radixlm.layers.triton_ops` (q and k in one launch, read in place from the
qkv split), unless built with `fused=False` or fused kernels are switched off
(RADIXLM_DISABLE_FUSED_KERNELS=1, see that module).
"""

from __future__ import annotations

import math
from typing import Any, Dict, Optional

import torch
from torch import nn

from radixlm.layers import triton_ops


def compute_inv_freq(head_dim: int, base: float, scaling: Optional[Dict[str, Any]]) -> torch.Tensor:
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return inv_freq / float(scaling["factor"])
    if rope_type == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_len = float(scaling["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled)
    raise NotImplementedError(f"rope_scaling type {rope_type!r} is not supported (supported: default, linear, llama3)")


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    d = x.shape[-1] // 2
    return torch.cat((-x[..., d:], x[..., :d]), dim=-1)


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_position: int, base: float, scaling: Optional[Dict[str, Any]] = None,
                 fused: bool = True):
        super().__init__()
        self.fused = fused
        self.head_dim = head_dim
        inv_freq = compute_inv_freq(head_dim, base, scaling)
        t = torch.arange(max_position, dtype=torch.int64).float()
        freqs = torch.outer(t, inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos_cache", emb.cos(), persistent=False)
        self.register_buffer("sin_cache", emb.sin(), persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        """q: [T, Hq, D], k: [T, Hk, D]; returns rotated copies."""
        if self.fused and triton_ops.use_fused(q) and k.dtype == q.dtype:
            return triton_ops.ops().rotary_embedding(positions, q, k, self.cos_cache, self.sin_cache)
        return self.forward_native(positions, q, k)

    def forward_native(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        """The torch reference: q: [T, Hq, D], k: [T, Hk, D]; returns rotated copies."""
        cos = self.cos_cache[positions].to(q.dtype).unsqueeze(1)
        sin = self.sin_cache[positions].to(q.dtype).unsqueeze(1)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        return q, k
