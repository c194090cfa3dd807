"""Decode batches and retraction, and the `new_token_ratio` that ties them to prefill admission.

`TokenRatio` owns SGLang's estimate of how much of its remaining `max_new_tokens` a running
request will still use (admission reserves that much KV for it): it starts at
min(0.7 * conservativeness, 1), decays by (init - min) / 600 with each decode step down to
0.14 * init, jumps after a retraction to (generated + 20 per request) / (sum of max_new_tokens + 1)
of the requests left running, and resets when the scheduler is idle.

`DecodeBuilder.build` gives every running request one new slot; when the pool cannot, it retracts
the least-progressed live request (SGLang's order: fewest output tokens, then the longer prompt;
the chunked request included) back to the queue, until the step fits. A request that cannot get
a slot even alone is aborted (the pool is too small for it).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple

from radixlm.core import FinishReason, ForwardMode, Req, ReqKV, ReqOutput, ScheduleBatch
from radixlm.sched.queues import ReqQueues
from radixlm.sched.schedule_policy import DECODE_RESERVE_CAP

if TYPE_CHECKING:
    from radixlm.sched.kv_ownership import KVOwnership
    from radixlm.sched.output_processor import OutputProcessor
    from radixlm.sched.stats import SchedulerStats

logger = logging.getLogger("radixlm.sched.scheduler")

RETRACT_DECODE_STEPS = 20  # decode steps each remaining request is assumed to take after a retraction


def retracted_token_ratio(running: Sequence[Req]) -> float:
    """new_token_ratio after a retraction (SGLang's rule): what the remaining requests generated
    plus 20 more steps each, over what they may generate at most."""
    gen = sum(len(r.output_ids) for r in running)
    total_max = sum(min(r.max_new_tokens, DECODE_RESERVE_CAP) for r in running)
    return min(1.0, (gen + RETRACT_DECODE_STEPS * len(running)) / (total_max + 1))


class TokenRatio:
    def __init__(self, schedule_conservativeness: float):
        self.init = min(0.7 * schedule_conservativeness, 1.0)
        self.min = min(self.init * 0.14, 1.0)
        self.step_decay = (self.init - self.min) / 600
        self.value = self.init

    def decay(self) -> None:
        self.value = max(self.value - self.step_decay, self.min)

    def reset(self) -> None:
        self.value = self.init

    def after_retraction(self, running: Sequence[Req]) -> None:
        self.value = retracted_token_ratio(running)


class DecodeBuilder:
    def __init__(self, q: ReqQueues, kv: "KVOwnership", ratio: TokenRatio, stats: "SchedulerStats",
                 out: "OutputProcessor"):
        self.q, self.kv, self.ratio, self.stats, self.out = q, kv, ratio, stats, out

    def build(self, drafts: Optional[Dict[int, List[int]]] = None) -> Tuple[Optional[ScheduleBatch], List[ReqOutput]]:
        """The decode batch of every running request (None when nothing runs any more), and the
        outputs of requests aborted because the pool cannot hold them even alone. With `drafts`
        (speculative decoding: id(req) -> draft tokens) it is a verify step: an extend of each
        request's last token and its drafts."""
        outputs: List[ReqOutput] = []
        while True:
            reqs = list(self.q.running)
            if not reqs:
                return None, outputs
            lens = [1 + len(drafts.get(id(r), ())) if drafts else 1 for r in reqs]
            loc = self.kv.alloc_with_evict(self.kv.last_slots(reqs), [r.kv.kv_len for r in reqs], lens)
            if loc is not None:
                break
            if not self._retract_one(outputs):
                return None, outputs
        self.ratio.decay()
        if not drafts:
            self.kv.write_decode_slots(reqs, loc)
            return ScheduleBatch(reqs, ForwardMode.DECODE, [r.output_ids[-1] for r in reqs], loc,
                                 [r.kv.kv_len for r in reqs], [1] * len(reqs), [True] * len(reqs)), outputs
        spec = [list(drafts.get(id(r), ())) for r in reqs]
        self.kv.write_slots([r for r, n in zip(reqs, lens) for _ in range(n)],
                            [r.kv.kv_len + j for r, n in zip(reqs, lens) for j in range(n)], loc)
        return ScheduleBatch(reqs, ForwardMode.EXTEND, [t for r, d in zip(reqs, spec) for t in [r.output_ids[-1]] + d],
                             loc, [r.kv.kv_len for r in reqs], lens, [True] * len(reqs),
                             [None] * len(reqs), spec_drafts=spec), outputs

    def _retract_one(self, outputs: List[ReqOutput]) -> bool:
        """Preempts the least-progressed live request; False when nothing can go."""
        candidates = [r for r in self.q.live() if r not in self.q.transfer]  # (a PD transfer is not retracted)
        if len(candidates) <= 1:
            if self.q.running:  # even alone it cannot get one more slot: the pool is too small
                req = self.q.running.pop()
                self.kv.free(req)
                outputs.append(self.out.finish(req, FinishReason("abort", message="KV cache pool is too small")))
            return False
        req = min(candidates, key=lambda r: (len(r.output_ids), -len(r.origin_input_ids)))
        self.q.remove(req)
        self.kv.free(req)
        req.kv = ReqKV()
        req.num_retractions += 1
        self.q.waiting.append(req)
        self.stats.num_retractions += 1
        old = self.ratio.value
        self.ratio.after_retraction(self.q.running)
        logger.info("KV cache pool is full. Retract requests. #retracted_reqs: 1, #new_token_ratio: %.4f -> %.4f",
                    old, self.ratio.value)
        return True
