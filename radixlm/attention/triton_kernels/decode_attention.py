"""Decode attention (one new token per request) over the paged KV pool: flash-decoding.

Stage 1, grid (batch, num_kv_heads, num_splits): request b's slots req_to_token[row_b, :seq_b] are
cut into num_splits contiguous ranges of ceil(seq_b / num_splits) tokens. A program takes one
range and one kv head, and processes the GROUP q heads that share that kv head together (a
[BLOCK_H, D] x [D, BLOCK_N] dot, BLOCK_H = GROUP padded to >= 16), so each K/V row is read once per
kv head. It writes the normalised partial output and its log-sum-exp (base 2) per q head and split.
Stage 2, grid (batch, num_q_heads): merges the non-empty splits with their log-sum-exps.
num_splits is a per-step runtime value (no recompiles): the backend picks it so that
batch * kv_heads * splits fills the GPU while each split keeps a useful number of tokens.
Reference: `reference.ref_decode_attention` and the torch_native backend.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from radixlm.attention.triton_kernels.common import block_d, dot, next_pow2

LOG2E = 1.4426950408889634


@triton.jit
def _decode_stage1_kernel(
    Q, KBuf, VBuf, ReqToToken, ReqPoolIdx, SeqLens, MidO, MidLse,
    sm_scale_log2,
    stride_qb, stride_qh, stride_kbs, stride_kbh, stride_vbs, stride_vbh, stride_r2t,
    stride_mob, stride_moh, stride_mos, stride_mlb, stride_mlh,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr,
):
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    num_splits = tl.num_programs(2)

    seq = tl.load(SeqLens + b).to(tl.int32)
    row = tl.load(ReqPoolIdx + b).to(tl.int64)
    split_len = tl.cdiv(seq, num_splits)
    start = split * split_len
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

    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + offs_nb
        mask_n = offs_n < end
        slots = tl.load(ReqToToken + row * stride_r2t + offs_n, mask=mask_n, other=0).to(tl.int64)
        k = tl.load(KBuf + slots[None, :] * stride_kbs + kv_head * stride_kbh + offs_d[:, None],
                    mask=mask_d[:, None] & mask_n[None, :], other=0.0)
        qk = dot(q, k.to(q.dtype), IEEE) * sm_scale_log2
        qk = tl.where(mask_n[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(VBuf + slots[:, None] * stride_vbs + kv_head * stride_vbh + offs_d[None, :],
                    mask=mask_n[:, None] & mask_d[None, :], other=0.0)
        acc = acc * alpha[:, None] + dot(p.to(q.dtype), v.to(q.dtype), IEEE)
        m_i = m_new

    nonempty = end > start
    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    mo = MidO + b.to(tl.int64) * stride_mob + heads[:, None] * stride_moh + split * stride_mos + offs_d[None, :]
    tl.store(mo, acc / l_safe[:, None], mask=mask_h[:, None] & mask_d[None, :] & nonempty)
    ml = MidLse + b.to(tl.int64) * stride_mlb + heads * stride_mlh + split
    tl.store(ml, m_i + tl.log2(l_safe), mask=mask_h & nonempty)


@triton.jit
def _decode_stage2_kernel(
    MidO, MidLse, O, SeqLens, num_splits,
    stride_mob, stride_moh, stride_mos, stride_mlb, stride_mlh, stride_ob, stride_oh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0)
    head = tl.program_id(1)
    seq = tl.load(SeqLens + b).to(tl.int32)
    split_len = tl.cdiv(seq, num_splits)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM

    m_run = tl.full([1], -1.0e30, dtype=tl.float32)
    l_run = tl.zeros([1], dtype=tl.float32)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    mo = MidO + b.to(tl.int64) * stride_mob + head * stride_moh
    ml = MidLse + b.to(tl.int64) * stride_mlb + head * stride_mlh
    for s in range(0, num_splits):
        valid = s * split_len < seq
        lse = tl.load(ml + s + tl.zeros([1], dtype=tl.int32), mask=valid, other=float("-inf"))
        o = tl.load(mo + s * stride_mos + offs_d, mask=mask_d & valid, other=0.0)
        m_new = tl.maximum(m_run, lse)
        alpha = tl.exp2(m_run - m_new)
        w = tl.exp2(lse - m_new)
        acc = acc * alpha + o * w
        l_run = l_run * alpha + w
        m_run = m_new
    out = acc / l_run
    tl.store(O + b.to(tl.int64) * stride_ob + head * stride_oh + offs_d, out.to(O.dtype.element_ty), mask=mask_d)


def decode_buffers(batch: int, num_q_heads: int, num_splits: int, head_dim: int, device):
    """Stage-1 scratch: partial outputs [B, Hq, S, D] and log-sum-exps [B, Hq, S] (fp32)."""
    mid_o = torch.empty((batch, num_q_heads, num_splits, head_dim), dtype=torch.float32, device=device)
    mid_lse = torch.empty((batch, num_q_heads, num_splits), dtype=torch.float32, device=device)
    return mid_o, mid_lse


def decode_attention_fwd(q, o, k_buf, v_buf, req_to_token, req_pool_indices, seq_lens, num_splits: int,
                         mid_o, mid_lse, sm_scale: float, *, block_n: int, num_warps: int = 4,
                         num_stages: int = 2) -> None:
    """q/o: [B, Hq, D]; k_buf/v_buf: [num_slots, Hk, D]; req_pool_indices/seq_lens: [B] ints;
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
        sm_scale * LOG2E,
        q.stride(0), q.stride(1), k_buf.stride(0), k_buf.stride(1), v_buf.stride(0), v_buf.stride(1),
        req_to_token.stride(0),
        mid_o.stride(0), mid_o.stride(1), mid_o.stride(2), mid_lse.stride(0), mid_lse.stride(1),
        GROUP=group, HEAD_DIM=d, BLOCK_D=bd, BLOCK_H=max(16, next_pow2(group)), BLOCK_N=block_n,
        IEEE=q.dtype == torch.float32, num_warps=num_warps, num_stages=num_stages,
    )
    _decode_stage2_kernel[(batch, hq)](
        mid_o, mid_lse, o, seq_lens, num_splits,
        mid_o.stride(0), mid_o.stride(1), mid_o.stride(2), mid_lse.stride(0), mid_lse.stride(1),
        o.stride(0), o.stride(1),
        HEAD_DIM=d, BLOCK_D=bd, num_warps=4 if bd <= 128 else 8,
    )
