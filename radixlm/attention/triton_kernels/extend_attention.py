"""Extend (prefill) attention over the paged KV pool, flash-attention style.

Batch layout (ragged): request r owns query rows [qo_start[r], qo_start[r] + extend_lens[r]) of q,
has prefix_lens[r] tokens already cached (slots req_to_token[req_pool_indices[r], :prefix]) and its
new tokens' K/V in k_new/v_new at the same rows as its queries. New token i of r sits at absolute
position prefix + i and attends to every prefix slot and to new tokens 0..i.

Grid: (num_tiles, num_q_heads). The per-step metadata lists the tiles, tile t covering query rows
[tile_m[t], tile_m[t] + BLOCK_M) of request tile_req[t], so no program is launched for padding.
Each program keeps the running max / sum / accumulator of an online softmax (base 2, the scale
folded into one multiply; `common.online_softmax_update`) and walks
  1. the cached prefix in BLOCK_N chunks, gathering K/V rows through req_to_token, no mask but
     the tail, then
  2. the new tokens up to the tile's last row (contiguous K/V), with the causal mask.
Sliding window (WINDOW > 0, a runtime value): a query at position p sees keys at positions
(p - WINDOW, p]; the prefix walk starts at the tile's first visible key and both walks mask per row.
GQA: q head h reads kv head h // GROUP. head_dim is padded to BLOCK_D (a power of two) with masks.
Reference: `reference.ref_extend_attention` and the torch_native backend.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from radixlm.attention.triton_kernels.common import (
    LOOP_WHILE,
    block_d,
    gather_kv_block,
    gathered_block,
    online_softmax_update,
)

LOG2E = 1.4426950408889634


@triton.jit
def _windowed_prefix_block(start_n, end_n, q, q_pos, window, m_i, l_i, acc, slot_row, k_head, v_head,
                           stride_kbs, stride_vbs, offs_nb, offs_d, mask_d, sm_scale_log2, IEEE: tl.constexpr):
    """`gathered_block` with the sliding-window mask: key j is seen by the query at q_pos iff j > q_pos - window."""
    offs_n, mask_n, k, v = gather_kv_block(start_n, end_n, slot_row, k_head, v_head, stride_kbs, stride_vbs,
                                           offs_nb, offs_d, mask_d)
    keep = mask_n[None, :] & (offs_n[None, :] > q_pos[:, None] - window)
    return online_softmax_update(q, k, v, keep, m_i, l_i, acc, sm_scale_log2, IEEE)


@triton.jit
def _new_tokens_block(start_n, ext, q, offs_m, m_i, l_i, acc, KNew, VNew, q_start, kv_head,
                      stride_kt, stride_kh, stride_vt, stride_vh, offs_nb, offs_d, mask_d, sm_scale_log2,
                      window, IEEE: tl.constexpr, SLIDING: tl.constexpr):
    """Attends the tile's queries (request positions offs_m) to new tokens start_n.. (causal)."""
    offs_n = start_n + offs_nb
    mask_n = offs_n < ext
    rows = q_start + offs_n.to(tl.int64)
    k = tl.load(KNew + rows[None, :] * stride_kt + kv_head * stride_kh + offs_d[:, None],
                mask=mask_d[:, None] & mask_n[None, :], other=0.0)
    v = tl.load(VNew + rows[:, None] * stride_vt + kv_head * stride_vh + offs_d[None, :],
                mask=mask_n[:, None] & mask_d[None, :], other=0.0)
    keep = mask_n[None, :] & (offs_m[:, None] >= offs_n[None, :])
    if SLIDING:
        keep = keep & (offs_n[None, :] > offs_m[:, None] - window)
    return online_softmax_update(q, k, v, keep, m_i, l_i, acc, sm_scale_log2, IEEE)


@triton.jit
def _extend_attn_kernel(
    Q, KNew, VNew, O, KBuf, VBuf, ReqToToken,
    ReqPoolIdx, PrefixLens, QoStart, ExtendLens, TileReq, TileM,
    sm_scale_log2, window,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    stride_kbs, stride_kbh, stride_vbs, stride_vbh, stride_r2t,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr, SLIDING: tl.constexpr,
):
    tile = tl.program_id(0)
    head = tl.program_id(1)
    kv_head = head // GROUP

    req = tl.load(TileReq + tile)
    m_start = tl.load(TileM + tile)
    row = tl.load(ReqPoolIdx + req).to(tl.int64)
    prefix = tl.load(PrefixLens + req).to(tl.int32)
    q_start = tl.load(QoStart + req).to(tl.int64)
    ext = tl.load(ExtendLens + req).to(tl.int32)

    offs_m = m_start + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_nb = tl.arange(0, BLOCK_N)
    mask_m = offs_m < ext
    mask_d = offs_d < HEAD_DIM
    q_rows = q_start + offs_m.to(tl.int64)

    q = tl.load(Q + q_rows[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
                mask=mask_m[:, None] & mask_d[None, :], other=0.0)

    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # 1. cached prefix, gathered through the request's req_to_token row
    slot_row = ReqToToken + row * stride_r2t
    k_head = KBuf + kv_head * stride_kbh
    v_head = VBuf + kv_head * stride_vbh
    if SLIDING:
        # keys before the tile's first query position - window + 1 are seen by none of its rows
        q_pos = prefix + offs_m
        lo = tl.maximum(prefix + m_start - window + 1, 0)
        if LOOP_WHILE:
            start_n = lo
            while start_n < prefix:
                m_i, l_i, acc = _windowed_prefix_block(start_n, prefix, q, q_pos, window, m_i, l_i, acc, slot_row,
                                                       k_head, v_head, stride_kbs, stride_vbs, offs_nb, offs_d,
                                                       mask_d, sm_scale_log2, IEEE)
                start_n += BLOCK_N
        else:
            for start_n in range(lo, prefix, BLOCK_N):
                m_i, l_i, acc = _windowed_prefix_block(start_n, prefix, q, q_pos, window, m_i, l_i, acc, slot_row,
                                                       k_head, v_head, stride_kbs, stride_vbs, offs_nb, offs_d,
                                                       mask_d, sm_scale_log2, IEEE)
    else:
        if LOOP_WHILE:
            start_n = prefix * 0
            while start_n < prefix:
                m_i, l_i, acc = gathered_block(start_n, prefix, q, m_i, l_i, acc, slot_row, k_head, v_head,
                                               stride_kbs, stride_vbs, offs_nb, offs_d, mask_d, sm_scale_log2, IEEE)
                start_n += BLOCK_N
        else:
            for start_n in range(0, prefix, BLOCK_N):
                m_i, l_i, acc = gathered_block(start_n, prefix, q, m_i, l_i, acc, slot_row, k_head, v_head,
                                               stride_kbs, stride_vbs, offs_nb, offs_d, mask_d, sm_scale_log2, IEEE)

    # 2. the new tokens, causally (only up to this tile's last row)
    end_n = tl.minimum(ext, m_start + BLOCK_M)
    lo_n = end_n * 0
    if SLIDING:
        lo_n = tl.maximum(m_start - window + 1, 0)
    if LOOP_WHILE:
        start_n = lo_n
        while start_n < end_n:
            m_i, l_i, acc = _new_tokens_block(start_n, ext, q, offs_m, m_i, l_i, acc, KNew, VNew, q_start, kv_head,
                                              stride_kt, stride_kh, stride_vt, stride_vh, offs_nb, offs_d, mask_d,
                                              sm_scale_log2, window, IEEE, SLIDING)
            start_n += BLOCK_N
    else:
        for start_n in range(lo_n, end_n, BLOCK_N):
            m_i, l_i, acc = _new_tokens_block(start_n, ext, q, offs_m, m_i, l_i, acc, KNew, VNew, q_start, kv_head,
                                              stride_kt, stride_kh, stride_vt, stride_vh, offs_nb, offs_d, mask_d,
                                              sm_scale_log2, window, IEEE, SLIDING)

    l_i = tl.where(l_i > 0.0, l_i, 1.0)
    out = acc / l_i[:, None]
    tl.store(O + q_rows[:, None] * stride_ot + head * stride_oh + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=mask_m[:, None] & mask_d[None, :])


def extend_tiles(extend_lens, block_m: int):
    """(tile_req, tile_m) lists: one tile per BLOCK_M query rows of each request."""
    tile_req, tile_m = [], []
    for r, n in enumerate(extend_lens):
        for m in range(0, int(n), block_m):
            tile_req.append(r)
            tile_m.append(m)
    return tile_req, tile_m


def extend_attention_fwd(q, k_new, v_new, o, k_buf, v_buf, req_to_token, req_pool_indices, prefix_lens,
                         qo_start, extend_lens, tile_req, tile_m, sm_scale: float, *,
                         block_m: int, block_n: int, num_warps: int = 4, num_stages: int = 2,
                         sliding_window: int | None = None) -> None:
    """sliding_window: keys at positions (p - window, p] for a query at p (None: all of [0, p]).
    q/o: [T, Hq, D]; k_new/v_new: [T, Hk, D]; k_buf/v_buf: [num_slots, Hk, D];
    per-request int tensors: req_pool_indices, prefix_lens, qo_start, extend_lens [B];
    tiles: tile_req/tile_m [num_tiles] built with `extend_tiles(extend_lens, block_m)`."""
    num_tiles = tile_req.shape[0]
    if num_tiles == 0:
        return
    hq, d = q.shape[1], q.shape[2]
    hk = k_new.shape[1]
    assert hq % hk == 0, "num_heads must be a multiple of num_kv_heads"
    for t in (q, k_new, v_new, o, k_buf, v_buf):
        assert t.stride(-1) == 1, "the head dimension must be contiguous"
    grid = (num_tiles, hq)
    _extend_attn_kernel[grid](
        q, k_new, v_new, o, k_buf, v_buf, req_to_token,
        req_pool_indices, prefix_lens, qo_start, extend_lens, tile_req, tile_m,
        sm_scale * LOG2E, int(sliding_window or 0),
        q.stride(0), q.stride(1), k_new.stride(0), k_new.stride(1), v_new.stride(0), v_new.stride(1),
        o.stride(0), o.stride(1),
        k_buf.stride(0), k_buf.stride(1), v_buf.stride(0), v_buf.stride(1), req_to_token.stride(0),
        GROUP=hq // hk, HEAD_DIM=d, BLOCK_D=block_d(d), BLOCK_M=block_m, BLOCK_N=block_n,
        IEEE=q.dtype == torch.float32, SLIDING=bool(sliding_window), num_warps=num_warps, num_stages=num_stages,
    )
