"""The schedule rank 0 sends the other tensor-parallel ranks, and the followers' loop.

Rank 0 runs the Scheduler as with one rank; its ModelRunner, before each forward, broadcasts what
the other ranks need to run the same forward (one int64 tensor over the gloo cpu group, see
distributed/parallel_state.py): the step's tokens, positions, KV slots and lengths, and the rows of
the request-to-token table those requests use (up to their seq_len). A follower keeps its own
`req_to_token` (it copies those rows in) and its own shard of the KV pool, runs `forward` only and
never samples: the LM head all-gathers the logits, rank 0 samples. Prompt logprobs ask for more
logits of the same step (OP_LOGITS, the hidden rows to project).

Messages (int64): [OP_FORWARD, mode, B, T, ids[T], positions[T], out_cache_loc[T],
req_pool_indices[B], seq_lens[B], prefix_lens[B], extend_lens[B], rows[sum(seq_lens)]];
[OP_LOGITS, hidden row indices...]; [OP_STOP].
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, List

import torch

from radixlm.attention.forward_context import ForwardBatch
from radixlm.core import ForwardMode
from radixlm.distributed.parallel_state import broadcast_from_leader

if TYPE_CHECKING:
    from radixlm.engine.model_runner import ModelRunner

logger = logging.getLogger(__name__)

OP_FORWARD, OP_LOGITS, OP_STOP = 1, 2, 3
_MODES = [ForwardMode.EXTEND, ForwardMode.DECODE]


def _row_mask(seq_lens: torch.Tensor) -> torch.Tensor:
    width = int(seq_lens.max()) if seq_lens.numel() else 0
    return torch.arange(width)[None, :] < seq_lens[:, None]


def encode_forward(fb: ForwardBatch) -> torch.Tensor:
    """The step as one CPU int64 tensor (rank 0)."""
    cpu = [t.detach().to("cpu", torch.int64) for t in (fb.input_ids, fb.positions, fb.out_cache_loc,
                                                        fb.req_pool_indices, fb.seq_lens, fb.extend_prefix_lens,
                                                        fb.extend_seq_lens)]
    seq_lens, rpi = cpu[4], cpu[3]
    mask = _row_mask(seq_lens)
    table = fb.req_to_token_pool.req_to_token
    rows = table[rpi.to(table.device), :mask.shape[1]].to("cpu", torch.int64)[mask]
    head = torch.tensor([OP_FORWARD, _MODES.index(fb.forward_mode), fb.batch_size, fb.num_tokens],
                        dtype=torch.int64)
    return torch.cat([head, *cpu, rows])


def decode_forward(msg: torch.Tensor, runner: "ModelRunner") -> ForwardBatch:
    """A follower's ForwardBatch for rank 0's step; copies the step's table rows into its own table."""
    mode, b, t = (int(x) for x in msg[1:4])
    sizes = [t, t, t, b, b, b, b]
    parts = list(torch.split(msg[4:4 + 3 * t + 4 * b], sizes))
    rows = msg[4 + 3 * t + 4 * b:]
    ids, positions, loc, rpi, seq_lens, prefix, extend = parts
    dev = runner.device
    table = runner.req_to_token_pool.req_to_token
    mask = _row_mask(seq_lens)
    width = mask.shape[1]
    if width:
        idx = rpi.to(table.device)
        block = table[idx, :width]
        block[mask.to(table.device)] = rows.to(table.device, table.dtype)
        table[idx, :width] = block
    return ForwardBatch(
        forward_mode=_MODES[mode], input_ids=ids.to(dev), positions=positions.to(dev), out_cache_loc=loc.to(dev),
        req_pool_indices=rpi.to(dev), seq_lens=seq_lens.to(dev), extend_prefix_lens=prefix.to(dev),
        extend_seq_lens=extend.to(dev), seq_lens_cpu=seq_lens.tolist(), extend_prefix_lens_cpu=prefix.tolist(),
        extend_seq_lens_cpu=extend.tolist(), req_to_token_pool=runner.req_to_token_pool,
        token_to_kv_pool=runner.token_to_kv_pool, attn_backend=runner.attn_backend)


def send_forward(fb: ForwardBatch) -> None:
    broadcast_from_leader(encode_forward(fb))


def send_logits(indices: torch.Tensor) -> None:
    broadcast_from_leader(torch.cat([torch.tensor([OP_LOGITS]), indices.detach().to("cpu", torch.int64)]))


def send_stop() -> None:
    broadcast_from_leader(torch.tensor([OP_STOP], dtype=torch.int64))


@torch.inference_mode()
def run_follower(runner: "ModelRunner") -> None:
    """A follower rank's main loop: runs every forward rank 0 sends until OP_STOP (or until the
    group fails: a dead rank 0 raises here at once)."""
    hidden = None
    steps = 0
    while True:
        msg = broadcast_from_leader(None)
        op = int(msg[0])
        if op == OP_STOP:
            logger.info("tensor-parallel follower stops after %d steps", steps)
            return
        if op == OP_FORWARD:
            _, hidden = runner.run_forward_batch(decode_forward(msg, runner))
            steps += 1
        elif op == OP_LOGITS:
            if hidden is None:
                raise RuntimeError("OP_LOGITS before any forward")
            runner.model.compute_logits(hidden[msg[1:].to(hidden.device)])
        else:
            raise RuntimeError(f"unknown tensor-parallel op {op}")


def follower_ranks(tp_size: int, nnodes: int, node_rank: int) -> List[int]:
    """The ranks this node runs besides rank 0's scheduler (all of its ranks on nodes other than 0)."""
    per_node = tp_size // nnodes
    first = node_rank * per_node
    return [r for r in range(first, first + per_node) if r != 0]
