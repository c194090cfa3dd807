"""Shared helpers for the Triton kernels: interpreter detection and a precision-aware tl.dot."""

from __future__ import annotations

import os

import triton
import triton.language as tl


def _interpret_enabled() -> bool:
    try:
        return bool(triton.knobs.runtime.interpret)
    except AttributeError:  # older triton without knobs
        return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


# Decided when this module is first imported, exactly like @triton.jit decides: kernels decorated
# under TRITON_INTERPRET=1 run on CPU tensors through the interpreter, others compile for the GPU.
INTERPRETED: bool = _interpret_enabled()


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def block_d(head_dim: int) -> int:
    """The padded head dimension a kernel works on: a power of two, at least 16 (tl.dot's minimum)."""
    return max(16, next_pow2(head_dim))


# The interpreter's tl.dot multiplies bf16 operands as their raw uint16 bits (Triton 3.6-3.9), so
# under the interpreter operands are widened to fp32 first: the same products a GPU's bf16 MMA
# accumulates in fp32.
_INTERPRETED_DOT = tl.constexpr(INTERPRETED)


@triton.jit
def dot(a, b, IEEE: tl.constexpr):
    """tl.dot with fp32 inputs kept exact (no TF32) when IEEE is set."""
    if _INTERPRETED_DOT:
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    elif IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


# Loops whose bounds are loaded from memory (a request's prefix or split range) are written
# twice behind the constexpr LOOP_WHILE: `for ... in range(lo, hi, step)` for the compiler (it
# software-pipelines for-loops), a `while` loop under the interpreter (Triton 3.6's interpreter
# cannot take a loaded scalar as a range bound with NumPy >= 2.3). One shared body per loop below.
LOOP_WHILE = tl.constexpr(INTERPRETED)


@triton.jit
def online_softmax_update(q, k, v, keep, m_i, l_i, acc, sm_scale_log2, IEEE: tl.constexpr):
    """One flash-attention step: q [M, BD], k [BD, N], v [N, BD], keep [M, N] (or broadcastable);
    running max m_i [M] / sum l_i [M] (base 2) / acc [M, BD] -> updated (m_i, l_i, acc)."""
    qk = dot(q, k.to(q.dtype), IEEE) * sm_scale_log2
    qk = tl.where(keep, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(qk - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + dot(p.to(q.dtype), v.to(q.dtype), IEEE)
    return m_new, l_i, acc


@triton.jit
def gather_kv_block(start_n, end_n, slot_row, k_head, v_head, stride_kbs, stride_vbs, offs_nb, offs_d, mask_d):
    """Loads K (transposed) and V of the pool slots slot_row[start_n : min(start_n + BLOCK_N, end_n)];
    returns (positions, in-range mask, k, v). slot_row: the request's req_to_token row; k_head/v_head:
    the pool buffers at the kv head."""
    offs_n = start_n + offs_nb
    mask_n = offs_n < end_n
    slots = tl.load(slot_row + offs_n, mask=mask_n, other=0).to(tl.int64)
    k = tl.load(k_head + slots[None, :] * stride_kbs + offs_d[:, None], mask=mask_d[:, None] & mask_n[None, :],
                other=0.0)
    v = tl.load(v_head + slots[:, None] * stride_vbs + offs_d[None, :], mask=mask_n[:, None] & mask_d[None, :],
                other=0.0)
    return offs_n, mask_n, k, v


@triton.jit
def gathered_block(start_n, end_n, q, m_i, l_i, acc, slot_row, k_head, v_head, stride_kbs, stride_vbs,
                   offs_nb, offs_d, mask_d, sm_scale_log2, IEEE: tl.constexpr):
    """Attends q to the pool slots slot_row[start_n : min(start_n + BLOCK_N, end_n)]."""
    offs_n, mask_n, k, v = gather_kv_block(start_n, end_n, slot_row, k_head, v_head, stride_kbs, stride_vbs,
                                           offs_nb, offs_d, mask_d)
    return online_softmax_update(q, k, v, mask_n[None, :], m_i, l_i, acc, sm_scale_log2, IEEE)
