"""Vocabulary-parallel embedding and LM head (world size 1 today).

Owns the [vocab, hidden] tables. The vocabulary is split in contiguous ranges across TP ranks;
with one rank the range is the whole vocabulary.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from radixlm.layers import cpu_linear
from radixlm.layers.parallel_state import get_tp_rank, get_tp_size


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
        rows = min(self.per_rank, loaded.shape[0] - self.vocab_start)
        if loaded.shape[1] != param.shape[1]:
            raise ValueError(f"embedding width {loaded.shape[1]} != {param.shape[1]}")
        param.data[:rows].copy_(loaded[self.vocab_start:self.vocab_start + rows])

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if get_tp_size() == 1:
            return F.embedding(input_ids, self.weight)
        raise NotImplementedError("tensor-parallel embedding")  # pragma: no cover


class ParallelLMHead(VocabParallelEmbedding):
    """Projects hidden states to vocabulary logits; shares its table with the embedding when tied."""

    def __init__(self, num_embeddings: int, embedding_dim: int, params_dtype: Optional[torch.dtype] = None):
        super().__init__(num_embeddings, embedding_dim, params_dtype)
        self.cpu_packed_weight: Optional[torch.Tensor] = None  # set by cpu_linear.prepack_model

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return cpu_linear.linear(hidden, self.weight, None, self.cpu_packed_weight)
