"""KV store: k_buffer[loc[t]] = k[t] and v_buffer[loc[t]] = v[t] for the step's new tokens.

One program copies BLOCK_T tokens x BLOCK_C elements of a token's [num_kv_heads * head_dim] row
(both K and V), casting to the pool's dtype. Reference: `reference.ref_store_kv` (plain indexing,
what `MHATokenToKVPool.set_kv_buffer` does).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from radixlm.attention.triton_kernels.common import INTERPRETED, next_pow2


@triton.jit
def _store_kv_kernel(K, V, Loc, KBuf, VBuf, num_tokens,
                     stride_kt, stride_vt, stride_kbs, stride_vbs,
                     ROW: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    pid_t = tl.program_id(0)
    pid_c = tl.program_id(1)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_t = offs_t < num_tokens
    mask = mask_t[:, None] & (offs_c < ROW)[None, :]
    loc = tl.load(Loc + offs_t, mask=mask_t, other=0).to(tl.int64)
    rows = offs_t.to(tl.int64)
    k = tl.load(K + rows[:, None] * stride_kt + offs_c[None, :], mask=mask, other=0.0)
    tl.store(KBuf + loc[:, None] * stride_kbs + offs_c[None, :], k.to(KBuf.dtype.element_ty), mask=mask)
    v = tl.load(V + rows[:, None] * stride_vt + offs_c[None, :], mask=mask, other=0.0)
    tl.store(VBuf + loc[:, None] * stride_vbs + offs_c[None, :], v.to(VBuf.dtype.element_ty), mask=mask)


def _rows(x: torch.Tensor, row: int) -> torch.Tensor:
    """x as [T, row] with unit stride inside a row (a view when possible)."""
    x = x.reshape(x.shape[0], row)
    return x if x.stride(1) == 1 else x.contiguous()


def store_kv(k: torch.Tensor, v: torch.Tensor, loc: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor) -> None:
    """k, v: [T, Hk*D] or [T, Hk, D]; loc: [T] slot ids; k_buf/v_buf: [num_slots, Hk, D] (contiguous)."""
    num_tokens = loc.shape[0]
    if num_tokens == 0:
        return
    row = k_buf.shape[1] * k_buf.shape[2]
    assert k_buf.stride(2) == 1 and k_buf.stride(1) == k_buf.shape[2], "KV pool rows must be contiguous"
    assert v_buf.stride(2) == 1 and v_buf.stride(1) == v_buf.shape[2], "KV pool rows must be contiguous"
    k2, v2 = _rows(k, row), _rows(v, row)
    block_c = next_pow2(row) if INTERPRETED else min(next_pow2(row), 1024)
    block_t = 64 if INTERPRETED else max(1, 4096 // block_c)
    grid = (triton.cdiv(num_tokens, block_t), triton.cdiv(row, block_c))
    _store_kv_kernel[grid](k2, v2, loc, k_buf, v_buf, num_tokens,
                           k2.stride(0), v2.stride(0), k_buf.stride(0), v_buf.stride(0),
                           ROW=row, BLOCK_T=block_t, BLOCK_C=block_c, num_warps=4)
