"""SpecDecoder: the scheduler's decode step when speculative decoding is on.

One step: every running request that can speculate gets up to k drafts from the drafter (NGRAM or
STANDALONE); the DecodeBuilder gives each request 1 + len(drafts) slots (retracting when the pool
is full, as for plain decode); ONE target forward (the extend path, positions kv_len..kv_len+k)
computes logits at every position; acceptance (verify.py) decides the committed tokens; they are
appended one by one through the OutputProcessor, so EOS, stop tokens, stop strings, stop regexes,
max_new_tokens and the context limit are checked after each and nothing past a stop is committed.
A request that committed m tokens keeps the KV of its first m inputs (kv_len += m: the last
committed token has no KV yet, as after a plain decode step); the slots of the rest go back to the
allocator. Finished requests go to the radix cache as usual.

Structured output: a request with a grammar verifies its drafts against the grammar's bitmask at each
position (`_verify_constrained`), so the grammar accepts every committed token; jump-forward still
applies after a committed token. Output logprobs come from the verify step's rows (the raw
distribution, as the Sampler's). Fallbacks (documented in docs): a request with penalties or an unmet
min_new_tokens takes part with no drafts (one token, sampled by the ordinary Sampler, jump-forward
included); when no request has drafts the step is a plain decode
step. Overlap scheduling is off while speculating (the Scheduler does not build it).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence

import torch

from radixlm.core import Req, ReqOutput, ScheduleBatch
from radixlm.engine.sampler import SampleOutput, apply_logit_bias, top_k_top_p_min_p_probs
from radixlm.sched.kv_ownership import step_slots
from radixlm.speculative.verify import greedy_accept_batched, greedy_accept_reference, speculative_sample_reference

if TYPE_CHECKING:
    from radixlm.sched.scheduler import Scheduler

logger = logging.getLogger("radixlm.sched.scheduler")


def can_speculate(req: Req) -> bool:
    """Requests whose next tokens the verify step can decide on its own (see the module docstring)."""
    sp = req.sampling_params
    return (sp.repetition_penalty == 1.0
            and not sp.frequency_penalty and not sp.presence_penalty
            and len(req.output_ids) >= sp.min_new_tokens and req.kv.kv_len > 0)


def target_probs(logits: torch.Tensor, req: Req) -> torch.Tensor:
    """The target's sampling distribution over the vocabulary at each row (temperature, top-k,
    top-p, min-p; the same filtering as the Sampler)."""
    sp = req.sampling_params
    n, vocab = logits.shape
    dev = logits.device
    probs, idx = top_k_top_p_min_p_probs(
        logits.float(), torch.full((n,), sp.temperature, device=dev),
        torch.full((n,), sp.top_k if sp.top_k > 0 else vocab, device=dev),
        torch.full((n,), sp.top_p, device=dev), torch.full((n,), sp.min_p, device=dev))
    return torch.zeros_like(probs).scatter_(1, idx, probs)


class SpecDecoder:
    def __init__(self, sched: "Scheduler", drafter, num_steps: int):
        self.sched = sched
        self.drafter = drafter
        self.num_steps = num_steps
        self._slots_held: Optional[torch.Tensor] = None  # the step's slots of the request being committed
        self._raw: Dict[int, torch.Tensor] = {}  # this step's raw logprob rows of requests with return_logprob

    # ------------------------------------------------------------------ drafting
    def _budget(self, req: Req) -> int:
        """Drafts this request may take: num_steps, fewer near max_new_tokens or the context end."""
        left_new = req.max_new_tokens - len(req.output_ids) - 1
        left_ctx = self.sched.max_req_len - req.seq_len - 1
        return max(0, min(self.num_steps, left_new, left_ctx))

    def step(self) -> List[ReqOutput]:
        """One decode step over the running requests: a verify step when some request has drafts,
        else a plain decode step (CUDA graphs apply); either counts as a verify step of each request."""
        s = self.sched
        reqs = list(s.q.running)
        if hasattr(self.drafter, "gc"):
            self.drafter.gc(s.q.live() + s.q.waiting)
        ks = [self._budget(r) if can_speculate(r) else 0 for r in reqs]
        drafts, qs = self.drafter.propose(reqs, ks) if any(ks) else ([[] for _ in reqs], [None] * len(reqs))
        by_req = {id(r): q for r, q in zip(reqs, qs)}
        batch, outputs = s.decode.build({id(r): d for r, d in zip(reqs, drafts) if d})
        if batch is None:
            return outputs
        try:
            if batch.spec_drafts is None:  # no drafts this step: plain decode, every row a fallback row
                batch.spec_drafts = [[] for _ in batch.reqs]
                self._raw = {}
                committed = [None] * batch.batch_size
                fallback, rows = s.runner.forward_and_sample(batch), {i: i for i in range(batch.batch_size)}
            else:
                committed, fallback, rows = self.verify(batch, [by_req[id(r)] for r in batch.reqs])
        except Exception as e:  # noqa: BLE001 - fail this batch's requests, keep serving the rest
            logger.exception("verify forward failed for a batch of %d requests", batch.batch_size)
            return outputs + s._fail_batch(f"internal error: {type(e).__name__}: {e}", batch)
        done = self.commit(batch, committed, fallback, rows)
        outputs += done
        s.stats.log_decode(sum(len(o.new_token_ids) for o in done), len(s.q.running),
                           sum(r.kv.kv_len for r in s.q.running), s.token_usage(), len(s.q.waiting))
        return outputs

    # ------------------------------------------------------------------ verification
    @torch.inference_mode()
    def verify(self, batch: ScheduleBatch, qs: Sequence[Optional[torch.Tensor]]):
        """Returns (committed tokens per request, or None for requests without drafts; the Sampler's
        output for those; their row in it)."""
        logits = self.sched.runner.forward_all_logits(batch).float()
        self._raw = {i: torch.log_softmax(logits[sum(batch.extend_lens[:i]):sum(batch.extend_lens[:i + 1])], dim=-1)
                     for i, (r, d) in enumerate(zip(batch.reqs, batch.spec_drafts)) if d and r.return_logprob}
        starts = [0]
        for n in batch.extend_lens:
            starts.append(starts[-1] + n)
        reqs, drafts = batch.reqs, batch.spec_drafts
        plain = [i for i, d in enumerate(drafts) if not d]
        fallback, rows = None, {}
        if plain:
            idx = torch.tensor([starts[i] for i in plain], device=logits.device)
            fallback = self.sched.runner.sampler(logits[idx], [reqs[i] for i in plain])
            rows = {i: j for j, i in enumerate(plain)}
        committed: List[Optional[List[int]]] = [None] * len(reqs)
        spec = [i for i, d in enumerate(drafts) if d]
        if any(reqs[i].sampling_params.logit_bias for i in spec):  # (plain rows: the Sampler applied it)
            expanded = [reqs[i] if d else None for i, d in enumerate(drafts) for _ in range(batch.extend_lens[i])]
            rows_b = [j for j, r in enumerate(expanded) if r is not None]
            sub = logits[rows_b]
            apply_logit_bias(sub, [expanded[j] for j in rows_b])
            logits[rows_b] = sub
        for i in spec:
            if reqs[i].grammar is not None:
                committed[i] = self._verify_constrained(logits[starts[i]:starts[i + 1]], reqs[i], drafts[i], qs[i])
        greedy = [i for i in spec if reqs[i].sampling_params.is_greedy and committed[i] is None]
        if greedy:
            k = max(len(drafts[i]) for i in greedy)
            pos = torch.tensor([[starts[i] + min(j, len(drafts[i])) for j in range(k + 1)] for i in greedy],
                               device=logits.device)
            target = logits.argmax(dim=-1)[pos]
            dr = torch.tensor([drafts[i] + [-1] * (k - len(drafts[i])) for i in greedy], device=logits.device)
            nd = torch.tensor([len(drafts[i]) for i in greedy], device=logits.device)
            accepted, bonus = greedy_accept_batched(dr, nd, target)
            for i, a, b in zip(greedy, accepted.tolist(), bonus.tolist()):
                committed[i] = drafts[i][:a] + [b]
        for i in spec:
            if committed[i] is None:
                p = target_probs(logits[starts[i]:starts[i + 1]], reqs[i])
                committed[i] = speculative_sample_reference(p, drafts[i], qs[i], reqs[i].generator)
        return committed, fallback, rows

    def _verify_constrained(self, rows: torch.Tensor, req: Req, drafts: List[int], q: Optional[torch.Tensor]
                            ) -> List[int]:
        """A request with a grammar: each position's logits are masked by the grammar's bitmask in the
        state after the drafts before it (the matcher accepts the drafts, then rolls back; the
        OutputProcessor accepts the committed tokens for real). Drafts after the first one the grammar
        refuses cannot be accepted and are dropped; that one stays (its masked probability is 0, so it
        is rejected, and the rejection sampler draws from the right residual)."""
        g, backend = req.grammar, self.sched.runner.sampler.grammar_backend
        k = len(drafts)
        bitmask = backend.allocate_bitmask(k + 1)
        g.fill_bitmask(bitmask, 0)
        m = 0
        while m < k and g.accept_token(drafts[m]):
            m += 1
            g.fill_bitmask(bitmask, m)
        g.rollback(m)
        n_rows = m + 1  # rows with a grammar state
        drafts = drafts[:m + 1] if m < k else drafts
        rows = rows[:len(drafts) + 1].clone()
        backend.apply_bitmask(rows, bitmask, list(range(n_rows)))
        dead = ~torch.isfinite(rows[:n_rows]).any(dim=1)
        if dead.any():  # as the Sampler: nothing allowed (cannot happen with min_new_tokens met): let it end
            eos = self.sched.runner.sampler.eos_token_ids
            rows[:n_rows][dead, eos[0] if eos else 0] = 0.0
        if req.sampling_params.is_greedy:
            return greedy_accept_reference(drafts, rows.argmax(dim=-1).tolist())
        p = target_probs(rows, req)
        return speculative_sample_reference(p, drafts, None if q is None else q[:len(drafts)], req.generator)

    # ------------------------------------------------------------------ results
    def commit(self, batch: ScheduleBatch, committed: List[Optional[List[int]]], fallback: Optional[SampleOutput],
               rows: Dict[int, int]) -> List[ReqOutput]:
        s = self.sched
        outputs = []
        for i, (req, slots) in enumerate(step_slots(batch)):
            self._slots_held = slots
            try:
                outputs.append(self._commit_one(req, batch.spec_drafts[i], committed[i], fallback, rows.get(i),
                                                self._raw.get(i)))
                if not (req.finished or req.pending_tokens):
                    continue
                s.q.running.remove(req)
                self.drafter.release(req)
                if req.finished:
                    s.kv.cache_finished(req)
                else:
                    s.park_for_extend(req)
            except Exception as e:  # noqa: BLE001 - this request fails alone
                logger.exception("processing the verify step of request %s failed", req.rid)
                self.drafter.release(req)
                outputs += s._fail_reqs([(req, self._slots_held)], f"internal error: {type(e).__name__}: {e}")
        return outputs

    @staticmethod
    def _token_output(t: int, raw: Optional[torch.Tensor], j: int, req: Req) -> SampleOutput:
        """One committed token as the OutputProcessor takes it, with its logprobs from verify row j."""
        if raw is None:
            return SampleOutput(next_token_ids=[t])
        tops = None
        if req.top_logprobs_num > 0:
            v, ids = raw[j].topk(min(req.top_logprobs_num, raw.shape[1]))
            tops = list(zip(v.tolist(), ids.tolist()))
        return SampleOutput(next_token_ids=[t], logprobs=[float(raw[j, t])], top_logprobs=[tops])

    def _commit_one(self, req: Req, drafts: List[int], tokens: Optional[List[int]],
                    fallback: Optional[SampleOutput], row: Optional[int], raw: Optional[torch.Tensor] = None
                    ) -> ReqOutput:
        """Appends the committed tokens one at a time (stop checks after each), keeps the KV of the
        inputs they follow and frees the slots of the rest."""
        s = self.sched
        old_kv = req.kv.kv_len
        if tokens is None:  # no drafts: the ordinary Sampler's token (grammar, logprobs, jump-forward)
            req.kv.kv_len = old_kv + 1
            out = s.out.append_token(req, fallback, row)
        else:
            parts = []
            for j, t in enumerate(tokens, 1):
                req.kv.kv_len = old_kv + j  # the j-th input (last token, then d_1 ...) has KV now
                parts.append(s.out.append_token(req, self._token_output(t, raw, j - 1, req), 0))
                if req.finished or req.pending_tokens:  # (pending: the grammar's jump-forward appended text)
                    break
            out = parts[-1]
            out.new_token_ids = [t for p in parts for t in p.new_token_ids]
            if raw is not None:
                out.new_logprobs = [x for p in parts for x in p.new_logprobs]
                out.new_top_logprobs = [x for p in parts for x in p.new_top_logprobs]
            accepted = min(len(parts), len(tokens) - 1)  # drafts verified and committed
            req.spec_draft_tokens += len(drafts)
            req.spec_accepted_tokens += accepted
            s.stats.spec_draft_tokens += len(drafts)
            s.stats.spec_accepted_tokens += accepted
        req.spec_verify_ct += 1
        s.stats.spec_verify_ct += 1
        s.stats.spec_committed_tokens += len(out.new_token_ids)
        rejected = s.kv.row(req)[req.kv.kv_len:old_kv + 1 + len(drafts)]
        if rejected.numel():
            s.allocator.free(rejected.clone())
        self._slots_held = None  # from here on the request's row says what it holds
        out.spec_stats = (req.spec_verify_ct, req.spec_draft_tokens, req.spec_accepted_tokens)
        return out


def create_spec_decoder(sched: "Scheduler", cfg, draft_runner=None) -> SpecDecoder:
    """The SpecDecoder of `cfg.speculative_algorithm` (SchedulerConfig)."""
    if cfg.speculative_algorithm == "NGRAM":
        from radixlm.speculative.ngram import NgramDrafter

        return SpecDecoder(sched, NgramDrafter(cfg.speculative_ngram_max_trie_depth), cfg.speculative_num_steps)
    if cfg.speculative_algorithm == "STANDALONE":
        if draft_runner is None:
            raise ValueError("speculative_draft_model_path: STANDALONE needs a draft model runner")
        from radixlm.speculative.standalone import StandaloneDrafter

        return SpecDecoder(sched, StandaloneDrafter(draft_runner, sched.runner), cfg.speculative_num_steps)
    raise ValueError(f"speculative_algorithm: {cfg.speculative_algorithm!r} is not one of NGRAM, STANDALONE")
