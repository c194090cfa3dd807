"""The batched LoRA delta of one (packed) linear layer: S-LoRA / Punica style segmented GEMM.

Shapes: x [T, in]; slot buffers A [S, P*R, in] (piece p's A in rows p*R..(p+1)*R, zero-padded to
R = --max-lora-rank) and B [S, out, R] (scaling folded in); `pieces` = [(out offset, out size)] of
the P packed outputs (q/k/v, gate/up, or one). Row i of the batch uses slot `row_slots[i]` (-1: the
base model, no delta). For piece p: delta[i, piece p] = B[s, piece p] @ (A[s, p] @ x[i]).

* `lora_delta_reference`: the plain per-row loop (tests only).
* `lora_delta_grouped`: the CPU fast path: the rows of each adapter gathered, shrunk with A in one
  matmul, expanded with each piece's B, and added back (`index_add_`).
* lora/triton_ops.py: the same as two segmented Triton kernels (CUDA; tested under the interpreter).
"""

from __future__ import annotations

from typing import List, Sequence, Tuple, Union

import torch

Pieces = Sequence[Tuple[int, int]]


def lora_delta_reference(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, pieces: Pieces,
                         row_slots: Sequence[int]) -> torch.Tensor:
    """The delta [T, out] computed row by row (float32)."""
    R = B.shape[2]
    out = torch.zeros(x.shape[0], B.shape[1], dtype=torch.float32, device=x.device)
    for i, s in enumerate(row_slots):
        if s < 0:
            continue
        xi = x[i].float()
        for p, (off, size) in enumerate(pieces):
            h = A[s, p * R:(p + 1) * R].float() @ xi
            out[i, off:off + size] = B[s, off:off + size].float() @ h
    return out


def lora_delta_grouped(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, pieces: Pieces,
                       groups: List[Tuple[int, Union[torch.Tensor, slice]]], out: torch.Tensor) -> torch.Tensor:
    """Adds the delta into `out` [T, out]; `groups` = [(slot, its rows)] of the adapters in the batch,
    the rows as int64 indices (gathered and scattered back) or one contiguous range (sliced)."""
    R = B.shape[2]
    for slot, rows in groups:
        xs = x[rows] if isinstance(rows, slice) else x.index_select(0, rows)
        h = xs @ A[slot].t()  # shrink: [n, P*R]
        parts = [h[:, p * R:(p + 1) * R] @ B[slot, off:off + size].t() for p, (off, size) in enumerate(pieces)]
        d = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        if isinstance(rows, slice):
            out[rows] += d
        else:
            out.index_add_(0, rows, d)
    return out
