"""Scheduler: continuous batching over the radix cache and the KV pool.

Owns the waiting queue, the running (decoding) requests, the one in-flight chunked prefill, the
radix cache and KV ownership of every request. Each `step()` picks one batch (a prefill/extend
batch when one can be formed, else a decode batch), has the model runner compute it, hands the
sampled tokens to the OutputProcessor (sched/output_processor.py: stop checks, grammar,
jump-forward), releases finished requests' KV, and returns `ReqOutput`s. With overlap scheduling
(sched/overlap.py) a decode step computes while the previous one is processed. It never
tokenizes full texts and never touches HTTP.

KV ownership (the invariant `check_integrity` verifies): every pool slot is free, held by the
radix tree, or held by exactly one request as `req_to_token[row, cache_protected_len:kv_len]`.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
import itertools
from typing import Callable, Dict, List, Optional, Sequence

import torch

from radixlm.constrained import grammar_key
from radixlm.core import FinishReason, ForwardMode, Req, ReqOutput, ScheduleBatch
from radixlm.mem.radix_cache import RadixCache
from radixlm.sched.kv_ownership import KVOwnership, step_slots
from radixlm.sched.output_processor import OutputProcessor
from radixlm.sched.overlap import ForwardWorker, InFlight, OverlapMixin
from radixlm.sched.schedule_policy import DECODE_RESERVE_CAP, PrefillAdder, order_waiting
from radixlm.server_args import DEFAULT_MAX_RUNNING_REQUESTS, default_of

logger = logging.getLogger(__name__)

DECODE_LOG_INTERVAL = 40
RETRACT_DECODE_STEPS = 20  # decode steps each remaining request is assumed to take after a retraction


@dataclass
class SchedulerConfig:
    """The scheduler's options; `derive_config(SchedulerConfig, server_args, ...)` builds it from the
    validated ServerArgs (defaults come from there too)."""

    schedule_policy: str = default_of("schedule_policy")
    max_running_requests: int = DEFAULT_MAX_RUNNING_REQUESTS
    max_prefill_tokens: int = default_of("max_prefill_tokens")
    chunked_prefill_size: Optional[int] = default_of("chunked_prefill_size")  # None: no chunking
    schedule_conservativeness: float = default_of("schedule_conservativeness")
    disable_radix_cache: bool = False
    random_seed: int = default_of("random_seed")
    enable_jump_forward: bool = True
    enable_mixed_chunk: bool = False  # running requests decode inside prefill steps instead of waiting
    enable_overlap: bool = False  # decode step N+1 computes while step N's results are processed
    debug_integrity_check: bool = False  # an invariant violation found when idle stops the scheduler


def retracted_token_ratio(running: Sequence[Req]) -> float:
    """new_token_ratio after a retraction (SGLang's rule): what the remaining requests generated
    plus 20 more steps each, over what they may generate at most."""
    gen = sum(len(r.output_ids) for r in running)
    total_max = sum(min(r.max_new_tokens, DECODE_RESERVE_CAP) for r in running)
    return min(1.0, (gen + RETRACT_DECODE_STEPS * len(running)) / (total_max + 1))


@dataclass
class SchedulerStats:
    num_prefill_batches: int = 0
    num_decode_batches: int = 0
    prefill_new_tokens: int = 0  # prompt tokens computed
    prefill_cached_tokens: int = 0  # prompt tokens served from the radix cache
    num_retractions: int = 0
    generated_tokens: int = 0
    last_hit_rate: float = 0.0
    last_gen_throughput: float = 0.0  # tokens/s over the last decode log interval
    jump_forward_tokens: int = 0  # tokens appended by jump-forward instead of being decoded
    num_mixed_batches: int = 0  # extend steps that also decoded the running requests
    num_overlapped_batches: int = 0  # decode steps launched before the previous step's tokens were seen
    num_overlap_zombies: int = 0  # requests that had finished when their overlapped step completed
    num_integrity_violations: int = 0  # KV-ownership invariant violations found when idle (logged)
    num_failed_reqs: int = 0  # requests aborted because a step (or their part of one) raised
    num_chunk_waits: int = 0  # steps where the chunked request waited for memory and decode ran instead
    num_admission_rollbacks: int = 0  # prefill admissions undone because the pool could not give the slots
    num_clipped_max_new_tokens: int = 0  # requests whose max_new_tokens was clipped to fit max_req_len

    @property
    def cache_hit_rate(self) -> float:
        total = self.prefill_new_tokens + self.prefill_cached_tokens
        return self.prefill_cached_tokens / total if total else 0.0


class Scheduler(OverlapMixin):
    def __init__(self, runner, cfg: SchedulerConfig, context_len: int,
                 decode_tail: Optional[Callable[[Sequence[int]], str]] = None,
                 encode_text: Optional[Callable[[str], List[int]]] = None,
                 grammar_factory: Optional[Callable[[], object]] = None):
        self.runner = runner
        self.cfg = cfg
        self.context_len = context_len
        self._grammar_factory = grammar_factory
        self._grammar_backend = None
        self.allocator = runner.allocator
        self.req_to_token_pool = runner.req_to_token_pool
        self.page_size = self.allocator.page_size
        self.tree_cache = RadixCache(self.allocator, page_size=self.page_size, disable=cfg.disable_radix_cache)
        self.kv = KVOwnership(self.allocator, self.req_to_token_pool, self.tree_cache)
        self.waiting: List[Req] = []
        self.running: List[Req] = []
        self.chunked_req: Optional[Req] = None
        self.stats = SchedulerStats()
        self.out = OutputProcessor(self.stats, runner.model_config.eos_token_ids, context_len,
                                   cfg.enable_jump_forward, decode_tail, encode_text)
        self._rng = random.Random(cfg.random_seed)
        self._arrivals = 0
        self.init_new_token_ratio = min(0.7 * cfg.schedule_conservativeness, 1.0)
        self.min_new_token_ratio = min(self.init_new_token_ratio * 0.14, 1.0)
        self.new_token_ratio_decay = (self.init_new_token_ratio - self.min_new_token_ratio) / 600
        self.new_token_ratio = self.init_new_token_ratio
        self._last_decode_log = time.perf_counter()
        self._decode_tokens_since_log = 0
        # overlap scheduling (radixlm/sched/overlap.py): chaining needs page-granular slots of 1 token,
        # since a paged allocation would have to read the in-flight token's slot back from the device
        self._worker = ForwardWorker(runner) if cfg.enable_overlap and self.page_size == 1 else None
        self._inflight: Optional[InFlight] = None

    # ------------------------------------------------------------------ public
    @property
    def max_total_num_tokens(self) -> int:
        return self.allocator.size

    @property
    def max_req_len(self) -> int:
        """Longest sequence (prompt + output) one request can hold: the context, or the KV pool."""
        return min(self.context_len, self.allocator.size)

    def add_request(self, req: Req) -> None:
        n_in = len(req.origin_input_ids)
        if n_in + 1 > self.allocator.size:
            raise ValueError(f"The input ({n_in} tokens) needs more KV cache than the pool "
                             f"holds ({self.allocator.size} tokens); raise max_total_tokens")
        cap = self.max_req_len - n_in  # SGLang's clipping: admitted requests can always finish
        if req.max_new_tokens > cap:
            logger.info("request %s: max_new_tokens %s clipped to %d (max_req_len %d - %d input tokens)",
                        req.rid, req.sampling_params.max_new_tokens, cap, self.max_req_len, n_in)
            req.sampling_params.max_new_tokens = cap
            self.stats.num_clipped_max_new_tokens += 1
        dev = torch.device(self.runner.device)
        if req.generator is not None and req.generator.device != dev:  # sample on the device: no host sync
            req.generator = torch.Generator(device=dev).manual_seed(req.generator.initial_seed())
        key = grammar_key(req.sampling_params)
        if key is not None:
            req.grammar_future = self.grammar_backend().compile_async(key)
        req.arrival_seq = self._arrivals
        self._arrivals += 1
        self.waiting.append(req)

    def grammar_backend(self):
        """The grammar backend, created on the first constrained request."""
        if self._grammar_backend is None:
            if self._grammar_factory is None:
                raise ValueError("constrained decoding is disabled (--grammar-backend none)")
            try:
                self._grammar_backend = self._grammar_factory()
            except RuntimeError as e:
                raise ValueError(str(e)) from None
            self.runner.sampler.grammar_backend = self._grammar_backend
        return self._grammar_backend

    def _resolve_grammars(self, outputs: List[ReqOutput]) -> None:
        """Requests whose grammar finished compiling become schedulable (or fail with its error)."""
        for req in [r for r in self.waiting if r.grammar_future is not None and r.grammar_future.done()]:
            fut, req.grammar_future = req.grammar_future, None
            try:
                req.grammar = self._grammar_backend.new_matcher(fut.result())
            except Exception as e:  # noqa: BLE001 - a grammar the backend cannot compile
                self.waiting.remove(req)
                outputs.append(self.out.finish(req, FinishReason("abort", message=f"Invalid grammar: {e}")))

    def abort_request(self, rid: str) -> List[ReqOutput]:
        """Aborts a queued or running request; frees everything it held. (A step in flight is
        completed first; its outputs are returned too.)"""
        out = self.drain()
        for req in list(self.waiting):
            if req.rid == rid:
                self.waiting.remove(req)
                out.append(self.out.finish(req, FinishReason("abort", message="Aborted by the client")))
        for req in list(self.running) + ([self.chunked_req] if self.chunked_req else []):
            if req.rid == rid:
                self.kv.free(req)
                if req is self.chunked_req:
                    self.chunked_req = None
                else:
                    self.running.remove(req)
                out.append(self.out.finish(req, FinishReason("abort", message="Aborted by the client")))
        return out

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.chunked_req or self._inflight)

    def drain(self) -> List[ReqOutput]:
        """Completes the step in flight (overlap scheduling), so host state is current."""
        cur, self._inflight = self._inflight, None
        return self._complete(cur, None) if cur is not None else []

    def shutdown(self) -> None:
        if self._worker is not None:
            self._worker.shutdown()

    def flush_cache(self) -> bool:
        """Empties the radix cache; only possible when no request is in flight."""
        if self.has_work():
            return False
        self.tree_cache.reset()
        self.stats = self.out.stats = SchedulerStats()
        return True

    def token_usage(self) -> float:
        free = self.allocator.available_size() + self.tree_cache.evictable_size()
        return 1.0 - free / self.allocator.size

    def step(self) -> List[ReqOutput]:
        """Runs one batch; returns what each touched request produced. With overlap scheduling a
        decode step may still be computing when this returns; the next call completes it."""
        if self._inflight is None:
            return self._step_fresh()
        cur = self._inflight
        self._inflight = nxt = self._chain_decode(cur)
        outputs = self._complete(cur, nxt)
        if nxt is None:  # nothing chained: the next batch is built from the now current state
            outputs += self._step_fresh()
        return outputs

    def _step_fresh(self) -> List[ReqOutput]:
        outputs: List[ReqOutput] = []
        batch = self._prefill_batch(outputs)
        if batch is None and self.running:
            batch = self._get_decode_batch(outputs)
        if batch is None:
            if not self.has_work():
                self.new_token_ratio = self.init_new_token_ratio
            elif any(r.grammar_future is not None for r in self.waiting):
                time.sleep(0.001)  # only requests waiting for their grammar: do not spin
            return outputs
        if self._worker is not None and batch.forward_mode.is_decode:
            self._inflight = InFlight(batch, self._worker.submit(batch))
            return outputs
        try:
            result = self.runner.forward_and_sample(batch)
        except Exception as e:  # noqa: BLE001 - fail this batch's requests, keep serving the rest
            logger.exception("forward failed for a batch of %d requests", batch.batch_size)
            return outputs + self._fail_batch(f"internal error: {type(e).__name__}: {e}", batch)
        if batch.forward_mode.is_decode:
            outputs.extend(self._process_decode(batch, result))
        else:
            outputs.extend(self._process_prefill(batch, result))
            if batch.num_mixed_decode:
                n = batch.batch_size - batch.num_mixed_decode
                outputs.extend(self._advance_decoding(list(enumerate(batch.reqs[n:])), result, sum(batch.sample[:n])))
        return outputs

    def _mix_in_decode(self, batch: ScheduleBatch) -> None:
        """Appends every running request's next token to an extend batch (SGLang's mixed chunk), so
        long prefills do not stall decoding. Skipped when the pool cannot give each a slot now."""
        reqs = [r for r in self.running if r not in batch.reqs]
        if not reqs:
            return
        loc = self.allocator.alloc_extend(self.kv.last_slots(reqs), [r.kv_len for r in reqs], [1] * len(reqs))
        if loc is None:
            return
        self.kv.write_decode_slots(reqs, loc)
        batch.reqs.extend(reqs)
        batch.input_ids.extend(r.output_ids[-1] for r in reqs)
        batch.out_cache_loc = torch.cat([batch.out_cache_loc, loc.to(batch.out_cache_loc.device)])
        batch.prefix_lens.extend(r.kv_len for r in reqs)
        batch.extend_lens.extend([1] * len(reqs))
        batch.sample.extend([True] * len(reqs))
        batch.input_logprob_ranges.extend([None] * len(reqs))
        batch.num_mixed_decode = len(reqs)
        self.stats.num_mixed_batches += 1
    def _fail_batch(self, message: str, *batches: ScheduleBatch) -> List[ReqOutput]:
        """A step failed: its requests (of every batch given: a failed step and the one chained on
        it) give back all they hold, this step's slots included, and are aborted. Zombies of an
        overlapped step finished already: they only give their KV back."""
        slots: Dict[int, List[torch.Tensor]] = {}
        reqs: Dict[int, Req] = {}
        for batch in batches:
            for req, sl in step_slots(batch):
                reqs[id(req)] = req
                slots.setdefault(id(req), []).append(sl)
        return self._fail_reqs([(r, torch.cat(slots[i])) for i, r in reqs.items()], message)

    def _fail_reqs(self, reqs: Sequence[tuple], message: str) -> List[ReqOutput]:
        """Takes (req, slots a failed step took for it or None) out of every queue, frees all it
        holds and aborts it (unless it had finished already)."""
        for req, _ in reqs:
            if req is self.chunked_req:
                self.chunked_req = None
            if req in self.running:
                self.running.remove(req)
            if req in self.waiting:
                self.waiting.remove(req)
        self.kv.free_with_step_slots([r for r, _ in reqs], [sl for _, sl in reqs])
        self.stats.num_failed_reqs += len(reqs)
        return [self.out.finish(r, FinishReason("abort", message=message)) for r, _ in reqs if not r.finished]

    def idle_check(self) -> None:
        """The idle-time invariant check: fatal with `debug_integrity_check` (tests, debugging),
        else a violation is logged and counted and the scheduler keeps serving."""
        try:
            self.check_integrity()
        except RuntimeError:
            if self.cfg.debug_integrity_check:
                raise
            self.stats.num_integrity_violations += 1
            logger.exception("KV ownership invariant violated (#%d); serving on",
                             self.stats.num_integrity_violations)

    def recover(self, message: str) -> List[ReqOutput]:
        """Last resort after an exception escaped `step()` (a bug: step() fails only the batch
        that raised): fails the requests that hold KV (the step in flight, running and chunked
        ones), returning their memory; queued requests stay queued."""
        cur, self._inflight = self._inflight, None
        if cur is not None:
            cur.future.exception()  # let the worker finish with it before its slots are freed
        reqs: Dict[int, tuple] = {id(r): (r, None) for r in self.live_reqs()}
        if cur is not None:
            reqs.update({id(r): (r, sl) for r, sl in step_slots(cur.batch)})
        return self._fail_reqs(list(reqs.values()), message)

    def check_integrity(self) -> None:
        """Every slot is free, in the tree, or owned by exactly one live request (or by the step in
        flight, whose slots come after each request's kv_len)."""
        inflight = self._inflight.batch.reqs if self._inflight is not None else []
        extra = {id(r): 1 for r in inflight}
        live = {id(r): r for r in self.live_reqs() + inflight}
        self.kv.check_integrity(live.values(), extra)
        if not self.has_work() and self.tree_cache.protected_size() != 0:
            raise RuntimeError(f"idle scheduler but {self.tree_cache.protected_size()} tokens still locked")

    # ------------------------------------------------------------------ prefill
    def live_reqs(self) -> List[Req]:
        return self.running + ([self.chunked_req] if self.chunked_req else [])

    def _prefill_batch(self, outputs: List[ReqOutput]) -> Optional[ScheduleBatch]:
        """This step's extend batch (with the running requests mixed in under mixed chunk), or
        None. An exception while forming it fails only the requests it was admitting."""
        if not self.waiting and self.chunked_req is None:
            return None
        self._resolve_grammars(outputs)
        admitted: List[Req] = []
        try:
            batch = self._get_new_batch_prefill(admitted)
            if batch is not None and self.cfg.enable_mixed_chunk and self.running:
                self._mix_in_decode(batch)
            return batch
        except Exception as e:  # noqa: BLE001 - a bug or a bad request fails its batch, not the server
            logger.exception("forming a prefill batch failed; failing its %d requests", len(admitted))
            outputs.extend(self._fail_reqs([(r, None) for r in admitted],
                                           f"internal error: {type(e).__name__}: {e}"))
            return None

    def _get_new_batch_prefill(self, admitted: List[Req]) -> Optional[ScheduleBatch]:
        """Admits the chunked request's next chunk, then waiting requests in policy order, within
        the step's budgets. `admitted` collects every request that took a lock or a row (so a
        failure can give them back)."""
        reserve_running = sum(PrefillAdder.decode_reserve(r, self.new_token_ratio) for r in self.running)
        if self.cfg.enable_mixed_chunk:  # the running requests decode inside this step: one slot (page) each
            reserve_running += len(self.running) * self.page_size
        adder = PrefillAdder(
            rem_total=self.allocator.available_size() + self.tree_cache.evictable_size() - reserve_running,
            rem_input=self.cfg.max_prefill_tokens,
            rem_chunk=self.cfg.chunked_prefill_size,
            page_size=self.page_size,
        )
        chunk_open = False  # a request stays mid-prefill after this step: admit nothing behind it
        if self.chunked_req is not None:
            req = self.chunked_req
            left = req.seq_len - req.kv_len
            take = adder.budget_for_chunk(left, first=not self.running)
            if take <= 0 and not self.running:  # cannot happen (add_request checked the pool): never spin
                raise RuntimeError(f"the chunked request's remaining {left} tokens do not fit the idle pool")
            if take <= 0:  # too little fits next to the running requests: they decode this step
                self.stats.num_chunk_waits += 1
                return None
            req.prefix_len, req.extend_len = req.kv_len, take
            adder.commit(req.fill_ids, take, PrefillAdder.decode_reserve(req, self.new_token_ratio))
            admitted.append(req)
            chunk_open = take < left
        for req in order_waiting(self.waiting, self.cfg.schedule_policy, self.tree_cache, self._rng):
            if chunk_open or len(self.running) + len(admitted) >= self.cfg.max_running_requests:
                break
            if self.req_to_token_pool.available_size() == 0:
                break
            if req.grammar_future is not None:  # still compiling: does not hold up the others
                continue
            key = req.fill_ids[:-1]
            if req.wants_input_logprobs:  # prompt logprobs need the logits, so recompute from there
                key = key[:max(req.logprob_start_len - 1, 0)]
            match = self.tree_cache.match_prefix(key)
            prefix_len = len(match.indices)
            if adder.shares_new_prefix(req, prefix_len):
                continue
            extend = req.seq_len - prefix_len
            reserve = PrefillAdder.decode_reserve(req, self.new_token_ratio)
            # Lock first: the matched prefix stops being evictable, so the budget must not count it.
            locked = self.tree_cache.inc_lock_ref(match.last_node)
            adder.rem_total -= locked
            take = adder.budget_for(extend, reserve, first=not self.running and not admitted)
            if take <= 0:
                self.tree_cache.dec_lock_ref(match.last_node)
                adder.rem_total += locked
                break
            req.last_node = match.last_node
            admitted.append(req)
            self._admit(req, match, take)
            adder.commit(req.fill_ids, take, reserve if take == extend else 0.0)
            if take < extend:
                chunk_open = True
        if not admitted:
            return None
        batch = self._build_extend_batch(admitted)
        if batch is None:  # the budget counted evictable tokens that were locked after all: retry later
            self.stats.num_admission_rollbacks += 1
            logger.warning("prefill admission rolled back: %d requests wait for KV memory", len(admitted))
            for req in admitted:
                if req is not self.chunked_req:
                    self.kv.free(req)
                    req.reset_kv_state()
            admitted.clear()
            return None
        for req in admitted:
            if req is not self.chunked_req and req.extend_len < req.seq_len - req.kv_len:
                self.chunked_req = req
            if req in self.waiting:
                self.waiting.remove(req)
            if req.extend_is_first_chunk and not req.output_ids:  # a resumed request re-uses its own KV
                req.cached_tokens += req.prefix_len
        return batch

    def _admit(self, req: Req, match, take: int) -> None:
        """Binds a request (whose matched prefix is already locked) to a row and its prefix."""
        req.req_pool_idx = self.req_to_token_pool.alloc()
        prefix_len = len(match.indices)
        self.req_to_token_pool.write(req.req_pool_idx, 0, match.indices)
        req.prefix_len = req.kv_len = req.cache_protected_len = prefix_len
        req.extend_len = take
        req.extend_is_first_chunk = True

    def _build_extend_batch(self, reqs: List[Req]) -> Optional[ScheduleBatch]:
        """The extend batch of the admitted requests, or None when the pool cannot give their slots."""
        prefix_lens = [r.kv_len for r in reqs]
        extend_lens = [r.extend_len for r in reqs]
        loc = self.kv.alloc_with_evict(self.kv.last_slots(reqs), prefix_lens, extend_lens)
        if loc is None:
            return None
        input_ids: List[int] = []
        slices = list(torch.split(loc, extend_lens))
        try:
            for req, pre, ext, sl in zip(reqs, prefix_lens, extend_lens, slices):
                self.req_to_token_pool.write(req.req_pool_idx, pre, sl)
                input_ids.extend(req.fill_ids[pre:pre + ext])
        except BaseException:
            self.kv.free_with_step_slots(reqs, slices)  # the step's slots go back with the requests
            raise
        sample = [pre + ext == r.seq_len and r.max_new_tokens > len(r.output_ids)
                  for r, pre, ext in zip(reqs, prefix_lens, extend_lens)]
        ranges = [r.input_logprob_range(pre, ext) for r, pre, ext in zip(reqs, prefix_lens, extend_lens)]
        new_tokens = sum(extend_lens)
        self._log_prefill(reqs, new_tokens)
        return ScheduleBatch(reqs, ForwardMode.EXTEND, input_ids, loc, prefix_lens, extend_lens, sample, ranges)

    def _log_prefill(self, reqs: List[Req], new_tokens: int) -> None:
        cached = sum(r.prefix_len for r in reqs if r.extend_is_first_chunk)
        self.stats.num_prefill_batches += 1
        self.stats.prefill_new_tokens += new_tokens
        self.stats.prefill_cached_tokens += cached
        self.stats.last_hit_rate = cached / (cached + new_tokens) if cached + new_tokens else 0.0
        logger.info(
            "Prefill batch, #new-seq: %d, #new-token: %d, #cached-token: %d, token usage: %.2f, "
            "#running-req: %d, #queue-req: %d, cache hit rate: %.2f%%, running hit rate: %.2f%%",
            len(reqs), new_tokens, cached, self.token_usage(), len(self.running), len(self.waiting),
            100 * self.stats.last_hit_rate, 100 * self.stats.cache_hit_rate)

    def _process_prefill(self, batch: ScheduleBatch, result) -> List[ReqOutput]:
        outputs: List[ReqOutput] = []
        n = batch.batch_size - batch.num_mixed_decode  # mixed-in decoding requests are handled after
        rows = list(itertools.accumulate(batch.sample[:n], initial=0))  # request i's row in the result
        slots = step_slots(batch)
        for i, (req, do_sample) in enumerate(zip(batch.reqs[:n], batch.sample[:n])):
            try:
                self._prefill_done(req, do_sample, result, i, rows[i], outputs)
            except Exception as e:  # noqa: BLE001 - this request fails alone
                logger.exception("processing the prefill of request %s failed", req.rid)
                outputs.extend(self._fail_reqs([(req, slots[i][1])], f"internal error: {type(e).__name__}: {e}"))
        return outputs

    def _prefill_done(self, req: Req, do_sample: bool, result, i: int, row: int, outputs: List[ReqOutput]) -> None:
        """Request i of an extend batch computed its chunk (result row `row` when it sampled)."""
        if result.input_logprobs is not None and result.input_logprobs[i]:
            req.input_logprobs.extend(result.input_logprobs[i])
        req.kv_len += req.extend_len
        req.extend_is_first_chunk = False
        if req is self.chunked_req and req.kv_len < req.seq_len:
            self.kv.cache_unfinished(req)
            return
        if req is self.chunked_req:
            self.chunked_req = None
        if not do_sample:  # max_new_tokens already reached (0): prefill only
            self.kv.cache_finished(req)
            outputs.append(self.out.attach_input_logprobs(
                req, self.out.finish(req, FinishReason("length", length=len(req.output_ids)))))
            return
        outputs.append(self.out.attach_input_logprobs(req, self.out.append_token(req, result, row)))
        if req.finished:
            self.kv.cache_finished(req)
        elif req.pending_tokens:
            self._park_for_extend(req)
        else:
            self.kv.cache_unfinished(req)
            self.running.append(req)

    # ------------------------------------------------------------------ decode
    def _get_decode_batch(self, outputs: List[ReqOutput]) -> Optional[ScheduleBatch]:
        while True:
            reqs = list(self.running)
            loc = self.kv.alloc_with_evict(self.kv.last_slots(reqs), [r.kv_len for r in reqs], [1] * len(reqs))
            if loc is not None:
                break
            if not self._retract_one(outputs):
                return None
        self.kv.write_decode_slots(reqs, loc)
        self.new_token_ratio = max(self.new_token_ratio - self.new_token_ratio_decay, self.min_new_token_ratio)
        return ScheduleBatch(reqs, ForwardMode.DECODE, [r.output_ids[-1] for r in reqs], loc,
                             [r.kv_len for r in reqs], [1] * len(reqs), [True] * len(reqs))

    def _retract_one(self, outputs: List[ReqOutput]) -> bool:
        """Preempts the least-progressed request (SGLang's order: fewest output tokens, then the
        longer prompt), the chunked request in flight included; False when nothing can go."""
        candidates = self.live_reqs()
        if len(candidates) <= 1:
            if self.running:  # even alone it cannot get one more slot: the pool is too small
                req = self.running.pop()
                self.kv.free(req)
                outputs.append(self.out.finish(req, FinishReason("abort", message="KV cache pool is too small")))
            return False
        req = min(candidates, key=lambda r: (len(r.output_ids), -len(r.origin_input_ids)))
        if req is self.chunked_req:
            self.chunked_req = None
        else:
            self.running.remove(req)
        self.kv.free(req)
        req.reset_kv_state()
        req.num_retractions += 1
        self.waiting.append(req)
        self.stats.num_retractions += 1
        old = self.new_token_ratio
        self.new_token_ratio = retracted_token_ratio(self.running)
        logger.info("KV cache pool is full. Retract requests. #retracted_reqs: 1, #new_token_ratio: %.4f -> %.4f",
                    old, self.new_token_ratio)
        return True

    def _advance_decoding(self, rows: List[tuple], result, offset: int,
                          successor: Optional[InFlight] = None) -> List[ReqOutput]:
        """Decoding requests took one step: append their tokens. `rows`: (result row - offset, req).
        A request that finishes but is already in the `successor` step becomes its zombie."""
        outputs = []
        in_next = {id(r) for r in successor.batch.reqs} if successor is not None else set()
        for i, req in rows:
            try:
                req.kv_len += 1
                outputs.append(self.out.append_token(req, result, offset + i))
                if not (req.finished or req.pending_tokens):
                    continue
                self.running.remove(req)
                if req.finished and id(req) in in_next:
                    successor.zombies.add(id(req))
                elif req.finished:
                    self.kv.cache_finished(req)
                else:
                    self._park_for_extend(req)
            except Exception as e:  # noqa: BLE001 - this request fails alone
                logger.exception("processing the decode of request %s failed", req.rid)
                if id(req) in in_next:  # its slot in the chained step goes back once that step is done
                    successor.zombies.add(id(req))
                    if req in self.running:
                        self.running.remove(req)
                    outputs.append(self.out.finish(req, FinishReason("abort", message=f"internal error: {e}")))
                else:
                    outputs.extend(self._fail_reqs([(req, None)], f"internal error: {type(e).__name__}: {e}"))
        return outputs

    def _process_decode(self, batch: ScheduleBatch, result, rows: Optional[List[tuple]] = None,
                        successor: Optional[InFlight] = None) -> List[ReqOutput]:
        rows = list(enumerate(batch.reqs)) if rows is None else rows
        outputs = self._advance_decoding(rows, result, 0, successor)
        self.stats.num_decode_batches += 1
        self._decode_tokens_since_log += len(rows)
        if self.stats.num_decode_batches % DECODE_LOG_INTERVAL == 0:
            now = time.perf_counter()
            tput = self._decode_tokens_since_log / max(now - self._last_decode_log, 1e-9)
            self._last_decode_log, self._decode_tokens_since_log = now, 0
            self.stats.last_gen_throughput = tput
            logger.info("Decode batch, #running-req: %d, #token: %d, token usage: %.2f, gen throughput (token/s): "
                        "%.2f, #queue-req: %d, #jump-forward-token: %d", len(self.running),
                        sum(r.kv_len for r in self.running), self.token_usage(), tput, len(self.waiting),
                        self.stats.jump_forward_tokens)
        return outputs

    # ------------------------------------------------------------------ jump-forward parking
    def _park_for_extend(self, req: Req) -> None:
        """A request holding jump-forward tokens goes back to the queue with its computed KV in the
        radix cache; its next admission hits that prefix and extends the new tokens at once."""
        if self.tree_cache.disable:
            self.kv.free(req)
        else:
            self.kv.cache_finished(req)
        req.reset_kv_state()
        self.waiting.append(req)
