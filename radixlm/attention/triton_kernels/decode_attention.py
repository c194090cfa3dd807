"""Decode attention (one new token per request) over the paged KV pool: flash-decoding.

Stage 1, grid (batch, num_kv_heads, num_splits): request b's slots req_to_token[row_b, :seq_b] are
cut into num_splits contiguous ranges of ceil(seq_b / num_splits) tokens. A program takes one
range and one kv head, and processes the GROUP q heads that share that kv head together (a
[BLOCK_H, D] x [D, BLOCK_N] dot, BLOCK_H = GROUP padded to >= 16), so each K/V row is read once per
kv head. It writes the normalised partial output and its log-sum-exp (base 2) per q head and split.
Stage 2, grid (batch, num_q_heads): merges the non-empty splits with their log-sum-exps.
num_splits is a per-step runtime value (no recompiles): the backend picks it so that
batch * kv_heads * splits fills the GPU while each split keeps a useful number of tokens.
Sliding window (window > 0, a runtime value): both stages cut [max(seq - window, 0), seq) instead
of [0, seq), so the splits cover only the keys the new token sees.
Reference: `reference.ref_decode_attention` and the torch_native backend.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from radixlm.attention.triton_kernels.common import LOOP_WHILE, block_d, gathered_block, next_pow2

LOG2E = 1.4426950408889634


@triton.jit
def _decode_stage1_kernel(
    Q, KBuf, VBuf, ReqToToken, ReqPoolIdx, SeqLens, MidO, MidLse,
    sm_scale_log2, window,
    stride_qb, stride_qh, stride_kbs, stride_kbh, stride_vbs, stride_vbh, stride_r2t,
    stride_mob, stride_moh, stride_mos, stride_mlb, stride_mlh,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr, SLIDING: tl.constexpr,
):
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    num_splits = tl.num_programs(2)

    seq = tl.load(SeqLens + b).to(tl.int32)
    row = tl.load(ReqPoolIdx + b).to(tl.int64)
    base = seq * 0
    if SLIDING:
        base = tl.maximum(seq - window, 0)
    split_len = tl.cdiv(seq - base, num_splits)
    start = base + split * split_len
    end = tl.minimum(start + split_len, seq)

    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    offs_nb = tl.arange(0, BLOCK_N)
    mask_h = offs_h < GROUP
    mask_d = offs_d < HEAD_DIM
    heads = kv_head * GROUP + offs_h

    q = tl.load(Q + b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=mask_h[:, None] & mask_d[None, :], other=0.0)

    m_i = tl.full([BLOCK_H], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)

    slot_row = ReqToToken + row * stride_r2t
    k_head = KBuf + kv_head * stride_kbh
    v_head = VBuf + kv_head * stride_vbh
    if LOOP_WHILE:
        start_n = start
        while start_n < end:
            m_i, l_i, acc = gathered_block(start_n, end, q, m_i, l_i, acc, slot_row, k_head, v_head,
                                           stride_kbs, stride_vbs, offs_nb, offs_d, mask_d, sm_scale_log2, IEEE)
            start_n += BLOCK_N
    else:
        for start_n in range(start, end, BLOCK_N):
            m_i, l_i, acc = gathered_block(start_n, end, q, m_i, l_i, acc, slot_row, k_head, v_head,
                                           stride_kbs, stride_vbs, offs_nb, offs_d, mask_d, sm_scale_log2, IEEE)

    keep_h = mask_h & ((start + offs_h * 0) < end)  # nothing to write for an empty split
    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    mo = MidO + b.to(tl.int64) * stride_mob + heads[:, None] * stride_moh + split * stride_mos + offs_d[None, :]
    tl.store(mo, acc / l_safe[:, None], mask=keep_h[:, None] & mask_d[None, :])
    ml = MidLse + b.to(tl.int64) * stride_mlb + heads * stride_mlh + split
    tl.store(ml, m_i + tl.log2(l_safe), mask=keep_h)


@triton.jit
def _merge_split(s, base, split_len, seq, mo, ml, m_run, l_run, acc, zero1, offs_d, mask_d, stride_mos):
    """Folds split s's partial output and log-sum-exp into the running (max, sum, acc); empty
    splits (those starting at or past seq) load lse = -inf and weigh nothing."""
    lo = base + s * split_len
    lse = tl.load(ml + s + zero1, mask=(lo + zero1) < seq, other=float("-inf"))
    o = tl.load(mo + s * stride_mos + offs_d, mask=mask_d & ((lo + offs_d * 0) < seq), other=0.0)
    m_new = tl.maximum(m_run, lse)
    alpha = tl.exp2(m_run - m_new)
    w = tl.exp2(lse - m_new)
    return m_new, l_run * alpha + w, acc * alpha + o * w


@triton.jit
def _decode_stage2_kernel(
    MidO, MidLse, O, SeqLens, num_splits, window,
    stride_mob, stride_moh, stride_mos, stride_mlb, stride_mlh, stride_ob, stride_oh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, SLIDING: tl.constexpr,
):
    b = tl.program_id(0)
    head = tl.program_id(1)
    seq = tl.load(SeqLens + b).to(tl.int32)
    base = seq * 0
    if SLIDING:
        base = tl.maximum(seq - window, 0)
    split_len = tl.cdiv(seq - base, num_splits)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM

    m_run = tl.full([1], -1.0e30, dtype=tl.float32)
    l_run = tl.zeros([1], dtype=tl.float32)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    mo = MidO + b.to(tl.int64) * stride_mob + head * stride_moh
    ml = MidLse + b.to(tl.int64) * stride_mlb + head * stride_mlh
    zero1 = tl.zeros([1], dtype=tl.int32)
    if LOOP_WHILE:
        s = num_splits * 0
        while s < num_splits:
            m_run, l_run, acc = _merge_split(s, base, split_len, seq, mo, ml, m_run, l_run, acc, zero1, offs_d, mask_d,
                                             stride_mos)
            s += 1
    else:
        for s in range(0, num_splits):
            m_run, l_run, acc = _merge_split(s, base, split_len, seq, mo, ml, m_run, l_run, acc, zero1, offs_d, mask_d,
                                             stride_mos)
    out = acc / l_run
    tl.store(O + b.to(tl.int64) * stride_ob + head * stride_oh + offs_d, out.to(O.dtype.element_ty), mask=mask_d)


def decode_buffers(batch: int, num_q_heads: int, num_splits: int, head_dim: int, device):
    """Stage-1 scratch: partial outputs [B, Hq, S, D] and log-sum-exps [B, Hq, S] (fp32)."""
    mid_o = torch.empty((batch, num_q_heads, num_splits, head_dim), dtype=torch.float32, device=device)
    mid_lse = torch.empty((batch, num_q_heads, num_splits), dtype=torch.float32, device=device)
    return mid_o, mid_lse


def decode_attention_fwd(q, o, k_buf, v_buf, req_to_token, req_pool_indices, seq_lens, num_splits: int,
                         mid_o, mid_lse, sm_scale: float, *, block_n: int, num_warps: int = 4,
                         num_stages: int = 2, sliding_window: int | None = None) -> None:
    """sliding_window: the new token (position seq - 1) sees keys [seq - window, seq) (None: all).
    q/o: [B, Hq, D]; k_buf/v_buf: [num_slots, Hk, D]; req_pool_indices/seq_lens: [B] ints;
    mid_o/mid_lse from `decode_buffers(B, Hq, num_splits, D)`."""
    batch, hq, d = q.shape
    if batch == 0:
        return
    hk = k_buf.shape[1]
    assert hq % hk == 0, "num_heads must be a multiple of num_kv_heads"
    for t in (q, o, k_buf, v_buf):
        assert t.stride(-1) == 1, "the head dimension must be contiguous"
    group = hq // hk
    bd = block_d(d)
    _decode_stage1_kernel[(batch, hk, num_splits)](
        q, k_buf, v_buf, req_to_token, req_pool_indices, seq_lens, mid_o, mid_lse,
        sm_scale * LOG2E, int(sliding_window or 0),
        q.stride(0), q.stride(1), k_buf.stride(0), k_buf.stride(1), v_buf.stride(0), v_buf.stride(1),
        req_to_token.stride(0),
        mid_o.stride(0), mid_o.stride(1), mid_o.stride(2), mid_lse.stride(0), mid_lse.stride(1),
        GROUP=group, HEAD_DIM=d, BLOCK_D=bd, BLOCK_H=max(16, next_pow2(group)), BLOCK_N=block_n,
        IEEE=q.dtype == torch.float32, SLIDING=bool(sliding_window), num_warps=num_warps, num_stages=num_stages,
    )
    _decode_stage2_kernel[(batch, hq)](
        mid_o, mid_lse, o, seq_lens, num_splits, int(sliding_window or 0),
        mid_o.stride(0), mid_o.stride(1), mid_o.stride(2), mid_lse.stride(0), mid_lse.stride(1),
        o.stride(0), o.stride(1),
        HEAD_DIM=d, BLOCK_D=bd, SLIDING=bool(sliding_window), num_warps=4 if bd <= 128 else 8,
    )
