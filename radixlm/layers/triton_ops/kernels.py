"""Triton kernels for RMSNorm (optionally fused with the residual add), SiLU-and-mul and NeoX rotary
embedding, with their launch wrappers and launch configurations.

Each kernel reads its inputs once and writes each output once, in float32 math with the casts of
its torch reference (the layer's `forward_native`), so float32 results agree to rounding and
bf16/fp16 results round at the same points:
  rmsnorm:   y = weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype)       (output: promote(x, weight))
             with a residual: s = (x + residual).to(x.dtype) is stored and normalised.
  silu_and_mul over [gate, up]: (silu(gate).to(dtype) * up).to(dtype)
  rotary:    cos/sin rows cast to q.dtype; out = (x * cos).to(dtype) + (rotate_half(x) * sin).to(dtype)
Row/column blocks are contiguous in the last dimension (coalesced loads and stores).

Importing this module imports triton and decorates the kernels: on a machine without a GPU,
TRITON_INTERPRET=1 must be set before the first import to run them on CPU tensors (tests only).
The `*_config` functions are the launch parameters; `compile_check` compiles exactly them.
"""

from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl

# Decided at import, like @triton.jit decides: interpreted kernels take CPU tensors, others CUDA ones.
from radixlm.attention.triton_kernels.common import INTERPRETED, next_pow2  # noqa: E402


# ------------------------------------------------------------------------------------ configs
# Interpreted: big tiles, few programs (each program costs Python time). GPU: ~2K elements per program.
def norm_config(n: int, interpreted: bool = INTERPRETED) -> dict:
    block_n = next_pow2(n)
    if interpreted:
        return dict(BLOCK_N=block_n, ROWS=max(1, 4096 // block_n), num_warps=4)
    rows = max(1, min(16, 2048 // block_n))
    return dict(BLOCK_N=block_n, ROWS=rows, num_warps=min(16, max(4, rows * block_n // 512)))


def act_config(d: int, interpreted: bool = INTERPRETED) -> dict:
    if interpreted:
        block = next_pow2(d)
        return dict(BLOCK=block, ROWS=max(1, 4096 // block), num_warps=4)
    block = min(next_pow2(d), 1024)
    return dict(BLOCK=block, ROWS=max(1, 2048 // block), num_warps=4)


def rope_config(num_q_heads: int, num_kv_heads: int, head_dim: int, interpreted: bool = INTERPRETED) -> dict:
    block_half = next_pow2(head_dim // 2)
    if interpreted:
        block_h = next_pow2(max(num_q_heads, num_kv_heads))
    else:
        block_h = min(next_pow2(min(num_q_heads, num_kv_heads)), max(1, 1024 // block_half))
    # warps so that a thread holds >= 8 elements of each half (128-bit accesses in bf16)
    num_warps = 4 if interpreted else max(1, min(4, block_h * block_half // 256))
    return dict(BLOCK_H=block_h, BLOCK_HALF=block_half, Q_BLOCKS=triton.cdiv(num_q_heads, block_h),
                num_warps=num_warps)


# ------------------------------------------------------------------------------------ RMSNorm
@triton.jit
def _rmsnorm_kernel(X, Res, W, Out, ResOut, num_rows, inner, stride_x0, stride_x1, stride_r, stride_o, stride_ro,
                    eps, N: tl.constexpr, HAS_RES: tl.constexpr, BLOCK_N: tl.constexpr, ROWS: tl.constexpr):
    """ROWS rows of N per program. Row i of x sits at (i // inner) * stride_x0 + (i % inner) * stride_x1
    (a [T, H, N] view with any T/H strides, or [T, N] with inner = 1); the other tensors are [rows, N]."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_N)
    mask_c = cols < N
    mask = (rows < num_rows)[:, None] & mask_c[None, :]
    x_row = (rows // inner) * stride_x0 + (rows % inner) * stride_x1
    x = tl.load(X + x_row[:, None] + cols[None, :], mask=mask, other=0.0)
    if HAS_RES:
        r = tl.load(Res + rows[:, None] * stride_r + cols[None, :], mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(X.dtype.element_ty)  # the reference's x + residual
        tl.store(ResOut + rows[:, None] * stride_ro + cols[None, :], x, mask=mask)
    xf = x.to(tl.float32)
    var = tl.sum(xf * xf, axis=1) / N
    normed = (xf * tl.rsqrt(var + eps)[:, None]).to(X.dtype.element_ty).to(tl.float32)
    w = tl.load(W + cols, mask=mask_c, other=0.0).to(tl.float32)
    tl.store(Out + rows[:, None] * stride_o + cols[None, :], (normed * w[None, :]).to(Out.dtype.element_ty),
             mask=mask)


def _as_rows(x: torch.Tensor, n: int) -> torch.Tensor:
    """x as [rows, n] with unit stride inside a row (a view when possible)."""
    x = x.reshape(-1, n)
    return x if x.stride(1) == 1 or x.shape[0] == 0 else x.contiguous()


def _check_norm(x: torch.Tensor, weight: torch.Tensor) -> int:
    n = weight.numel()
    if x.shape[-1] != n:
        raise ValueError(f"rmsnorm: x's last dimension is {x.shape[-1]}, the weight has {n} elements")
    if x.is_cuda == INTERPRETED:
        raise RuntimeError(f"rmsnorm kernels were decorated {'for the interpreter' if INTERPRETED else 'for CUDA'} "
                           f"but got a {x.device.type} tensor (TRITON_INTERPRET must be set before import on CPU)")
    return n


def _launch_norm(x_args, res, weight, out, res_out, num_rows, eps, n):
    cfg = norm_config(n)
    x, inner, sx0, sx1 = x_args
    grid = (triton.cdiv(num_rows, cfg["ROWS"]),)
    has_res = res is not None
    _rmsnorm_kernel[grid](x, res if has_res else x, weight, out, res_out if has_res else out, num_rows, inner,
                          sx0, sx1, res.stride(0) if has_res else 0, out.stride(0),
                          res_out.stride(0) if has_res else 0, float(eps),
                          N=n, HAS_RES=has_res, BLOCK_N=cfg["BLOCK_N"], ROWS=cfg["ROWS"], num_warps=cfg["num_warps"])


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x: [..., N] (a strided [T, H, N] view is read in place); weight: [N]. Returns a new contiguous
    tensor of x's shape in promote(x.dtype, weight.dtype), like RMSNorm.forward_native(x)."""
    n = _check_norm(x, weight)
    out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    if x.numel() == 0:
        return out
    if x.dim() == 3 and x.stride(2) == 1:
        x_args = (x, x.shape[1], x.stride(0), x.stride(1))
    else:
        x = _as_rows(x, n)
        x_args = (x, 1, x.stride(0), 0)
    _launch_norm(x_args, None, weight, out.view(-1, n), None, out.numel() // n, eps, n)
    return out


def fused_add_rmsnorm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                      eps: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """(rmsnorm(x + residual), x + residual) in one pass, like RMSNorm.forward_native(x, residual).
    x and residual: same shape and dtype; both outputs are new tensors (the inputs are not written)."""
    n = _check_norm(x, weight)
    if residual.shape != x.shape or residual.dtype != x.dtype:
        raise ValueError(f"fused_add_rmsnorm: residual {tuple(residual.shape)} {residual.dtype} does not match "
                         f"x {tuple(x.shape)} {x.dtype}")
    out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    new_res = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x.numel() == 0:
        return out, new_res
    x2 = _as_rows(x, n)
    _launch_norm((x2, 1, x2.stride(0), 0), _as_rows(residual, n), weight, out.view(-1, n), new_res.view(-1, n),
                 x2.shape[0], eps, n)
    return out, new_res


# ------------------------------------------------------------------------------------ SiLU and mul
@triton.jit
def _silu_and_mul_kernel(X, Out, num_rows, stride_x, stride_o,
                         D: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr):
    """out[i, c] = silu(x[i, c]) * x[i, D + c] for ROWS rows and BLOCK columns per program."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = (rows < num_rows)[:, None] & (cols < D)[None, :]
    gate_ptr = X + rows[:, None] * stride_x + cols[None, :]
    gate = tl.load(gate_ptr, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gate_ptr + D, mask=mask, other=0.0).to(tl.float32)
    act = (gate / (1.0 + tl.exp(-gate))).to(Out.dtype.element_ty).to(tl.float32)
    tl.store(Out + rows[:, None] * stride_o + cols[None, :], (act * up).to(Out.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x: [..., 2d] packed [gate, up] -> [..., d] new tensor, like SiluAndMul.forward_native(x)."""
    if x.shape[-1] % 2:
        raise ValueError(f"silu_and_mul: last dimension {x.shape[-1]} is not even")
    if x.is_cuda == INTERPRETED:
        raise RuntimeError(f"silu_and_mul kernel was decorated {'for the interpreter' if INTERPRETED else 'for CUDA'}"
                           f" but got a {x.device.type} tensor")
    d = x.shape[-1] // 2
    out = torch.empty((*x.shape[:-1], d), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    x2 = _as_rows(x, 2 * d)
    out2 = out.view(-1, d)
    cfg = act_config(d)
    grid = (triton.cdiv(x2.shape[0], cfg["ROWS"]), triton.cdiv(d, cfg["BLOCK"]))
    _silu_and_mul_kernel[grid](x2, out2, x2.shape[0], x2.stride(0), out2.stride(0),
                               D=d, BLOCK=cfg["BLOCK"], ROWS=cfg["ROWS"], num_warps=cfg["num_warps"])
    return out


# ------------------------------------------------------------------------------------ rotary
@triton.jit
def _rope_heads(Src, Dst, t, h0, stride_st, stride_sh, stride_dt, stride_dh, c1, c2, s1, s2,
                NH: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """Rotates heads [h0, h0 + BLOCK_H) of token t: (x1, x2) -> (x1 c1 - x2 s1, x2 c2 + x1 s2), rounding
    each product to the output dtype as the reference's `x * cos + rotate_half(x) * sin` does."""
    heads = h0 + tl.arange(0, BLOCK_H)
    offs = tl.arange(0, BLOCK_HALF)
    mask = (heads < NH)[:, None] & (offs < HALF)[None, :]
    src = Src + t * stride_st + heads[:, None] * stride_sh + offs[None, :]
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
    dt = Dst.dtype.element_ty
    o1 = (x1 * c1[None, :]).to(dt).to(tl.float32) + (-x2 * s1[None, :]).to(dt).to(tl.float32)
    o2 = (x2 * c2[None, :]).to(dt).to(tl.float32) + (x1 * s2[None, :]).to(dt).to(tl.float32)
    dst = Dst + t * stride_dt + heads[:, None] * stride_dh + offs[None, :]
    tl.store(dst, o1.to(dt), mask=mask)
    tl.store(dst + HALF, o2.to(dt), mask=mask)


@triton.jit
def _rope_kernel(Positions, Q, K, QOut, KOut, Cos, Sin,
                 stride_qt, stride_qh, stride_kt, stride_kh, stride_qot, stride_qoh, stride_kot, stride_koh,
                 stride_cos, stride_sin,
                 HQ: tl.constexpr, HK: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr,
                 BLOCK_HALF: tl.constexpr, Q_BLOCKS: tl.constexpr):
    """Grid (T, Q_BLOCKS + K_BLOCKS): token t, a block of BLOCK_H q heads or (after Q_BLOCKS) k heads."""
    t = tl.program_id(0).to(tl.int64)
    hb = tl.program_id(1)
    pos = tl.load(Positions + t).to(tl.int64)
    offs = tl.arange(0, BLOCK_HALF)
    m = offs < HALF
    dt = QOut.dtype.element_ty  # the reference casts the table rows to q's dtype (for k too)
    cos = Cos + pos * stride_cos + offs
    sin = Sin + pos * stride_sin + offs
    c1 = tl.load(cos, mask=m, other=0.0).to(dt).to(tl.float32)
    c2 = tl.load(cos + HALF, mask=m, other=0.0).to(dt).to(tl.float32)
    s1 = tl.load(sin, mask=m, other=0.0).to(dt).to(tl.float32)
    s2 = tl.load(sin + HALF, mask=m, other=0.0).to(dt).to(tl.float32)
    if hb < Q_BLOCKS:
        _rope_heads(Q, QOut, t, hb * BLOCK_H, stride_qt, stride_qh, stride_qot, stride_qoh, c1, c2, s1, s2,
                    HQ, HALF, BLOCK_H, BLOCK_HALF)
    else:
        _rope_heads(K, KOut, t, (hb - Q_BLOCKS) * BLOCK_H, stride_kt, stride_kh, stride_kot, stride_koh,
                    c1, c2, s1, s2, HK, HALF, BLOCK_H, BLOCK_HALF)


def _heads_view(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def rotary_embedding(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_cache: torch.Tensor,
                     sin_cache: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """positions: [T] (int64 or int32, any order); q: [T, Hq, D], k: [T, Hk, D] (same dtype; strided
    views such as a qkv split are read in place); cos_cache/sin_cache: [max_position, D] (any float
    dtype). Returns new contiguous rotated (q, k), like RotaryEmbedding.forward_native."""
    if q.dim() != 3 or k.dim() != 3 or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2] \
            or positions.shape != (q.shape[0],):
        raise ValueError(f"rotary_embedding: expected positions [T], q [T, Hq, D], k [T, Hk, D]; got "
                         f"{tuple(positions.shape)}, {tuple(q.shape)}, {tuple(k.shape)}")
    if k.dtype != q.dtype:
        raise ValueError(f"rotary_embedding: q is {q.dtype} but k is {k.dtype}")
    d = q.shape[2]
    if d % 2 or cos_cache.shape[-1] != d or sin_cache.shape[-1] != d:
        raise ValueError(f"rotary_embedding: head_dim {d} must be even and match the cos/sin tables "
                         f"({cos_cache.shape[-1]}, {sin_cache.shape[-1]})")
    if q.is_cuda == INTERPRETED:
        raise RuntimeError(f"rotary kernel was decorated {'for the interpreter' if INTERPRETED else 'for CUDA'} "
                           f"but got a {q.device.type} tensor")
    q, k, positions = _heads_view(q), _heads_view(k), positions.contiguous()
    cos_cache, sin_cache = _heads_view(cos_cache), _heads_view(sin_cache)
    q_out, k_out = torch.empty(q.shape, dtype=q.dtype, device=q.device), torch.empty(k.shape, dtype=k.dtype,
                                                                                     device=k.device)
    t, hq, hk = q.shape[0], q.shape[1], k.shape[1]
    if t == 0 or hq == 0 or hk == 0:
        return q_out, k_out
    cfg = rope_config(hq, hk, d)
    grid = (t, cfg["Q_BLOCKS"] + triton.cdiv(hk, cfg["BLOCK_H"]))
    _rope_kernel[grid](positions, q, k, q_out, k_out, cos_cache, sin_cache,
                       q.stride(0), q.stride(1), k.stride(0), k.stride(1), q_out.stride(0), q_out.stride(1),
                       k_out.stride(0), k_out.stride(1), cos_cache.stride(0), sin_cache.stride(0),
                       HQ=hq, HK=hk, HALF=d // 2, BLOCK_H=cfg["BLOCK_H"], BLOCK_HALF=cfg["BLOCK_HALF"],
                       Q_BLOCKS=cfg["Q_BLOCKS"], num_warps=cfg["num_warps"])
    return q_out, k_out
