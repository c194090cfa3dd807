"""The per-step forward context: what attention layers need to know about the batch.

Owns `ForwardBatch` (positions, KV slots to write, per-request lengths, pools, backend) and the
one explicit piece of ambient state in radixlm: `forward_context(fb)` makes `fb` visible to the
attention layers for the duration of one model forward. Models take only `(input_ids, positions)`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, List, Optional

import torch

from radixlm.core import ForwardMode

if TYPE_CHECKING:
    from radixlm.attention.base import AttentionBackend
    from radixlm.lora.layers import LoRABatchInfo
    from radixlm.mem.kv_pool import MHATokenToKVPool, ReqToTokenPool


@dataclass
class ForwardBatch:
    forward_mode: ForwardMode
    input_ids: torch.Tensor  # [T] tokens computed this step
    positions: torch.Tensor  # [T]
    out_cache_loc: torch.Tensor  # [T] KV slots the new tokens are written to
    req_pool_indices: torch.Tensor  # [B] rows of req_to_token
    seq_lens: torch.Tensor  # [B] prefix + new tokens
    extend_prefix_lens: torch.Tensor  # [B] tokens already in the pool before this step
    extend_seq_lens: torch.Tensor  # [B] new tokens this step (1 for decode)
    seq_lens_cpu: List[int]
    extend_prefix_lens_cpu: List[int]
    extend_seq_lens_cpu: List[int]
    req_to_token_pool: "ReqToTokenPool"
    token_to_kv_pool: "MHATokenToKVPool"
    attn_backend: "AttentionBackend"
    lora: Optional["LoRABatchInfo"] = None  # adapter slot of every row (radixlm/lora/), None: base only

    @property
    def batch_size(self) -> int:
        return len(self.seq_lens_cpu)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def max_seq_len(self) -> int:
        return max(self.seq_lens_cpu)


_current: Optional[ForwardBatch] = None


@contextlib.contextmanager
def forward_context(fb: ForwardBatch) -> Iterator[ForwardBatch]:
    global _current
    prev, _current = _current, fb
    try:
        yield fb
    finally:
        _current = prev


def get_forward_batch() -> ForwardBatch:
    if _current is None:
        raise RuntimeError("attention called outside forward_context(); the model runner sets it for each step")
    return _current
