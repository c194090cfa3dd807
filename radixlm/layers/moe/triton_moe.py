"""Fused MoE with a Triton grouped GEMM: the CUDA runner (`--moe-runner-backend triton`).

Flow, for T tokens routed to k experts each (T*k (token, slot) pairs, pair p = t*k + j):
  1. `align_block_size` (torch ops, no host sync, so CUDA-graph capturable): the pairs sorted by
     expert, each expert's run padded to a multiple of BLOCK_M with the sentinel T*k; per block of
     BLOCK_M sorted entries, its expert; and the padded total.
  2. `_moe_gemm_kernel` over w13: row p of c1 [T*k, 2I] = x[p // k] @ w13[e]^T; one program per
     (block of BLOCK_M pairs of one expert, tile of BLOCK_N outputs), blocks past the padded total
     return at once.
  3. silu(gate) * up in torch -> [T*k, I].
  4. `_moe_gemm_kernel` over w2 with the routing weight multiplied in (float32): c3 [T*k, H].
  5. out[t] = sum_j c3[t*k + j], cast to x's dtype.
The reference is `fused_moe.moe_reference`; `tests/test_moe.py` compares them on CPU under
TRITON_INTERPRET=1 (set before triton is imported) and on CUDA when present.
"""

from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from radixlm.attention.triton_kernels.common import INTERPRETED, dot, next_pow2


def moe_config(num_pairs: int, n: int, k: int, interpreted: bool = INTERPRETED) -> dict:
    """Launch parameters: interpreted, big tiles (each program costs Python time); on the GPU a small
    BLOCK_M for decode-sized batches (few pairs per expert), a bigger one for prefill."""
    if interpreted:
        return dict(BLOCK_M=16, BLOCK_N=min(128, max(16, next_pow2(n))), BLOCK_K=min(128, max(16, next_pow2(k))),
                    num_warps=4)
    block_m = 16 if num_pairs <= 256 else 64
    return dict(BLOCK_M=block_m, BLOCK_N=64, BLOCK_K=64, num_warps=4)


def align_block_size(topk_ids: torch.Tensor, num_experts: int, block_m: int
                     ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sorted pair ids [max_len] int32 with sentinel T*k in the padding, expert of each block
    [max_len // block_m] int32, padded total [1] int32); max_len bounds the padded total from T*k
    and E alone, so the shapes do not depend on the routing."""
    flat = topk_ids.reshape(-1).long()
    n, dev = flat.numel(), flat.device
    counts = torch.zeros(num_experts, dtype=torch.long, device=dev).scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    ends = torch.cumsum(padded, 0)
    order = torch.argsort(flat, stable=True)
    sorted_e = flat[order]
    rank = torch.arange(n, device=dev) - (torch.cumsum(counts, 0) - counts)[sorted_e]
    dest = (ends - padded)[sorted_e] + rank
    max_len = triton.cdiv(n + num_experts * (block_m - 1), block_m) * block_m
    sorted_ids = torch.full((max_len,), n, dtype=torch.int32, device=dev)
    sorted_ids[dest] = order.to(torch.int32)
    block_starts = torch.arange(0, max_len, block_m, device=dev)
    block_expert = torch.searchsorted(ends, block_starts, right=True).clamp_(max=num_experts - 1)
    return sorted_ids, block_expert.to(torch.int32), ends[-1:].to(torch.int32)


@triton.jit
def _moe_gemm_kernel(a_ptr, b_ptr, c_ptr, w_ptr, sorted_ids_ptr, block_expert_ptr, num_padded_ptr,
                     N, K, num_pairs, stride_am, stride_be, stride_bn, stride_bk, stride_cm,
                     TOP_K: tl.constexpr, MUL_WEIGHT: tl.constexpr, IEEE: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """c[p, n] = (w[p] *) sum_k a[p // TOP_K, k] * b[e, n, k] for the pairs p of one block (expert e)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
        return
    pairs = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    valid = pairs < num_pairs
    rows = tl.where(valid, pairs // TOP_K, 0).to(tl.int64)
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    b_base = b_ptr + expert * stride_be + offs_n[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        a = tl.load(a_ptr + rows[:, None] * stride_am + kk[None, :], mask=valid[:, None] & (kk[None, :] < K),
                    other=0.0)
        b = tl.load(b_base + kk[:, None] * stride_bk, mask=(offs_n[None, :] < N) & (kk[:, None] < K), other=0.0)
        acc += dot(a, b.to(a.dtype), IEEE)
    if MUL_WEIGHT:
        acc = acc * tl.load(w_ptr + pairs, mask=valid, other=0.0).to(tl.float32)[:, None]
    out_rows = tl.where(valid, pairs, 0).to(tl.int64)
    tl.store(c_ptr + out_rows[:, None] * stride_cm + offs_n[None, :], acc.to(c_ptr.dtype.element_ty),
             mask=valid[:, None] & (offs_n[None, :] < N))


def _gemm(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, weights: torch.Tensor, sorted_ids, block_expert,
          num_padded, top_k: int, mul_weight: bool, cfg: dict) -> None:
    n, k = b.shape[1], b.shape[2]
    grid = (block_expert.numel(), triton.cdiv(n, cfg["BLOCK_N"]))
    _moe_gemm_kernel[grid](a, b, c, weights, sorted_ids, block_expert, num_padded,
                           n, k, c.shape[0], a.stride(0), b.stride(0), b.stride(1), b.stride(2), c.stride(0),
                           TOP_K=top_k, MUL_WEIGHT=mul_weight, IEEE=a.dtype == torch.float32, **cfg)


def fused_moe_triton(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                     topk_ids: torch.Tensor) -> torch.Tensor:
    """Same contract as fused_moe.moe_reference: [T, H] in x's dtype."""
    num_tokens, top_k = topk_ids.shape
    num_experts, two_inter, hidden = w13.shape
    if x.shape[1] != hidden or w2.shape != (num_experts, hidden, two_inter // 2):
        raise ValueError(f"shape mismatch: x {tuple(x.shape)}, w13 {tuple(w13.shape)}, w2 {tuple(w2.shape)}")
    x, w13, w2 = x.contiguous(), w13.contiguous(), w2.contiguous()
    pairs = num_tokens * top_k
    cfg = moe_config(pairs, max(two_inter, hidden), max(hidden, two_inter // 2))
    sorted_ids, block_expert, num_padded = align_block_size(topk_ids, num_experts, cfg["BLOCK_M"])
    weights = topk_weights.reshape(-1).float().contiguous()
    c1 = torch.empty(pairs, two_inter, dtype=x.dtype, device=x.device)
    _gemm(x, w13, c1, weights, sorted_ids, block_expert, num_padded, top_k, False, cfg)
    inter = two_inter // 2
    act = (F.silu(c1[:, :inter]) * c1[:, inter:]).contiguous()
    c3 = torch.empty(pairs, hidden, dtype=torch.float32, device=x.device)
    _gemm(act, w2, c3, weights, sorted_ids, block_expert, num_padded, 1, True, cfg)
    return c3.view(num_tokens, top_k, hidden).sum(dim=1).to(x.dtype)
