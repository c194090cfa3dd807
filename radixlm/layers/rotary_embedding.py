"""Rotary position embedding (NeoX/HF "rotate half" layout) with linear, Llama-3 and YaRN scaling.

Owns the cos/sin table for every position up to the context length (YaRN's attention factor is
folded into it, as HF does); a model builds ONE table and shares it across its layers (at 128k
context a table per layer would cost GiBs taken from the KV pool). `forward(positions, q, k)`
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


def _yarn(head_dim: int, base: float, scaling: Dict[str, Any], max_position_embeddings: Optional[int]):
    """HF transformers' `_compute_yarn_parameters`: (inv_freq, attention_factor)."""
    orig = scaling["original_max_position_embeddings"]
    factor = scaling.get("factor")
    if factor is None:
        factor = max_position_embeddings / orig
    factor = float(factor)

    def get_mscale(scale, mscale=1.0):
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = float(get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim))
        else:
            attention_factor = get_mscale(factor)
    beta_fast = scaling.get("beta_fast") or 32
    beta_slow = scaling.get("beta_slow") or 1
    dim = head_dim

    def correction_dim(num_rotations):
        return (dim * math.log(orig / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation_factor = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation_factor) + (1.0 / pos_freqs) * extrapolation_factor
    return inv_freq, float(attention_factor)


def compute_inv_freq_and_scale(head_dim: int, base: float, scaling: Optional[Dict[str, Any]],
                               max_position_embeddings: Optional[int] = None):
    """(inv_freq, attention_factor): the factor multiplies cos and sin (1.0 but for YaRN)."""
    rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if rope_type == "yarn":
        return _yarn(head_dim, base, scaling, max_position_embeddings)
    return compute_inv_freq(head_dim, base, scaling), 1.0


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
    if rope_type == "yarn":
        return _yarn(head_dim, base, scaling, None)[0]
    hint = ""
    if rope_type == "dynamic":
        hint = (" (HF's dynamic NTK rescales by the longest sequence of each forward batch, which a "
                "continuous-batching server cannot reproduce; use rope_type 'yarn' or 'linear')")
    raise NotImplementedError(f"rope_scaling type {rope_type!r} is not supported (supported: default, linear, "
                              f"llama3, yarn){hint}")


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    d = x.shape[-1] // 2
    return torch.cat((-x[..., d:], x[..., :d]), dim=-1)


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_position: int, base: float, scaling: Optional[Dict[str, Any]] = None,
                 fused: bool = True, max_position_embeddings: Optional[int] = None):
        super().__init__()
        self.fused = fused
        self.head_dim = head_dim
        inv_freq, attention_factor = compute_inv_freq_and_scale(head_dim, base, scaling, max_position_embeddings)
        self.attention_factor = attention_factor
        t = torch.arange(max_position, dtype=torch.int64).float()
        freqs = torch.outer(t, inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos_cache", emb.cos() * attention_factor, persistent=False)
        self.register_buffer("sin_cache", emb.sin() * attention_factor, persistent=False)

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
