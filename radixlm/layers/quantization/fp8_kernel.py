"""Triton block-scaled FP8 GEMM (W8A8): y = dequant(x_q) @ dequant(W_q)^T for the FP8 linear layers on CUDA.

In: activations x [M, K] quantized per token and group of bk columns (`per_token_group_quantize`:
fp8 x_q, float32 x_s [M, ceil(K/bk)]); the weight W_q [N, K] float8_e4m3fn with block scales
scale_inv [rows, ceil(K/bk)] and `row_index` [N] (each weight row's scale row: packed q/k/v pieces
carry their own scale rows). Out: y [M, N] in the activations' dtype. Each program computes a
BLOCK_M x BLOCK_N tile and walks K in steps of bk (one scale column per step): an FP8 tl.dot into
float32, scaled by x_s[m, step] * scale_inv[row_index[n], step]. Edges (M, N, K not multiples of the
tile) are masked. The reference is `fp8_utils.w8a8_block_matmul_ref`; tests/test_fp8.py compares them
under TRITON_INTERPRET on the CPU (fp8 loads, casts and dots work in the interpreter). Needs an FP8
tensor-core GPU (compute capability >= 8.9) on CUDA; this module imports triton at its top, so only
import it where triton is available.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from radixlm.layers.quantization.fp8_utils import per_token_group_quantize


def kernel_supports_block_k(block_k: int) -> bool:
    """One K step of the kernel is one scale column: a power of two, at least FP8 MMA's K of 32."""
    return block_k >= 32 and not block_k & (block_k - 1)


@triton.jit
def _w8a8_block_fp8_matmul(A, B, C, As, Bs, Brow, M, N, K,
                           stride_am, stride_ak, stride_bn, stride_bk, stride_cm, stride_cn,
                           stride_asm, stride_ask, stride_bsn, stride_bsk,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    a_ptrs = A + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = B + offs_n[None, :] * stride_bn + offs_k[:, None] * stride_bk  # W^T tile [BLOCK_K, BLOCK_N]
    b_rows = tl.load(Brow + offs_n, mask=mask_n, other=0)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, tl.cdiv(K, BLOCK_K)):
        mask_k = offs_k < K - kb * BLOCK_K
        a = tl.load(a_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        a_s = tl.load(As + offs_m * stride_asm + kb * stride_ask, mask=mask_m, other=0.0)
        b_s = tl.load(Bs + b_rows * stride_bsn + kb * stride_bsk, mask=mask_n, other=0.0)
        acc += tl.dot(a, b) * a_s[:, None] * b_s[None, :]
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    c_ptrs = C + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(C.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def w8a8_block_fp8_matmul(xq: torch.Tensor, xs: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor,
                          row_index: torch.Tensor, block_k: int, out_dtype: torch.dtype) -> torch.Tensor:
    """[M, K] fp8 (with per-group scales xs) x [N, K] block-fp8 weight -> [M, N] in out_dtype."""
    m, k = xq.shape
    n = wq.shape[0]
    if wq.shape[1] != k:
        raise ValueError(f"fp8 matmul: activations have {k} columns, the weight {wq.shape[1]}")
    if not kernel_supports_block_k(block_k):
        raise ValueError(f"fp8 matmul: block_k {block_k} must be a power of two >= 32 (FP8 tl.dot)")
    out = torch.empty(m, n, dtype=out_dtype, device=xq.device)
    block_m = 16 if m <= 16 else (32 if m <= 32 else 64)
    block_n = 64 if n <= 64 else 128
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _w8a8_block_fp8_matmul[grid](xq, wq, out, xs, ws, row_index, m, n, k,
                                 xq.stride(0), xq.stride(1), wq.stride(0), wq.stride(1),
                                 out.stride(0), out.stride(1), xs.stride(0), xs.stride(1),
                                 ws.stride(0), ws.stride(1),
                                 BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    return out


def fp8_block_linear(x: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor, row_index: torch.Tensor,
                     block_k: int) -> torch.Tensor:
    """x [..., K] (any float dtype): quantized per token-group of block_k, then the Triton GEMM."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    xq, xs = per_token_group_quantize(x2, block_k)
    y = w8a8_block_fp8_matmul(xq, xs, wq, ws, row_index, block_k, x.dtype)
    return y.reshape(*lead, y.shape[-1])
