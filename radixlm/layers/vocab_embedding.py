"""Vocabulary-parallel embedding and LM head.

Owns the [vocab, hidden] tables. The vocabulary is split in contiguous ranges of
ceil(vocab / tp) rows across the TP ranks (the last range padded with zero rows); with one rank
the range is the whole vocabulary. The embedding looks up the ids in this rank's range (zeros for
the others) and all-reduces; the LM head computes this rank's slice of the logits and all-gathers
them (padding columns cut off), so every rank ends with the full [T, vocab] logits.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from radixlm.distributed.parallel_state import get_tp_rank, get_tp_size, tp_all_gather, tp_all_reduce
from radixlm.layers import cpu_linear


class VocabParallelEmbedding(nn.Module):
    def __init__(self, num_embeddings: int, embedding_dim: int, params_dtype: Optional[torch.dtype] = None):
        super().__init__()
        tp = get_tp_size()
        self.num_embeddings = num_embeddings
        self.per_rank = (num_embeddings + tp - 1) // tp
        self.vocab_start = get_tp_rank() * self.per_rank
        self.weight = nn.Parameter(torch.empty(self.per_rank, embedding_dim,
                                               dtype=params_dtype or torch.get_default_dtype()),
                                   requires_grad=False)
        self.weight.weight_loader = self.weight_loader  # type: ignore[attr-defined]

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        if loaded.shape[1] != param.shape[1]:
            raise ValueError(f"embedding width {loaded.shape[1]} != {param.shape[1]}")
        if loaded.shape[0] != self.num_embeddings:
            raise ValueError(f"embedding has {loaded.shape[0]} rows, the config's vocab_size is {self.num_embeddings}")
        rows = max(0, min(self.per_rank, loaded.shape[0] - self.vocab_start))
        param.data[:rows].copy_(loaded[self.vocab_start:self.vocab_start + rows])
        param.data[rows:].zero_()  # padding rows of the last range

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if get_tp_size() == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.vocab_start
        outside = (local < 0) | (local >= self.per_rank)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out.masked_fill_(outside[:, None], 0.0)
        return tp_all_reduce(out)


class ParallelLMHead(VocabParallelEmbedding):
    """Projects hidden states to vocabulary logits; shares its table with the embedding when tied."""

    def __init__(self, num_embeddings: int, embedding_dim: int, params_dtype: Optional[torch.dtype] = None):
        super().__init__(num_embeddings, embedding_dim, params_dtype)
        self.cpu_packed_weight: Optional[torch.Tensor] = None  # set by cpu_linear.prepack_model
        self.cpu_packed_key: Optional[int] = None

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = cpu_linear.linear(hidden, self.weight, None, self.cpu_packed_weight, self.cpu_packed_key)
        if get_tp_size() == 1:
            return logits
        return tp_all_gather(logits, dim=-1)[..., :self.num_embeddings]
