"""Scheduler statistics and SGLang's scheduler log lines ("Prefill batch, ...", "Decode batch,
..."). Counters only grow (a cache flush does not reset them: Prometheus counters never go back);
`last_*` fields are gauges of the latest step or log interval."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

logger = logging.getLogger("radixlm.sched.scheduler")

DECODE_LOG_INTERVAL = 40  # decode steps between two "Decode batch" log lines


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
    # speculative decoding: verify steps (per request), drafts proposed / accepted, tokens they committed
    spec_verify_ct: int = 0
    spec_draft_tokens: int = 0
    spec_accepted_tokens: int = 0
    spec_committed_tokens: int = 0
    _last_decode_log: float = field(default_factory=time.perf_counter, repr=False)
    _decode_tokens_since_log: int = field(default=0, repr=False)

    @property
    def cache_hit_rate(self) -> float:
        total = self.prefill_new_tokens + self.prefill_cached_tokens
        return self.prefill_cached_tokens / total if total else 0.0

    @property
    def spec_accept_length(self) -> float:
        """Tokens committed per request per verify step (SGLang's accept length), over all steps."""
        return self.spec_committed_tokens / self.spec_verify_ct if self.spec_verify_ct else 0.0

    @property
    def spec_accept_rate(self) -> float:
        """Share of the proposed drafts that were accepted."""
        return self.spec_accepted_tokens / self.spec_draft_tokens if self.spec_draft_tokens else 0.0

    def log_prefill(self, num_reqs: int, new_tokens: int, cached: int, token_usage: float, running: int,
                    queued: int) -> None:
        self.num_prefill_batches += 1
        self.prefill_new_tokens += new_tokens
        self.prefill_cached_tokens += cached
        self.last_hit_rate = cached / (cached + new_tokens) if cached + new_tokens else 0.0
        logger.info(
            "Prefill batch, #new-seq: %d, #new-token: %d, #cached-token: %d, token usage: %.2f, "
            "#running-req: %d, #queue-req: %d, cache hit rate: %.2f%%, running hit rate: %.2f%%",
            num_reqs, new_tokens, cached, token_usage, running, queued, 100 * self.last_hit_rate,
            100 * self.cache_hit_rate)

    def log_decode(self, num_tokens: int, running: int, kv_tokens: int, token_usage: float, queued: int) -> None:
        self.num_decode_batches += 1
        self._decode_tokens_since_log += num_tokens
        if self.num_decode_batches % DECODE_LOG_INTERVAL:
            return
        now = time.perf_counter()
        tput = self._decode_tokens_since_log / max(now - self._last_decode_log, 1e-9)
        self._last_decode_log, self._decode_tokens_since_log = now, 0
        self.last_gen_throughput = tput
        spec = (f"accept len: {self.spec_accept_length:.2f}, accept rate: {self.spec_accept_rate:.2f}, "
                if self.spec_verify_ct else "")
        logger.info("Decode batch, #running-req: %d, #token: %d, token usage: %.2f, %sgen throughput (token/s): "
                    "%.2f, #queue-req: %d, #jump-forward-token: %d", running, kv_tokens, token_usage, spec, tput,
                    queued, self.jump_forward_tokens)
