"""Sampler: turns a batch's last-position logits into next tokens (and logprobs when asked).

Owns the logit processing order: logprobs of the raw distribution are taken first; then
repetition / frequency / presence penalties (PenaltyTracker: per-request running token counts on
the device, updated with each step's new tokens only; apply_penalties_reference is the from-scratch
reference), logit_bias, the min_new_tokens EOS mask; then greedy
argmax for greedy rows, and temperature -> top-k -> top-p -> min-p -> multinomial for the others.
A request with a seed samples from its own generator, so its output does not depend on the rest
of the batch. Rows without a feature pay nothing for it.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

from radixlm.core import Req


@dataclass
class SampleOutput:
    next_token_ids: List[int]
    logprobs: Optional[List[float]] = None  # per row, None entries for rows that did not ask
    top_logprobs: Optional[List[Optional[list]]] = None
    input_logprobs: Optional[List[Optional[list]]] = None  # per batch request (see ModelRunner.input_logprobs)
    # the sampled ids on the device (the overlap scheduler feeds them to the next step without a sync)
    next_token_ids_device: Optional[torch.Tensor] = None
    # deferred host copy: (ids host tensor, event or None); `resolve()` fills next_token_ids from it
    _pending: Optional[tuple] = None

    def resolve(self) -> "SampleOutput":
        """Waits for a deferred device->host copy of the ids (no-op otherwise)."""
        if self._pending is not None:
            host, event = self._pending
            if event is not None:
                event.synchronize()
            self.next_token_ids = host.tolist()
            self._pending = None
        return self


def apply_penalties_reference(logits: torch.Tensor, reqs: Sequence[Req]) -> None:
    """Plain reference: recomputes each request's token set and counts from scratch, O(prompt +
    output) per step. `PenaltyTracker` must give identical logits (tested)."""
    for i, r in enumerate(reqs):
        sp = r.sampling_params
        if sp.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(r.origin_input_ids) | set(r.output_ids)), dtype=torch.long,
                                device=logits.device)
            vals = logits[i, seen]
            logits[i, seen] = torch.where(vals > 0, vals / sp.repetition_penalty, vals * sp.repetition_penalty)
        if (sp.frequency_penalty or sp.presence_penalty) and r.output_ids:
            out = torch.tensor(r.output_ids, dtype=torch.long, device=logits.device)
            counts = torch.bincount(out, minlength=logits.shape[1]).to(logits.dtype)
            logits[i] -= sp.frequency_penalty * counts + sp.presence_penalty * (counts > 0).to(logits.dtype)


def _wants_penalty(sp) -> bool:
    return sp.repetition_penalty != 1.0 or bool(sp.frequency_penalty) or bool(sp.presence_penalty)


class _PenaltyState:
    """One request's running token statistics on the device: `seen` (prompt and output tokens, for
    the repetition penalty), `counts` (output tokens, for frequency / presence), and how many
    output tokens they already include."""

    __slots__ = ("seen", "counts", "num_counted")

    def __init__(self, r: Req, vocab: int, device, dtype) -> None:
        self.seen = torch.zeros(vocab, dtype=torch.bool, device=device)
        if r.origin_input_ids:  # once per request: O(prompt)
            self.seen[torch.tensor(r.origin_input_ids, dtype=torch.long, device=device)] = True
        self.counts = torch.zeros(vocab, dtype=dtype, device=device)
        self.num_counted = 0

    def update(self, output_ids: List[int]) -> None:
        new = output_ids[self.num_counted:]
        if new:  # O(new tokens)
            t = torch.tensor(new, dtype=torch.long, device=self.seen.device)
            self.seen[t] = True
            self.counts.index_add_(0, t, torch.ones(len(new), dtype=self.counts.dtype, device=t.device))
            self.num_counted = len(output_ids)


class PenaltyTracker:
    """Repetition / frequency / presence penalties with per-request running counts, updated with
    each step's new tokens only (a request's state is dropped with the request)."""

    def __init__(self) -> None:
        self._states: "weakref.WeakKeyDictionary[Req, _PenaltyState]" = weakref.WeakKeyDictionary()

    def _state(self, r: Req, logits: torch.Tensor) -> _PenaltyState:
        st = self._states.get(r)
        if st is None or st.num_counted > len(r.output_ids) or st.seen.device != logits.device \
                or st.seen.shape[0] != logits.shape[1]:
            st = self._states[r] = _PenaltyState(r, logits.shape[1], logits.device, logits.dtype)
        st.update(r.output_ids)
        return st

    def apply(self, logits: torch.Tensor, reqs: Sequence[Req]) -> None:
        for i, r in enumerate(reqs):
            sp = r.sampling_params
            if not _wants_penalty(sp):
                continue
            st = self._state(r, logits)
            if sp.repetition_penalty != 1.0:
                row = logits[i]
                p = sp.repetition_penalty
                logits[i] = torch.where(st.seen, torch.where(row > 0, row / p, row * p), row)
            if (sp.frequency_penalty or sp.presence_penalty) and r.output_ids:
                counts = st.counts.to(logits.dtype)
                logits[i] -= sp.frequency_penalty * counts + sp.presence_penalty * (counts > 0).to(logits.dtype)


def apply_logit_bias(logits: torch.Tensor, reqs: Sequence[Req]) -> None:
    for i, r in enumerate(reqs):
        bias = r.sampling_params.logit_bias
        if bias:
            ids = torch.tensor([int(k) for k in bias], dtype=torch.long, device=logits.device)
            vals = torch.tensor(list(bias.values()), dtype=logits.dtype, device=logits.device)
            logits[i, ids] += vals


def apply_min_new_tokens(logits: torch.Tensor, reqs: Sequence[Req], eos_ids: Sequence[int]) -> None:
    for i, r in enumerate(reqs):
        sp = r.sampling_params
        if len(r.output_ids) < sp.min_new_tokens:
            banned = list(sp.stop_token_ids or []) + ([] if sp.ignore_eos else list(eos_ids))
            if banned:
                logits[i, torch.tensor(banned, dtype=torch.long, device=logits.device)] = float("-inf")


def top_k_top_p_min_p_probs(logits: torch.Tensor, temps: torch.Tensor, top_ks: torch.Tensor,
                            top_ps: torch.Tensor, min_ps: torch.Tensor):
    """Returns (sorted probabilities renormalised after filtering, their vocabulary ids)."""
    probs = torch.softmax(logits / temps[:, None], dim=-1)
    probs_sort, idx = probs.sort(dim=-1, descending=True)
    ranks = torch.arange(probs.shape[-1], device=probs.device)[None, :]
    probs_sort = probs_sort.masked_fill(ranks >= top_ks[:, None], 0.0)
    cum = probs_sort.cumsum(dim=-1)
    probs_sort = probs_sort.masked_fill((cum - probs_sort) > top_ps[:, None], 0.0)
    probs_sort = probs_sort.masked_fill(probs_sort < (min_ps * probs_sort[:, 0])[:, None], 0.0)
    return probs_sort / probs_sort.sum(dim=-1, keepdim=True), idx


class Sampler:
    def __init__(self, vocab_size: int, eos_token_ids: Sequence[int]):
        self.vocab_size = vocab_size
        self.eos_token_ids = list(eos_token_ids)
        self.grammar_backend = None  # set by the scheduler when constrained decoding is enabled
        self.penalties = PenaltyTracker()

    def apply_grammar(self, logits: torch.Tensor, reqs: Sequence[Req]) -> None:
        """Masks every constrained row to the tokens its grammar allows; other rows pay nothing."""
        rows = [i for i, r in enumerate(reqs) if r.grammar is not None]
        if not rows:
            return
        bitmask = self.grammar_backend.allocate_bitmask(len(reqs))
        for i in rows:
            reqs[i].grammar.fill_bitmask(bitmask, i)
        self.grammar_backend.apply_bitmask(logits, bitmask, rows)
        idx = torch.tensor(rows, device=logits.device)
        dead = idx[~torch.isfinite(logits[idx]).any(dim=1)]
        if dead.numel():  # another mask (min_new_tokens) removed what the grammar needs: let it end
            logits[dead, self.eos_token_ids[0] if self.eos_token_ids else 0] = 0.0

    def __call__(self, logits: torch.Tensor, reqs: Sequence[Req], defer_host_copy: bool = False) -> SampleOutput:
        logits = logits.float()
        out = SampleOutput(next_token_ids=[0] * len(reqs))
        if any(r.return_logprob for r in reqs):
            raw = torch.log_softmax(logits, dim=-1)
        self.penalties.apply(logits, reqs)
        apply_logit_bias(logits, reqs)
        apply_min_new_tokens(logits, reqs, self.eos_token_ids)
        self.apply_grammar(logits, reqs)

        greedy = [i for i, r in enumerate(reqs) if r.sampling_params.is_greedy]
        sampled = [i for i, r in enumerate(reqs) if not r.sampling_params.is_greedy]
        if not sampled:  # all greedy (the common serving case): no index tensors to send
            ids = logits.argmax(dim=-1)
        else:
            ids = torch.empty(len(reqs), dtype=torch.long, device=logits.device)
            if greedy:
                g = torch.tensor(greedy, device=logits.device)
                ids[g] = logits[g].argmax(dim=-1)
            self._sample_rows(logits, reqs, sampled, ids)
        out.next_token_ids_device = ids
        if defer_host_copy and ids.is_cuda and not any(r.return_logprob for r in reqs):
            host = torch.empty(ids.shape, dtype=ids.dtype, pin_memory=True)
            host.copy_(ids, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            out._pending = (host, event)
        else:
            out.next_token_ids = ids.tolist()

        if any(r.return_logprob for r in reqs):
            chosen = raw.gather(1, ids[:, None]).squeeze(1).tolist()
            out.logprobs = [chosen[i] if r.return_logprob else None for i, r in enumerate(reqs)]
            out.top_logprobs = [None] * len(reqs)
            k = max((r.top_logprobs_num for r in reqs if r.return_logprob), default=0)
            if k > 0:
                vals, tids = raw.topk(min(k, raw.shape[1]), dim=-1)
                vals, tids = vals.tolist(), tids.tolist()
                for i, r in enumerate(reqs):
                    if r.return_logprob and r.top_logprobs_num > 0:
                        n = r.top_logprobs_num
                        out.top_logprobs[i] = list(zip(vals[i][:n], tids[i][:n]))
        return out

    def _sample_rows(self, logits: torch.Tensor, reqs: Sequence[Req], rows: List[int], ids: torch.Tensor) -> None:
        dev = logits.device
        sel = torch.tensor(rows, device=dev)
        sps = [reqs[i].sampling_params for i in rows]
        temps = torch.tensor([sp.temperature for sp in sps], dtype=torch.float32, device=dev)
        top_ks = torch.tensor([sp.top_k if sp.top_k > 0 else logits.shape[1] for sp in sps], device=dev)
        top_ps = torch.tensor([sp.top_p for sp in sps], dtype=torch.float32, device=dev)
        min_ps = torch.tensor([sp.min_p for sp in sps], dtype=torch.float32, device=dev)
        probs, idx = top_k_top_p_min_p_probs(logits[sel], temps, top_ks, top_ps, min_ps)
        seeded = [j for j, i in enumerate(rows) if reqs[i].generator is not None]
        free = [j for j, i in enumerate(rows) if reqs[i].generator is None]
        choice = torch.empty(len(rows), dtype=torch.long, device=dev)
        for j in seeded:  # own generator: independent of the batch
            gen = reqs[rows[j]].generator
            choice[j] = torch.multinomial(probs[j].cpu() if gen.device.type == "cpu" else probs[j], 1,
                                          generator=gen).to(dev)[0]
        if free:
            f = torch.tensor(free, device=dev)
            choice[f] = torch.multinomial(probs[f], 1).squeeze(1)
        ids[sel] = idx.gather(1, choice[:, None]).squeeze(1)
