"""Reference FP8 (e4m3) block quantization: plain torch, any device, the ground truth for the kernels.

Owns the published block format (DeepSeek-V3 / Qwen3-FP8 checkpoints): a weight W [N, K] is cut into
blocks of `block = (bn, bk)` rows x columns (the last row/column block may be partial: ceil), each
block stored as float8_e4m3fn values q with one float32 `scale_inv` [ceil(N/bn), ceil(K/bk)], so that
W ~= q * scale_inv blockwise, scale_inv = amax(|block|) / 448 (448 = e4m3's largest finite value).
Activations are quantized the same way per token and group of `group` columns (W8A8, "dynamic").

Round-trip error (`block_quantize` then `block_dequantize`), per element x of a block with scale s:
|x - x'| <= max(|x| * 2**-4, s * 2**-10): e4m3 keeps 3 mantissa bits (round to nearest: half an ulp is
2**-4 of the value) for normal numbers; below e4m3's smallest normal (2**-6, in units of s) the step is
2**-9, so the absolute error is at most 2**-10 * s. tests/test_fp8.py checks this bound.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
_EPS = 1e-12  # floor of amax: an all-zero block gets a tiny positive scale, never 0 or NaN


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pad_to(x: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    return F.pad(x, (0, cols - x.shape[1], 0, rows - x.shape[0])) if (rows, cols) != tuple(x.shape) else x


def block_quantize(w: torch.Tensor, block: Sequence[int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """W [N, K] (any float dtype) -> (q [N, K] float8_e4m3fn, scale_inv [ceil(N/bn), ceil(K/bk)] float32)."""
    if w.dim() != 2:
        raise ValueError(f"block_quantize takes a 2-D weight, got shape {tuple(w.shape)}")
    bn, bk = int(block[0]), int(block[1])
    n, k = w.shape
    nb, kb = cdiv(n, bn), cdiv(k, bk)
    x = _pad_to(w.float(), nb * bn, kb * bk).reshape(nb, bn, kb, bk)
    amax = x.abs().amax(dim=(1, 3)).clamp_min(_EPS)  # [nb, kb]
    scale = amax / FP8_MAX
    q = (x / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q.view(nb * bn, kb * bk)[:n, :k].contiguous(), scale.contiguous()


def scale_row_index(piece_rows: Sequence[int], bn: int, device=None) -> torch.Tensor:
    """For a weight packed from pieces of `piece_rows` rows (q/k/v, gate/up), each with its own scale
    rows (ceil(rows/bn) each, stacked in the same order): the scale row of every weight row [N] int64."""
    out, base = [], 0
    for rows in piece_rows:
        out.append(base + torch.arange(rows, device=device) // bn)
        base += cdiv(rows, bn)
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long, device=device)


def block_dequantize(q: torch.Tensor, scale_inv: torch.Tensor, block: Sequence[int],
                     dtype: torch.dtype = torch.float32, row_index: Optional[torch.Tensor] = None) -> torch.Tensor:
    """q [N, K] fp8 and scale_inv -> q * scale_inv blockwise, computed in float32, returned in `dtype`.
    `row_index` [N]: each row's scale row (packed weights, see scale_row_index); default row // bn."""
    bn, bk = int(block[0]), int(block[1])
    n, k = q.shape
    if row_index is None and n % bn == 0 and k % bk == 0:  # whole blocks: broadcast, no [N, K] scale tensor
        w = q.view(n // bn, bn, k // bk, bk).to(torch.float32)
        return w.mul_(scale_inv.float()[:, None, :, None]).view(n, k).to(dtype)
    if row_index is None:
        row_index = torch.arange(n, device=q.device) // bn
    s = scale_inv.float().index_select(0, row_index).repeat_interleave(bk, dim=1)[:, :k]
    return (q.to(torch.float32) * s).to(dtype)


def per_token_group_quantize(x: torch.Tensor, group: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Activations x [M, K] -> (q [M, K] fp8, scale [M, ceil(K/group)] float32): each token's groups of
    `group` columns (the last one partial) scaled by their own amax / 448."""
    m, k = x.shape
    g = cdiv(k, group)
    xp = _pad_to(x.float(), m, g * group).reshape(m, g, group)
    scale = xp.abs().amax(dim=2).clamp_min(_EPS) / FP8_MAX
    q = (xp / scale[:, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q.view(m, g * group)[:, :k].contiguous(), scale


def w8a8_block_matmul_ref(x: torch.Tensor, q: torch.Tensor, scale_inv: torch.Tensor, block: Sequence[int],
                          row_index: Optional[torch.Tensor] = None,
                          out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """What the FP8 GEMM kernel computes: x [M, K] quantized per token-group of bk, times the block-FP8
    weight q [N, K] transposed, in float32 -> [M, N] in `out_dtype` (default x.dtype)."""
    bk = int(block[1])
    xq, xs = per_token_group_quantize(x, bk)
    xd = (xq.float() * xs.repeat_interleave(bk, dim=1)[:, :x.shape[1]])
    w = block_dequantize(q, scale_inv, block, torch.float32, row_index)
    return (xd @ w.t()).to(out_dtype or x.dtype)
