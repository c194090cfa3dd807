"""Scheduler: continuous batching over the radix cache and the KV pool.

Owns the request queues (sched/queues.py), the radix cache and KV ownership of every request, and
the loop of one step: form a batch (prefill admission in sched/prefill.py has priority; else every
running request decodes, sched/decode.py, retracting when the pool is full), have the model runner
compute it, hand the sampled tokens to the OutputProcessor (sched/output_processor.py: stop checks,
grammar, jump-forward), put each request where it belongs next (running, finished with its KV
cached, back in the queue), and return `ReqOutput`s. With overlap scheduling (sched/overlap.py) a
decode step computes while the previous one is processed. It never tokenizes full texts and never
touches HTTP.

Failures stay local: an exception while forming a batch fails the requests it was admitting, one
in a forward fails that batch's requests, one while processing a request's output fails that
request; each gives back all its KV and locks, and the others go on.

KV ownership (the invariant `check_integrity` verifies): every pool slot is free, held by the
radix tree, or held by exactly one request as `req_to_token[row, cache_protected_len:kv_len]`.
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from radixlm.constrained.grammar_manager import GrammarManager
from radixlm.core import FinishReason, Req, ReqKV, ReqOutput, ScheduleBatch
from radixlm.mem.radix_cache import RadixCache
from radixlm.sched.decode import DecodeBuilder, TokenRatio
from radixlm.sched.kv_ownership import KVOwnership, step_slots
from radixlm.sched.output_processor import OutputProcessor
from radixlm.sched.overlap import InFlight, Overlap
from radixlm.sched.prefill import PrefillBuilder
from radixlm.sched.queues import ReqQueues
from radixlm.sched.stats import SchedulerStats
from radixlm.server_args import DEFAULT_CHUNKED_PREFILL_SIZE, DEFAULT_MAX_RUNNING_REQUESTS, default_of

if TYPE_CHECKING:
    from radixlm.engine.model_runner import ModelRunner
    from radixlm.engine.sampler import SampleOutput

logger = logging.getLogger(__name__)


@dataclass
class SchedulerConfig:
    """The scheduler's options; `derive_config(SchedulerConfig, server_args, ...)` builds it from the
    validated ServerArgs (defaults come from there too)."""

    schedule_policy: str = default_of("schedule_policy")
    max_running_requests: int = DEFAULT_MAX_RUNNING_REQUESTS
    max_prefill_tokens: int = default_of("max_prefill_tokens")
    chunked_prefill_size: Optional[int] = DEFAULT_CHUNKED_PREFILL_SIZE  # None: no chunking (ServerArgs resolves it)
    schedule_conservativeness: float = default_of("schedule_conservativeness")
    disable_radix_cache: bool = False
    random_seed: int = default_of("random_seed")
    enable_jump_forward: bool = True
    enable_mixed_chunk: bool = False  # running requests decode inside prefill steps instead of waiting
    enable_overlap: bool = False  # decode step N+1 computes while step N's results are processed
    debug_integrity_check: bool = False  # an invariant violation found when idle stops the scheduler
    enable_priority_scheduling: bool = False  # waiting requests ordered by `priority` first
    schedule_low_priority_values_first: bool = False  # with it: lower values first (SGLang's flag)
    lora_slots: Optional[int] = None  # --max-loras-per-batch with LoRA on: distinct adapters (base counts) running
    speculative_algorithm: Optional[str] = None  # NGRAM | STANDALONE (radixlm/speculative/); turns overlap off
    speculative_num_steps: Optional[int] = None  # drafts per request and verify step (resolved by ServerArgs)
    speculative_ngram_max_trie_depth: int = default_of("speculative_ngram_max_trie_depth")

    @property
    def priority_sign(self) -> int:
        """order_waiting's priority_sign: 0 off, 1 higher values first, -1 lower values first."""
        if not self.enable_priority_scheduling:
            return 0
        return -1 if self.schedule_low_priority_values_first else 1


class Scheduler:
    def __init__(self, runner: "ModelRunner", cfg: SchedulerConfig, context_len: int,
                 decode_tail: Optional[Callable[[Sequence[int]], str]] = None,
                 encode_text: Optional[Callable[[str], List[int]]] = None,
                 grammar_factory: Optional[Callable[[], object]] = None, pd=None, draft_runner=None):
        self.runner = runner
        self.pd = pd  # PD disaggregation: PrefillBootstrap / DecodeTransfers (radixlm/disaggregation), or None
        self.cfg = cfg
        self.context_len = context_len
        self.grammars = GrammarManager(grammar_factory, runner.sampler)
        self.allocator = runner.allocator
        self.req_to_token_pool = runner.req_to_token_pool
        self.page_size = self.allocator.page_size
        self.tree_cache = RadixCache(self.allocator, page_size=self.page_size, disable=cfg.disable_radix_cache)
        self.kv = KVOwnership(self.allocator, self.req_to_token_pool, self.tree_cache)
        self.q = ReqQueues()
        self.stats = SchedulerStats()
        self.out = OutputProcessor(self.stats, runner.model_config.eos_token_ids, context_len,
                                   cfg.enable_jump_forward, decode_tail, encode_text)
        self.ratio = TokenRatio(cfg.schedule_conservativeness)
        self.prefill = PrefillBuilder(cfg, self.q, self.kv, self.ratio, self.stats)
        self.decode = DecodeBuilder(self.q, self.kv, self.ratio, self.stats, self.out)
        # overlap needs slots of one token per page: a paged allocation would have to read the
        # in-flight token's slot back from the device
        self.overlap = Overlap(runner, self.q, self.kv, self.ratio, self.stats, context_len) \
            if cfg.enable_overlap and self.page_size == 1 and not cfg.speculative_algorithm else None
        self.spec = None  # speculative decoding's decode step (radixlm/speculative/worker.py)
        if cfg.speculative_algorithm:
            from radixlm.speculative.worker import create_spec_decoder

            self.spec = create_spec_decoder(self, cfg, draft_runner)
        self._inflight: Optional[InFlight] = None
        self._arrivals = 0

    # ------------------------------------------------------------------ queues
    @property
    def waiting(self) -> List[Req]:
        return self.q.waiting

    @property
    def running(self) -> List[Req]:
        return self.q.running

    @property
    def chunked_req(self) -> Optional[Req]:
        return self.q.chunked_req

    def live_reqs(self) -> List[Req]:
        return self.q.live() + (self.pd.pending_reqs() if self.pd is not None else [])

    @property
    def new_token_ratio(self) -> float:
        return self.ratio.value

    @property
    def max_total_num_tokens(self) -> int:
        return self.allocator.size

    @property
    def max_req_len(self) -> int:
        """Longest sequence (prompt + output) one request can hold: the context, or the KV pool."""
        return min(self.context_len, self.allocator.size)

    def token_usage(self) -> float:
        return self.kv.token_usage()

    def has_work(self) -> bool:
        return bool(self.q) or self._inflight is not None or (self.pd is not None and self.pd.has_work())

    # ------------------------------------------------------------------ requests in, out
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
        if req.lora_path is not None:  # its own radix-cache namespace: this load of this adapter
            lora = getattr(self.runner, "lora_manager", None)
            if lora is None:
                raise ValueError("lora_path: LoRA is not enabled on this server (--enable-lora / --lora-paths)")
            req.cache_namespace = (req.cache_namespace, "lora", req.lora_path, lora.uid_of(req.lora_path))
        dev = torch.device(self.runner.device)
        if req.generator is not None and req.generator.device != dev:  # sample on the device: no host sync
            req.generator = torch.Generator(device=dev).manual_seed(req.generator.initial_seed())
        self.grammars.start(req)
        req.arrival_seq = self._arrivals
        self._arrivals += 1
        if self.pd is not None and req.bootstrap_room is not None:
            self.pd.add(req)  # decode: waits for a KV reservation, then for the prefill worker's KV
            if not self.pd.is_prefill:
                return
        self.q.waiting.append(req)

    def grammar_backend(self):
        return self.grammars.backend()

    def _resolve_grammars(self) -> List[ReqOutput]:
        """Requests whose grammar finished compiling become schedulable (or fail with its error)."""
        outputs = []
        for req, message in self.grammars.resolve(self.q.waiting):
            self.q.waiting.remove(req)
            outputs.append(self.out.finish(req, FinishReason("abort", message=message)))
        return outputs

    def abort_request(self, rid: str) -> List[ReqOutput]:
        """Aborts a queued or running request; frees everything it held. (A step in flight is
        completed first; its outputs are returned too.)"""
        out = self.drain()
        for req in [r for r in self.q.waiting + self.q.live() if r.rid == rid]:
            self.q.remove(req)
            self.kv.free(req)
            if self.spec is not None:
                self.spec.drafter.release(req)
            out.append(self.out.finish(req, FinishReason("abort", message="Aborted by the client")))
        for req in self.pd.drop(rid) if self.pd is not None else []:
            out.append(self.out.finish(req, FinishReason("abort", message="Aborted by the client")))
        return out

    def drain(self) -> List[ReqOutput]:
        """Completes the step in flight (overlap scheduling), so host state is current."""
        cur, self._inflight = self._inflight, None
        return self._complete(cur, None) if cur is not None else []

    def shutdown(self) -> None:
        if self.overlap is not None:
            self.overlap.shutdown()
        if self.pd is not None:
            self.pd.close()

    def flush_cache(self) -> bool:
        """Empties the radix cache; only possible when no request is in flight. (Counters are kept:
        they only grow.)"""
        if self.has_work():
            return False
        self.tree_cache.reset()
        return True

    # ------------------------------------------------------------------ one step
    def step(self) -> List[ReqOutput]:
        """Runs one batch; returns what each touched request produced. With overlap scheduling a
        decode step may still be computing when this returns; the next call completes it."""
        if self._inflight is None:
            return self._step_fresh()
        cur = self._inflight
        # PD transfers are polled, and requests join from them, only with no step in flight: no chaining then
        pd_busy = self.pd is not None and self.pd.has_work()
        self._inflight = nxt = None if pd_busy else self.overlap.chain(cur)
        outputs = self._complete(cur, nxt)
        if nxt is None:  # nothing chained: the next batch is built from the now current state
            outputs += self._step_fresh()
        return outputs

    def _step_fresh(self) -> List[ReqOutput]:
        outputs = self.pd.poll(self) if self.pd is not None else []
        if self.q.waiting:
            outputs += self._resolve_grammars()
        batch, failed = self._prefill_batch()
        outputs += failed
        if batch is None and self.q.running and self.spec is not None:  # speculative decode / verify step
            return outputs + self.spec.step()
        if batch is None and self.q.running:
            batch, aborted = self.decode.build()
            outputs += aborted
        if batch is None:
            if not self.has_work():
                self.ratio.reset()
            elif self.grammars.compiling(self.q.waiting):
                time.sleep(0.001)  # only requests waiting for their grammar: do not spin
            return outputs
        if self.overlap is not None and batch.forward_mode.is_decode:
            self._inflight = self.overlap.launch(batch)
            return outputs
        try:
            result = self.runner.forward_and_sample(batch)
        except Exception as e:  # noqa: BLE001 - fail this batch's requests, keep serving the rest
            logger.exception("forward failed for a batch of %d requests", batch.batch_size)
            return outputs + self._fail_batch(f"internal error: {type(e).__name__}: {e}", batch)
        if batch.forward_mode.is_decode:
            return outputs + self._process_decode(batch, result)
        outputs += self._process_prefill(batch, result)
        if batch.num_mixed_decode:
            n = batch.batch_size - batch.num_mixed_decode
            outputs += self._advance_decoding(list(enumerate(batch.reqs[n:])), result, sum(batch.sample[:n]))
        return outputs

    def _prefill_batch(self) -> Tuple[Optional[ScheduleBatch], List[ReqOutput]]:
        """This step's extend batch (or None), and the aborts of the requests it was admitting when
        forming it raised (an exception fails only them)."""
        if not self.q.waiting and self.q.chunked_req is None:
            return None, []
        admitted: List[Req] = []
        try:
            return self.prefill.build(admitted), []
        except Exception as e:  # noqa: BLE001 - a bug or a bad request fails its batch, not the server
            logger.exception("forming a prefill batch failed; failing its %d requests", len(admitted))
            return None, self._fail_reqs([(r, None) for r in admitted], f"internal error: {type(e).__name__}: {e}")

    def _complete(self, cur: InFlight, successor: Optional[InFlight]) -> List[ReqOutput]:
        """Waits for the overlapped step `cur` and processes its results; requests that finish now but
        are in `successor` already become its zombies."""
        try:
            result = self.overlap.wait(cur)
        except Exception as e:  # noqa: BLE001 - fail this batch (and the one that consumed its ids)
            logger.exception("forward failed for a batch of %d requests", cur.batch.batch_size)
            msg = f"internal error: {type(e).__name__}: {e}"
            if successor is None:
                return self._fail_batch(msg, cur.batch)
            self._inflight = None
            successor.future.exception()  # it fails too (it needed cur's ids); wait until it is done
            return self._fail_batch(msg, cur.batch, successor.batch)
        live = [(i, r) for i, r in enumerate(cur.batch.reqs) if not cur.is_zombie(r)]
        return self._process_decode(cur.batch, result, live, successor)

    # ------------------------------------------------------------------ results
    def _process_prefill(self, batch: ScheduleBatch, result: "SampleOutput") -> List[ReqOutput]:
        outputs: List[ReqOutput] = []
        n = batch.batch_size - batch.num_mixed_decode  # mixed-in decoding requests are handled after
        rows = list(itertools.accumulate(batch.sample[:n], initial=0))  # request i's row in the result
        slots = step_slots(batch)
        for i, (req, do_sample) in enumerate(zip(batch.reqs[:n], batch.sample[:n])):
            try:
                outputs += self._prefill_done(req, batch.extend_lens[i], do_sample, result, i, rows[i])
            except Exception as e:  # noqa: BLE001 - this request fails alone
                logger.exception("processing the prefill of request %s failed", req.rid)
                outputs += self._fail_reqs([(req, slots[i][1])], f"internal error: {type(e).__name__}: {e}")
        return outputs

    def _prefill_done(self, req: Req, extend_len: int, do_sample: bool, result: "SampleOutput", i: int,
                      row: int) -> List[ReqOutput]:
        """Request i of an extend batch computed its `extend_len` tokens (result row `row` when it
        sampled)."""
        if result.input_logprobs is not None and result.input_logprobs[i]:
            req.input_logprobs.extend(result.input_logprobs[i])
        req.kv.kv_len += extend_len
        if req is self.q.chunked_req and req.kv.kv_len < req.seq_len:
            self.kv.cache_unfinished(req)
            return []
        if req is self.q.chunked_req:
            self.q.chunked_req = None
        if not do_sample:  # max_new_tokens already reached (0): prefill only
            self.kv.cache_finished(req)
            return [self.out.attach_input_logprobs(
                req, self.out.finish(req, FinishReason("length", length=len(req.output_ids))))]
        out = self.out.attach_input_logprobs(req, self.out.append_token(req, result, row))
        if self.pd is not None and self.pd.is_prefill and req.bootstrap_room is not None:
            self.pd.prefilled(self, req, out)  # its KV goes to the decode worker; `out` is sent after
            return []
        if req.finished:
            self.kv.cache_finished(req)
        elif req.pending_tokens:
            self.park_for_extend(req)
        else:
            self.kv.cache_unfinished(req)
            self.q.running.append(req)
        return [out]

    def _process_decode(self, batch: ScheduleBatch, result: "SampleOutput", rows: Optional[List[tuple]] = None,
                        successor: Optional[InFlight] = None) -> List[ReqOutput]:
        rows = list(enumerate(batch.reqs)) if rows is None else rows
        outputs = self._advance_decoding(rows, result, 0, successor)
        self.stats.log_decode(len(rows), len(self.q.running), sum(r.kv.kv_len for r in self.q.running),
                              self.token_usage(), len(self.q.waiting))
        return outputs

    def _advance_decoding(self, rows: List[tuple], result: "SampleOutput", offset: int,
                          successor: Optional[InFlight] = None) -> List[ReqOutput]:
        """Decoding requests took one step: append their tokens. `rows`: (result row - offset, req).
        A request that finishes but is already in the `successor` step becomes its zombie."""
        outputs = []
        in_next = {id(r) for r in successor.batch.reqs} if successor is not None else set()
        for i, req in rows:
            try:
                req.kv.kv_len += 1
                outputs.append(self.out.append_token(req, result, offset + i))
                if not (req.finished or req.pending_tokens):
                    continue
                self.q.running.remove(req)
                if req.finished and id(req) in in_next:
                    successor.zombies.add(id(req))
                elif req.finished:
                    self.kv.cache_finished(req)
                else:
                    self.park_for_extend(req)
            except Exception as e:  # noqa: BLE001 - this request fails alone
                logger.exception("processing the decode of request %s failed", req.rid)
                if id(req) in in_next:  # its slot in the chained step goes back once that step is done
                    successor.zombies.add(id(req))
                    self.q.remove(req)
                    outputs.append(self.out.finish(req, FinishReason("abort", message=f"internal error: {e}")))
                else:
                    outputs += self._fail_reqs([(req, None)], f"internal error: {type(e).__name__}: {e}")
        return outputs

    def park_for_extend(self, req: Req) -> None:
        """A request holding jump-forward tokens goes back to the queue with its computed KV in the
        radix cache; its next admission hits that prefix and extends the new tokens at once."""
        if self.tree_cache.disable:
            self.kv.free(req)
        else:
            self.kv.cache_finished(req)
        req.kv = ReqKV()
        self.q.waiting.append(req)

    # ------------------------------------------------------------------ failures and invariants
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
            self.q.remove(req)
            if self.spec is not None:
                self.spec.drafter.release(req)
        self.kv.free_with_step_slots([r for r, _ in reqs], [sl for _, sl in reqs])
        self.stats.num_failed_reqs += len(reqs)
        return [self.out.finish(r, FinishReason("abort", message=message)) for r, _ in reqs if not r.finished]

    def recover(self, message: str) -> List[ReqOutput]:
        """Last resort after an exception escaped `step()` (a bug: step() fails only the batch
        that raised): fails the requests that hold KV (the step in flight, running and chunked
        ones), returning their memory; queued requests stay queued."""
        cur, self._inflight = self._inflight, None
        if cur is not None:
            cur.future.exception()  # let the worker finish with it before its slots are freed
        reqs: Dict[int, tuple] = {id(r): (r, None) for r in self.q.live()}
        if cur is not None:
            reqs.update({id(r): (r, sl) for r, sl in step_slots(cur.batch)})
        return self._fail_reqs(list(reqs.values()), message)

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

    def check_integrity(self) -> None:
        """Every slot is free, in the tree, or owned by exactly one live request (or by the step in
        flight, whose slots come after each request's kv_len)."""
        inflight = self._inflight.batch.reqs if self._inflight is not None else []
        extra = {id(r): 1 for r in inflight}
        live = {id(r): r for r in self.q.live() + inflight}
        self.kv.check_integrity(live.values(), extra)
        if not self.has_work() and self.tree_cache.protected_size() != 0:
            raise RuntimeError(f"idle scheduler but {self.tree_cache.protected_size()} tokens still locked")
