"""Prefill admission: which requests (and how many of their tokens) one extend step computes.

`PrefillBuilder.build` first continues the chunked request (its next chunk is what fits, SGLang's
min(rem_chunk, rem_total); when too little fits beside running requests it waits a step and they
decode), then admits waiting requests in policy order while the step's budgets last
(`schedule_policy.PrefillAdder`): each is bound to a request-table row and its cached prefix is
locked. The batch's slots are allocated in one call; when the pool refuses them after all, the
admission is undone and retried later. With mixed chunk, the running requests' next tokens ride
along in the same step. It never runs the model and never finishes a request.

Contract: every request that took a lock or a row this step is in `admitted` (the list passed
in), so that a failure can give everything back.
"""

from __future__ import annotations

import logging
import random
from typing import TYPE_CHECKING, Dict, List, Optional

import torch

from radixlm.core import ForwardMode, Req, ReqKV, ScheduleBatch
from radixlm.sched.decode import TokenRatio
from radixlm.sched.queues import ReqQueues
from radixlm.sched.schedule_policy import PrefillAdder, order_waiting

if TYPE_CHECKING:
    from radixlm.mem.radix_cache import MatchResult
    from radixlm.sched.kv_ownership import KVOwnership
    from radixlm.sched.scheduler import SchedulerConfig
    from radixlm.sched.stats import SchedulerStats

logger = logging.getLogger("radixlm.sched.scheduler")


class PrefillBuilder:
    def __init__(self, cfg: "SchedulerConfig", q: ReqQueues, kv: "KVOwnership", ratio: TokenRatio,
                 stats: "SchedulerStats"):
        self.cfg, self.q, self.kv, self.ratio, self.stats = cfg, q, kv, ratio, stats
        self.tree_cache = kv.tree_cache
        self.allocator = kv.allocator
        self.req_to_token_pool = kv.req_to_token_pool
        self.page_size = kv.page_size
        self._rng = random.Random(cfg.random_seed)

    def build(self, admitted: List[Req]) -> Optional[ScheduleBatch]:
        batch = self._admit_and_build(admitted)
        if batch is not None and self.cfg.enable_mixed_chunk and self.q.running:
            self._mix_in_decode(batch)
        return batch

    def _budget(self) -> PrefillAdder:
        reserve_running = sum(PrefillAdder.decode_reserve(r, self.ratio.value) for r in self.q.running)
        if self.cfg.enable_mixed_chunk:  # the running requests decode inside this step: one slot (page) each
            reserve_running += len(self.q.running) * self.page_size
        return PrefillAdder(
            rem_total=self.allocator.available_size() + self.tree_cache.evictable_size() - reserve_running,
            rem_input=self.cfg.max_prefill_tokens,
            rem_chunk=self.cfg.chunked_prefill_size,
            page_size=self.page_size,
        )

    def _admit_and_build(self, admitted: List[Req]) -> Optional[ScheduleBatch]:
        q, adder = self.q, self._budget()
        takes: List[int] = []  # tokens this step computes for admitted[i]
        chunk_open = False  # a request stays mid-prefill after this step: admit nothing behind it
        if q.chunked_req is not None:
            req = q.chunked_req
            left = req.seq_len - req.kv.kv_len
            take = adder.budget_for_chunk(left, first=not q.running)
            if take <= 0 and not q.running:  # cannot happen (add_request checked the pool): never spin
                raise RuntimeError(f"the chunked request's remaining {left} tokens do not fit the idle pool")
            if take <= 0:  # too little fits next to the running requests: they decode this step
                self.stats.num_chunk_waits += 1
                return None
            adder.commit(req.fill_ids, take, PrefillAdder.decode_reserve(req, self.ratio.value), req.cache_namespace)
            admitted.append(req)
            takes.append(take)
            chunk_open = take < left
        matches: Dict[int, "MatchResult"] = {}  # the ordering's matches, valid for this step (nothing inserts)
        ordered = order_waiting(q.waiting, self.cfg.schedule_policy, self.tree_cache, self._rng, matches,
                                priority_sign=self.cfg.priority_sign)
        for req in ordered:
            if chunk_open or len(q.running) + len(admitted) >= self.cfg.max_running_requests:
                break
            if self.req_to_token_pool.available_size() == 0:
                break
            if req.grammar_future is not None:  # still compiling: does not hold up the others
                continue
            if not self._lora_fits(req, admitted):  # its adapter would exceed the slots: others go first
                continue
            match = matches.get(id(req))
            if req.wants_input_logprobs:  # prompt logprobs need the logits, so recompute from there
                match = self.tree_cache.match_prefix(req.fill_ids[:max(req.logprob_start_len - 1, 0)],
                                                     req.cache_namespace)
            elif match is None:
                match = self.tree_cache.match_prefix(req.fill_ids[:-1], req.cache_namespace)
            prefix_len = len(match.indices)
            if adder.shares_new_prefix(req, prefix_len, req.cache_namespace):
                continue
            extend = req.seq_len - prefix_len
            reserve = PrefillAdder.decode_reserve(req, self.ratio.value)
            # Lock first: the matched prefix stops being evictable, so the budget must not count it.
            locked = self.tree_cache.inc_lock_ref(match.last_node)
            adder.rem_total -= locked
            take = adder.budget_for(extend, reserve, first=not q.running and not admitted)
            if take <= 0:
                self.tree_cache.dec_lock_ref(match.last_node)
                adder.rem_total += locked
                break
            req.kv.last_node = match.last_node
            admitted.append(req)
            self._bind(req, match.indices)
            takes.append(take)
            adder.commit(req.fill_ids, take, reserve if take == extend else 0.0, req.cache_namespace)
            chunk_open = take < extend
        if not admitted:
            return None
        new = [r is not q.chunked_req for r in admitted]  # bound this step (not the continuing chunk)
        batch = self._build_extend_batch(admitted, takes, new)
        if batch is None:  # the budget counted evictable tokens that were locked after all: retry later
            self._roll_back(admitted)
            return None
        for req, take, is_new in zip(admitted, takes, new):
            if is_new and take < req.seq_len - req.kv.kv_len:
                q.chunked_req = req
            if req in q.waiting:
                q.waiting.remove(req)
            if is_new and not req.output_ids:  # a resumed request re-uses its own KV: no cache hit
                req.cached_tokens += req.kv.kv_len
        return batch

    def _lora_fits(self, req: Req, admitted: List[Req]) -> bool:
        """Whether the live requests' distinct adapters (the base counts as one) stay within
        --max-loras-per-batch with `req` added: every decode and mixed step then fits the slots."""
        cap = self.cfg.lora_slots
        if cap is None:
            return True
        active = {r.lora_path for r in self.q.running} | {r.lora_path for r in admitted}
        return req.lora_path in active or len(active) < cap

    def _bind(self, req: Req, prefix: torch.Tensor) -> None:
        """Binds a request (whose matched prefix is already locked) to a row and its prefix."""
        req.kv.req_pool_idx = self.req_to_token_pool.alloc()
        self.req_to_token_pool.write(req.kv.req_pool_idx, 0, prefix)
        req.kv.kv_len = req.kv.cache_protected_len = len(prefix)

    def _roll_back(self, admitted: List[Req]) -> None:
        self.stats.num_admission_rollbacks += 1
        logger.warning("prefill admission rolled back: %d requests wait for KV memory", len(admitted))
        for req in admitted:
            if req is not self.q.chunked_req:
                self.kv.free(req)
                req.kv = ReqKV()
        admitted.clear()

    def _build_extend_batch(self, reqs: List[Req], extend_lens: List[int], new: List[bool]
                            ) -> Optional[ScheduleBatch]:
        """The extend batch of the admitted requests (`new`: bound this step, so their prefix is a
        cache hit), or None when the pool cannot give their slots."""
        prefix_lens = [r.kv.kv_len for r in reqs]
        loc = self.kv.alloc_with_evict(self.kv.last_slots(reqs), prefix_lens, extend_lens)
        if loc is None:
            return None
        input_ids: List[int] = []
        slices = list(torch.split(loc, extend_lens))
        try:
            for req, pre, ext, sl in zip(reqs, prefix_lens, extend_lens, slices):
                self.req_to_token_pool.write(req.kv.req_pool_idx, pre, sl)
                input_ids.extend(req.fill_ids[pre:pre + ext])
        except BaseException:
            self.kv.free_with_step_slots(reqs, slices)  # the step's slots go back with the requests
            raise
        sample = [pre + ext == r.seq_len and r.max_new_tokens > len(r.output_ids)
                  for r, pre, ext in zip(reqs, prefix_lens, extend_lens)]
        ranges = [r.input_logprob_range(pre, ext) for r, pre, ext in zip(reqs, prefix_lens, extend_lens)]
        cached = sum(pre for pre, is_new in zip(prefix_lens, new) if is_new)
        self.stats.log_prefill(len(reqs), sum(extend_lens), cached, self.kv.token_usage(), len(self.q.running),
                               len(self.q.waiting))
        return ScheduleBatch(reqs, ForwardMode.EXTEND, input_ids, loc, prefix_lens, extend_lens, sample, ranges)

    def _mix_in_decode(self, batch: ScheduleBatch) -> None:
        """Appends every running request's next token to an extend batch (SGLang's mixed chunk), so
        long prefills do not stall decoding. Skipped when the pool cannot give each a slot now."""
        reqs = [r for r in self.q.running if r not in batch.reqs]
        if not reqs:
            return
        loc = self.allocator.alloc_extend(self.kv.last_slots(reqs), [r.kv.kv_len for r in reqs], [1] * len(reqs))
        if loc is None:
            return
        self.kv.write_decode_slots(reqs, loc)
        batch.reqs.extend(reqs)
        batch.input_ids.extend(r.output_ids[-1] for r in reqs)
        batch.out_cache_loc = torch.cat([batch.out_cache_loc, loc.to(batch.out_cache_loc.device)])
        batch.prefix_lens.extend(r.kv.kv_len for r in reqs)
        batch.extend_lens.extend([1] * len(reqs))
        batch.sample.extend([True] * len(reqs))
        batch.input_logprob_ranges.extend([None] * len(reqs))
        batch.num_mixed_decode = len(reqs)
        self.stats.num_mixed_batches += 1
