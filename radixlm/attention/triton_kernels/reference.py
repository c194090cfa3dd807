"""Plain-PyTorch references for the Triton kernels (explicit softmax, float32 math).

They take the same arguments as the kernels' launch wrappers minus the launch metadata, and
are deliberately naive: a loop over requests, a full score matrix per request. `sliding_window`:
a query at position p sees keys at positions (p - window, p].
"""

from __future__ import annotations

import torch


def ref_store_kv(k, v, loc, k_buf, v_buf) -> None:
    hk, d = k_buf.shape[1], k_buf.shape[2]
    k_buf[loc] = k.reshape(-1, hk, d).to(k_buf.dtype)
    v_buf[loc] = v.reshape(-1, hk, d).to(v_buf.dtype)


def _attend(q, keys, vals, mask, sm_scale):
    """q: [E, Hq, D]; keys/vals: [S, Hk, D]; mask: [E, S] bool -> [E, Hq, D] (float32)."""
    group = q.shape[1] // keys.shape[1]
    keys = keys.float().repeat_interleave(group, dim=1)
    vals = vals.float().repeat_interleave(group, dim=1)
    scores = torch.einsum("ehd,shd->hes", q.float(), keys) * sm_scale
    scores = scores.masked_fill(~mask[None], float("-inf"))
    return torch.einsum("hes,shd->ehd", torch.softmax(scores, dim=-1), vals)


def ref_extend_attention(q, k_buf, v_buf, req_to_token, req_pool_indices, prefix_lens, extend_lens,
                         sm_scale: float, sliding_window=None) -> torch.Tensor:
    """q: [T, Hq, D] (requests' new tokens back to back); the pool already holds every request's
    prefix and new tokens at req_to_token[row, :prefix + extend]. Returns [T, Hq, D] in q's dtype."""
    out = torch.empty_like(q)
    start = 0
    for row, pre, ext in zip(req_pool_indices.tolist(), prefix_lens.tolist(), extend_lens.tolist()):
        slots = req_to_token[row, :pre + ext]
        pos = torch.arange(pre, pre + ext, device=q.device)
        mask = torch.arange(pre + ext, device=q.device)[None, :] <= pos[:, None]
        if sliding_window:
            mask &= torch.arange(pre + ext, device=q.device)[None, :] > pos[:, None] - sliding_window
        out[start:start + ext] = _attend(q[start:start + ext], k_buf[slots], v_buf[slots], mask, sm_scale).to(q.dtype)
        start += ext
    return out


def ref_decode_attention(q, k_buf, v_buf, req_to_token, req_pool_indices, seq_lens, sm_scale: float,
                         sliding_window=None) -> torch.Tensor:
    """q: [B, Hq, D], one token per request attending to req_to_token[row, :seq_len]."""
    out = torch.empty_like(q)
    for i, (row, n) in enumerate(zip(req_pool_indices.tolist(), seq_lens.tolist())):
        slots = req_to_token[row, :n]
        mask = torch.ones((1, n), dtype=torch.bool, device=q.device)
        if sliding_window:
            mask[:, :max(n - sliding_window, 0)] = False
        out[i:i + 1] = _attend(q[i:i + 1], k_buf[slots], v_buf[slots], mask, sm_scale).to(q.dtype)
    return out
