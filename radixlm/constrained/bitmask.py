"""Applying a packed token bitmask (32 tokens per int32, bit set = allowed) to logits.

`apply_bitmask_reference` is the plain-torch reference; the xgrammar backend uses xgrammar's
fused `apply_token_bitmask_inplace`, tested against this one.
"""

from __future__ import annotations

from typing import Sequence

import torch


def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[B, ceil(V/32)] int32 -> [B, V] bool (True = allowed)."""
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    bits = (bitmask.to(torch.int32)[:, :, None] >> shifts) & 1
    return bits.reshape(bitmask.shape[0], -1)[:, :vocab_size].bool()


def apply_bitmask_reference(logits: torch.Tensor, bitmask: torch.Tensor, rows: Sequence[int]) -> None:
    """Sets disallowed tokens of logits[rows] to -inf, reading bitmask[rows]."""
    if not rows:
        return
    idx = torch.tensor(list(rows), device=logits.device)
    allowed = unpack_bitmask(bitmask[idx.to(bitmask.device)].to(logits.device), logits.shape[1])
    logits[idx] = logits[idx].masked_fill(~allowed, float("-inf"))
