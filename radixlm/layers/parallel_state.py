"""Tensor-parallel topology. radixlm runs one rank today; layers ask here so that TP can be added
without touching them. Owns the (rank, size) pair and nothing else."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TPGroup:
    rank: int = 0
    size: int = 1


_GROUP = TPGroup()


def get_tp_rank() -> int:
    return _GROUP.rank


def get_tp_size() -> int:
    return _GROUP.size
