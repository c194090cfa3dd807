"""Segmented LoRA GEMMs in Triton (SGMV: one program per (segment, column block)), for CUDA.

`lora_delta_triton(x, A, B, pieces, seg_indptr, seg_slots, out)` adds the same delta as
`ops.lora_delta_reference` into `out`: segment g covers rows seg_indptr[g]..seg_indptr[g+1] of the
batch (a request's tokens) and uses slot seg_slots[g] (-1: none). The shrink kernel writes
h = x @ A[slot]^T [T, P*R]; the expand kernel adds h[:, piece] @ B[slot, piece]^T for each packed
piece. Tested against the reference on CPU under TRITON_INTERPRET=1 (tests/test_lora.py).
Imported lazily: the package works without Triton.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _sgmv_shrink(x_ptr, a_ptr, h_ptr, indptr_ptr, slots_ptr, K, N,
                 stride_xm, stride_as, stride_an, stride_hm,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    seg = tl.program_id(0)
    nb = tl.program_id(1)
    slot = tl.load(slots_ptr + seg)
    if slot >= 0:
        start = tl.load(indptr_ptr + seg)
        end = tl.load(indptr_ptr + seg + 1)
        rn = nb * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        for m0 in range(start, end, BLOCK_M):
            rm = m0 + tl.arange(0, BLOCK_M)
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                kk = k0 + rk
                xt = tl.load(x_ptr + rm[:, None] * stride_xm + kk[None, :],
                             mask=(rm[:, None] < end) & (kk[None, :] < K), other=0.0)
                at = tl.load(a_ptr + slot * stride_as + rn[None, :] * stride_an + kk[:, None],
                             mask=(rn[None, :] < N) & (kk[:, None] < K), other=0.0)
                acc += tl.dot(xt.to(tl.float32), at.to(tl.float32))
            tl.store(h_ptr + rm[:, None] * stride_hm + rn[None, :], acc,
                     mask=(rm[:, None] < end) & (rn[None, :] < N))


@triton.jit
def _sgmv_expand(h_ptr, b_ptr, out_ptr, indptr_ptr, slots_ptr, R, h_off, out_off, N,
                 stride_hm, stride_bs, stride_bn, stride_om,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    seg = tl.program_id(0)
    nb = tl.program_id(1)
    slot = tl.load(slots_ptr + seg)
    if slot >= 0:
        start = tl.load(indptr_ptr + seg)
        end = tl.load(indptr_ptr + seg + 1)
        rn = nb * BLOCK_N + tl.arange(0, BLOCK_N)
        rr = tl.arange(0, BLOCK_R)
        bt = tl.load(b_ptr + slot * stride_bs + (out_off + rn[None, :]) * stride_bn + rr[:, None],
                     mask=(rn[None, :] < N) & (rr[:, None] < R), other=0.0).to(tl.float32)
        for m0 in range(start, end, BLOCK_M):
            rm = m0 + tl.arange(0, BLOCK_M)
            ht = tl.load(h_ptr + rm[:, None] * stride_hm + h_off + rr[None, :],
                         mask=(rm[:, None] < end) & (rr[None, :] < R), other=0.0)
            acc = tl.dot(ht.to(tl.float32), bt)
            optr = out_ptr + rm[:, None] * stride_om + out_off + rn[None, :]
            omask = (rm[:, None] < end) & (rn[None, :] < N)
            prev = tl.load(optr, mask=omask, other=0.0)
            tl.store(optr, (prev.to(tl.float32) + acc).to(prev.dtype), mask=omask)


def lora_delta_triton(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, pieces, seg_indptr: torch.Tensor,
                      seg_slots: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Adds the delta into `out` (contiguous [T, out]); seg_indptr int32 [G+1], seg_slots int32 [G]."""
    x = x.contiguous()
    T, K = x.shape
    G = seg_slots.shape[0]
    R = B.shape[2]
    N = A.shape[1]
    h = torch.zeros(T, N, dtype=torch.float32, device=x.device)
    bm = 16
    _sgmv_shrink[(G, triton.cdiv(N, 32))](x, A, h, seg_indptr, seg_slots, K, N, x.stride(0), A.stride(0),
                                          A.stride(1), h.stride(0), BLOCK_M=bm, BLOCK_N=32, BLOCK_K=32)
    br = max(16, triton.next_power_of_2(R))
    for p, (off, size) in enumerate(pieces):
        _sgmv_expand[(G, triton.cdiv(size, 64))](h, B, out, seg_indptr, seg_slots, R, p * R, off, size,
                                                 h.stride(0), B.stride(0), B.stride(1), out.stride(0),
                                                 BLOCK_M=bm, BLOCK_N=64, BLOCK_R=br)
    return out
