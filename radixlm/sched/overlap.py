"""Overlap scheduling: the model computes decode step N+1 while the scheduler processes step N.

Owns the forward worker (one thread that runs the model runner's steps in submission order), the
record of the step in flight, and `Overlap`: chaining the next decode step onto the one in flight,
and waiting for a step and settling its zombies. `Scheduler.step` with `enable_overlap` uses them
like this (SGLang's overlap scheduler, `--disable-overlap-schedule` to turn it off):

    launch N+1 (its input ids are step N's sampled ids, still on the device)
    wait for N, append its tokens, finish requests, send outputs   <- runs while N+1 computes

Only decode steps chain, and only for requests whose next step does not depend on the host seeing
step N's token: no grammar, no penalties, min_new_tokens already met, and not about to reach
max_new_tokens or the context length (those are excluded, since the host knows they end). A request
that stops at step N for another reason (EOS, stop token or string) is already in step N+1: it
becomes a *zombie* of N+1: its output ends at N as usual, step N+1's token is dropped, and its KV
(including the slot N+1 wrote, which holds its last token's KV) goes to the radix cache once N+1 is
done. Prefill steps, aborts and cache flushes first drain the step in flight, so host-side
changes to the pools never race with a running forward.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, List, Optional, Set

import torch

from radixlm.core import ForwardMode, Req, ScheduleBatch
from radixlm.mem.host_copy import to_device_int64
from radixlm.sched.queues import ReqQueues

if TYPE_CHECKING:
    from radixlm.engine.model_runner import ModelRunner
    from radixlm.engine.sampler import SampleOutput
    from radixlm.sched.decode import TokenRatio
    from radixlm.sched.kv_ownership import KVOwnership
    from radixlm.sched.stats import SchedulerStats



def overlap_safe(req: Req, context_len: int) -> bool:
    """Whether `req` can take a decode step whose input token the host has not seen yet."""
    sp = req.sampling_params
    if req.grammar is not None or req.grammar_future is not None:
        return False
    if sp.repetition_penalty != 1.0 or sp.frequency_penalty or sp.presence_penalty:
        return False
    if len(req.output_ids) < sp.min_new_tokens:  # the EOS mask depends on the token count
        return False
    # after the step in flight it will have one more token: would that end it by length?
    if len(req.output_ids) + 1 >= req.max_new_tokens or req.seq_len + 1 >= context_len:
        return False
    return True


@dataclass
class InFlight:
    """A step submitted to the worker whose result the scheduler has not processed yet."""

    batch: ScheduleBatch
    future: Future  # -> SampleOutput
    zombies: Set[int] = field(default_factory=set)  # ids of requests that finished before this step

    def is_zombie(self, req: Req) -> bool:
        return id(req) in self.zombies


class ForwardWorker:
    """Runs `runner.forward_and_sample` on one background thread, in submission order. A chained
    step's input ids are gathered, on the device, from the previous step's sampled ids."""

    def __init__(self, runner):
        self.runner = runner
        dev = torch.device(runner.device)
        # the CUDA current device is per thread: the worker's must be the runner's
        init = (lambda: torch.cuda.set_device(dev)) if dev.type == "cuda" and dev.index is not None else None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="radixlm-forward", initializer=init)

    def submit(self, batch: ScheduleBatch, after: Optional[InFlight] = None,
               rows: Optional[List[int]] = None) -> Future:
        """`after`/`rows`: the request i of `batch` feeds the token sampled for row rows[i] of `after`."""
        prev = after.future if after is not None else None

        def run():
            if prev is not None:
                ids = prev.result().next_token_ids_device  # done: the worker ran it before this
                if rows == list(range(len(rows))):  # the same requests, in order (steady decode)
                    batch.input_ids = ids[:len(rows)]
                else:
                    batch.input_ids = ids[to_device_int64(rows, ids.device)]
            return self.runner.forward_and_sample(batch, defer_host_copy=True)

        return self._pool.submit(run)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True)


class Overlap:
    """Chaining decode steps for the scheduler; handed the queues, KV ownership, the token ratio and
    the stats it works on."""

    def __init__(self, runner: "ModelRunner", q: ReqQueues, kv: "KVOwnership", ratio: "TokenRatio",
                 stats: "SchedulerStats", context_len: int):
        self.worker = ForwardWorker(runner)
        self.q, self.kv, self.ratio, self.stats, self.context_len = q, kv, ratio, stats, context_len

    def launch(self, batch: ScheduleBatch) -> InFlight:
        return InFlight(batch, self.worker.submit(batch))

    def chain(self, cur: InFlight) -> Optional[InFlight]:
        """Launches the decode step after `cur` before `cur`'s tokens reach the host, or returns None
        when the next step needs them (prefill work waiting, a request that is not overlap-safe, no
        free slots). Requests that `cur` certainly ends (by length) are left out."""
        q = self.q
        if not cur.batch.forward_mode.is_decode or q.waiting or q.chunked_req is not None:
            return None
        going = [r for r in cur.batch.reqs if not cur.is_zombie(r)]
        if len(going) != len(q.running):
            return None
        reqs, rows = [], []
        for i, req in enumerate(cur.batch.reqs):
            if cur.is_zombie(req):
                continue
            if overlap_safe(req, self.context_len):
                reqs.append(req)
                rows.append(i)
            elif not self._ends_by_length_next(req):
                return None
        if not reqs:
            return None
        lens = [r.kv.kv_len + 1 for r in reqs]  # cur writes the KV of position kv_len
        loc = self.kv.alloc_with_evict([-1] * len(reqs), lens, [1] * len(reqs))
        if loc is None:
            return None
        self.kv.write_slots(reqs, lens, loc)
        self.ratio.decay()
        batch = ScheduleBatch(reqs, ForwardMode.DECODE, [], loc, lens, [1] * len(reqs), [True] * len(reqs))
        self.stats.num_overlapped_batches += 1
        return InFlight(batch, self.worker.submit(batch, after=cur, rows=rows))

    def _ends_by_length_next(self, req: Req) -> bool:
        return len(req.output_ids) + 1 >= req.max_new_tokens or req.seq_len + 1 >= self.context_len

    def wait(self, cur: InFlight) -> "SampleOutput":
        """The step's result (raises what the step raised); its zombies, whose last token's KV is
        computed now, hand everything over to the cache."""
        result = cur.future.result().resolve()
        for req in cur.batch.reqs:
            if cur.is_zombie(req):
                self.stats.num_overlap_zombies += 1
                req.kv.kv_len += 1
                self.kv.cache_finished(req)
        return result

    def shutdown(self) -> None:
        self.worker.shutdown()
