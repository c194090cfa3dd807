"""Output processing: what one computed step means for a request's tokens.

Owns: appending a sampled token (and its logprobs) to a request, the stop checks (EOS, stop token
ids, max_new_tokens, context length, stop strings, stop regexes: SGLang reports a regex stop as
{"type": "stop", "matched": <the pattern>}), grammar acceptance and termination,
jump-forward (appending the string a grammar forces), handing out prompt logprobs once, and the
`ReqOutput` each of these produces. It never touches KV memory or the queues: the scheduler decides
what a finished or jump-forwarded request does with its KV.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence

from radixlm.core import FinishReason, Req, ReqOutput


class OutputProcessor:
    def __init__(self, stats, eos_token_ids: Sequence[int], context_len: int, enable_jump_forward: bool,
                 decode_tail: Optional[Callable[[Sequence[int]], str]] = None,
                 encode_text: Optional[Callable[[str], List[int]]] = None):
        self.stats = stats  # the scheduler's SchedulerStats (generated and jump-forward token counts)
        self.eos_token_ids = set(eos_token_ids)
        self.context_len = context_len
        self.enable_jump_forward = enable_jump_forward
        self.decode_tail = decode_tail  # token ids -> text, for stop strings and jump-forward
        self.encode_text = encode_text  # text -> token ids, for jump-forward re-tokenization

    def append_token(self, req: Req, result, i: int) -> ReqOutput:
        tid = result.next_token_ids[i]
        req.output_ids.append(tid)
        new_ids = [tid]
        self.stats.generated_tokens += 1
        lp = tlp = None
        if req.return_logprob:
            lp = [result.logprobs[i]]
            tlp = [result.top_logprobs[i] or []]
            req.output_logprobs.extend(lp)
            req.output_top_logprobs.extend(tlp)
        reason = None
        if req.grammar is not None and not req.grammar.accept_token(tid):
            reason = FinishReason("abort", message=f"the grammar rejected token {tid}")
        if reason is None:
            reason = self.check_finished(req)
        if reason is None and req.grammar is not None:
            if req.grammar.is_terminated():
                reason = FinishReason("stop", matched=tid)
            elif self.enable_jump_forward and not req.return_logprob and not req.sampling_params.stop_strs \
                    and not req.stop_regexes and not req.sampling_params.stop_token_ids:
                # (forced text is never checked for stops)
                new_ids = self.jump_forward(req) or new_ids
                if len(new_ids) > 1:
                    reason = self.check_finished(req)
        if reason is not None:
            req.finished_reason = reason
        return ReqOutput(req.rid, new_ids, reason, len(req.origin_input_ids), len(req.output_ids),
                         req.cached_tokens, lp, tlp, req.num_retractions)

    def jump_forward(self, req: Req) -> Optional[List[int]]:
        """When the grammar allows exactly one continuation string, appends its tokens now (they are
        computed by one extend instead of one decode step each). The last sampled token has no KV
        yet, so it is re-tokenized together with the string: the boundary comes out as the
        tokenizer would write it. Returns the tokens that replace the last one, or None."""
        if self.encode_text is None or self.decode_tail is None:
            return None
        jump = req.grammar.jump_forward_string()
        budget = req.max_new_tokens - len(req.output_ids)
        if not jump or budget <= 0:
            return None
        g, tid = req.grammar, req.output_ids[-1]
        g.rollback(1)
        for cand in (self.encode_text(self.decode_tail([tid]) + jump)[:budget + 1],
                     [tid] + self.encode_text(jump)[:budget]):
            accepted = 0
            for t in cand:
                if not g.accept_token(t):
                    break
                accepted += 1
            if accepted == len(cand) and len(cand) > 1:
                req.output_ids[-1:] = cand
                req.jump_forward_tokens += len(cand) - 1
                self.stats.jump_forward_tokens += len(cand) - 1
                return cand
            g.rollback(accepted)
        g.accept_token(tid)
        return None

    def attach_input_logprobs(self, req: Req, out: ReqOutput) -> ReqOutput:
        """Hands the prompt logprobs out once, with the request's first output."""
        if not req.wants_input_logprobs:
            return out
        start = req.logprob_start_len
        first = [[None, req.origin_input_ids[0]]] if start == 0 else []
        by_pos = {p: (lp, tid, tops) for p, lp, tid, tops in req.input_logprobs}
        rest = [by_pos[p] for p in range(max(start, 1), len(req.origin_input_ids))]
        out.input_token_logprobs = first + [[lp, tid] for lp, tid, _ in rest]
        if req.top_logprobs_num > 0:
            out.input_top_logprobs = ([None] if start == 0 else []) + [tops for _, _, tops in rest]
        req.input_logprobs_sent = True
        req.input_logprobs = []
        return out

    def check_finished(self, req: Req) -> Optional[FinishReason]:
        sp = req.sampling_params
        tid = req.output_ids[-1]
        # (EOS and stop tokens are masked by the sampler until min_new_tokens is reached)
        if not sp.ignore_eos and tid in self.eos_token_ids:
            return FinishReason("stop", matched=tid)
        if sp.stop_token_ids and tid in sp.stop_token_ids:
            return FinishReason("stop", matched=tid)
        if len(req.output_ids) >= req.max_new_tokens:
            return FinishReason("length", length=len(req.output_ids))
        if req.seq_len >= self.context_len:
            return FinishReason("length", length=len(req.output_ids))
        stops = sp.stop_strs
        if stops and self.decode_tail is not None and len(req.output_ids) >= sp.min_new_tokens:
            window = max(len(s) for s in stops) + 4
            tail = self.decode_tail(req.output_ids[-window:])
            for s in stops:
                if s in tail:
                    return FinishReason("stop", matched=s)
        if req.stop_regexes and self.decode_tail is not None and len(req.output_ids) >= sp.min_new_tokens:
            return self.check_stop_regex(req)
        return None

    def check_stop_regex(self, req: Req) -> Optional[FinishReason]:
        """Searches each stop_regex in the decoded tail (its maximum width + 4 tokens; see
        STOP_REGEX_MAX_WINDOW for unbounded patterns). A search that outlives its deadline
        (catastrophic backtracking) aborts the request."""
        window = max(r.width for r in req.stop_regexes) + 4
        tail = self.decode_tail(req.output_ids[-window:])
        for r in req.stop_regexes:
            try:
                if r.search(tail) is not None:
                    return FinishReason("stop", matched=r.pattern)
            except TimeoutError:
                return FinishReason("abort", message=f"stop_regex: matching {r.pattern!r} took too long "
                                                     "(catastrophic backtracking); simplify the pattern")
        return None

    def finish(self, req: Req, reason: FinishReason) -> ReqOutput:
        req.finished_reason = reason
        return ReqOutput(req.rid, [], reason, len(req.origin_input_ids), len(req.output_ids), req.cached_tokens,
                         [] if req.return_logprob else None, [] if req.return_logprob else None,
                         req.num_retractions)
