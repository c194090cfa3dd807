"""torch_native attention: the reference backend, plain PyTorch SDPA over the paged KV pool.

Works on CPU and CUDA. Extend loops over requests (each attends to its cached prefix plus its own
new tokens, causally); decode gathers every request's slots into one padded batch with a length
mask (SDPA, or in bfloat16/float16 on the CPU two batched matmuls around a float32 softmax:
`decode_attention_matmul`, SDPA's CPU flash kernel being slow for one query). Sliding-window
layers (`layer.sliding_window` = W) mask keys at positions <= p - W for a query at position p
(HF's rule); the pool still holds every token, so a cached prefix longer than the window stays
valid. Other backends are tested against this one.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn.functional as F

from radixlm.attention.base import AttentionBackend
from radixlm.attention.forward_context import ForwardBatch

ENV_DECODE_IMPL = "RADIXLM_TORCH_NATIVE_DECODE"
DECODE_IMPLS = ("auto", "sdpa", "matmul")


def _gather(buf: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """buf[slots] for a [N, H, D] pool buffer -> [len(slots), H, D]. index_select over one flat row per
    slot: on CPU ~2x faster than over the 3-D buffer and ~4x faster than advanced indexing."""
    return buf.view(buf.shape[0], -1).index_select(0, slots).view(-1, *buf.shape[1:])


class TorchNativeAttnBackend(AttentionBackend):
    def __init__(self, decode_impl: Optional[str] = None, **_unused):
        # decode attention: "sdpa" (the reference), "matmul" (decode_attention_matmul), "auto" (matmul for
        # bfloat16/float16 on the CPU, else sdpa); RADIXLM_TORCH_NATIVE_DECODE sets it for benchmarks
        self.decode_impl = decode_impl or os.environ.get(ENV_DECODE_IMPL, "auto")
        if self.decode_impl not in DECODE_IMPLS:
            raise ValueError(f"decode attention {self.decode_impl!r}: valid {', '.join(DECODE_IMPLS)}")
        self._decode_idx = None
        self._decode_mask = None
        self._decode_window_masks = {}

    def init_forward_metadata(self, fb: ForwardBatch) -> None:
        if fb.forward_mode.is_decode:
            self.init_decode_metadata(fb, fb.max_seq_len)

    def init_decode_metadata(self, fb: ForwardBatch, length: int, mark_dynamic: bool = False) -> None:
        """The step's key slots `req_to_token[row, :length]` [B, length] and length mask [B, 1, 1, length],
        computed once per step and shared by every layer. `length` >= the longest sequence (the compiled
        step rounds it up; slots past a row's length are masked). `mark_dynamic`: length is a dynamic
        dimension for torch.compile (so a growing sequence does not recompile)."""
        table = fb.req_to_token_pool.req_to_token
        self._decode_idx = table[fb.req_pool_indices, :length]
        ar = torch.arange(length, device=fb.seq_lens.device)
        self._decode_mask = (ar[None, :] < fb.seq_lens[:, None])[:, None, None, :]
        self._decode_ar = ar
        self._decode_window_masks = {}
        if mark_dynamic:
            torch._dynamo.mark_dynamic(self._decode_idx, 1)
            torch._dynamo.mark_dynamic(self._decode_mask, 3)

    def forward_extend(self, q, k, v, layer, fb: ForwardBatch) -> torch.Tensor:
        pool = fb.token_to_kv_pool
        pool.set_kv_buffer(layer.layer_id, fb.out_cache_loc, k.view(-1, layer.num_kv_heads, layer.head_dim),
                           v.view(-1, layer.num_kv_heads, layer.head_dim))
        k_buf, v_buf = pool.get_kv_buffer(layer.layer_id)
        table = fb.req_to_token_pool.req_to_token
        q = q.view(-1, layer.num_heads, layer.head_dim)
        out = torch.empty_like(q)
        start = 0
        for i in range(fb.batch_size):
            ext, pre, seq = fb.extend_seq_lens_cpu[i], fb.extend_prefix_lens_cpu[i], fb.seq_lens_cpu[i]
            slots = table[fb.req_pool_indices[i], :seq]
            qi = q[start:start + ext].transpose(0, 1).unsqueeze(0)  # [1, Hq, E, D]
            ki = _gather(k_buf, slots).transpose(0, 1).unsqueeze(0).to(q.dtype)  # [1, Hk, S, D]
            vi = _gather(v_buf, slots).transpose(0, 1).unsqueeze(0).to(q.dtype)
            window = getattr(layer, "sliding_window", None)
            if pre == 0 and window is None:
                o = F.scaled_dot_product_attention(qi, ki, vi, is_causal=True, scale=layer.scaling,
                                                   enable_gqa=True)
            else:
                rows = torch.arange(ext, device=q.device)[:, None] + pre
                cols = torch.arange(seq, device=q.device)[None, :]
                mask = cols <= rows
                if window is not None:
                    mask &= cols > rows - window
                o = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask, scale=layer.scaling,
                                                   enable_gqa=True)
            out[start:start + ext] = o.squeeze(0).transpose(0, 1)
            start += ext
        return out.reshape(-1, layer.num_heads * layer.head_dim)

    def forward_decode(self, q, k, v, layer, fb: ForwardBatch) -> torch.Tensor:
        pool = fb.token_to_kv_pool
        pool.set_kv_buffer(layer.layer_id, fb.out_cache_loc, k.view(-1, layer.num_kv_heads, layer.head_dim),
                           v.view(-1, layer.num_kv_heads, layer.head_dim))
        k_buf, v_buf = pool.get_kv_buffer(layer.layer_id)
        b, l = self._decode_idx.shape
        flat = self._decode_idx.reshape(-1)
        keys = _gather(k_buf, flat).view(b, l, *k_buf.shape[1:]).transpose(1, 2).to(q.dtype)  # [B, Hk, L, D]
        vals = _gather(v_buf, flat).view(b, l, *v_buf.shape[1:]).transpose(1, 2).to(q.dtype)
        qb = q.view(-1, layer.num_heads, 1, layer.head_dim)
        mask = self._decode_mask
        window = getattr(layer, "sliding_window", None)
        if window is not None:
            mask = self._decode_window_masks.get(window)
            if mask is None:
                lo = (fb.seq_lens - window)[:, None, None, None]
                mask = self._decode_mask & (self._decode_ar[None, None, None, :] >= lo)
                self._decode_window_masks[window] = mask
        if self.decode_impl == "matmul" or (self.decode_impl == "auto" and q.dtype != torch.float32
                                             and q.device.type == "cpu"):
            return decode_attention_matmul(qb, keys, vals, mask, layer.scaling)
        o = F.scaled_dot_product_attention(qb, keys, vals, attn_mask=mask, scale=layer.scaling,
                                           enable_gqa=True)
        return o.reshape(-1, layer.num_heads * layer.head_dim)


def decode_attention_matmul(q: torch.Tensor, keys: torch.Tensor, vals: torch.Tensor, mask: torch.Tensor,
                            scale: float) -> torch.Tensor:
    """One query per row as two batched matmuls with a float32 softmax between: q [B, Hq, 1, D],
    keys/vals [B, Hk, L, D], mask [B, 1, 1, L] (True: attend) -> [B, Hq*D]. The Hq/Hk query heads of
    a KV head are the rows of one matmul (no repeated K/V). On the CPU in bfloat16 this is 3-4x faster
    than SDPA's flash kernel, built for many queries (32 rows x 160 keys: 2.5 vs 9.1 ms, one thread);
    in float32 SDPA is faster and stays. SDPA is the reference (tests/test_cpu_step.py)."""
    b, hq, _, d = q.shape
    hk, length = keys.shape[1], keys.shape[2]
    qg = q.reshape(b, hk, hq // hk, d)
    scores = torch.matmul(qg, keys.transpose(-1, -2)).float() * scale  # [B, Hk, G, L]
    scores = scores.masked_fill(~mask.reshape(b, 1, 1, length), float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(vals.dtype)
    return torch.matmul(probs, vals).reshape(b, hq * d)
