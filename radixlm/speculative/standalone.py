"""STANDALONE drafting: a small draft model with its own KV pool beside the target's.

The draft model has its own ModelRunner (weights, KV pool, request table; CUDA graphs for its decode
steps where the target has them). Each request keeps a row of the draft's request table and the
tokens whose draft KV is stored (`_DraftState.tokens`). A proposal first catches the draft up with
one extend over the request's tokens it has not seen (the whole prompt the first time, afterwards
the tokens the last verify step committed), which also yields the first draft; then k - 1 decode
steps give the others. Greedy requests draft with the argmax; sampled requests draw each draft from
the draft's distribution q (same temperature / top-k / top-p / min-p as the target) and hand q to
the rejection sampler (verify.py: accept with min(1, p/q)). After a verify step the draft KV of the
tokens that were not committed is dropped at the next proposal (the longest common prefix of what
the draft holds and the request's sequence is kept).

No radix cache on the draft side: requests sharing a prompt prefix each prefill it in the draft
(documented). Memory goes back when a request finishes, is aborted or fails (`release`), and a
proposal first drops the state of requests the scheduler no longer holds (`gc`).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from radixlm.core import ForwardMode, Req, ScheduleBatch

logger = logging.getLogger(__name__)


def create_draft_runner(args, target_runner):
    """The draft model's ModelRunner (tp 1, page size 1), with a KV pool as large as the target's plus
    num_draft_tokens per running request; same vocabulary as the target required."""
    from radixlm.engine.model_runner import ModelRunner, RunnerConfig
    from radixlm.models.model_config import ModelConfig
    from radixlm.server_args import derive_config

    path = args.speculative_draft_model_path
    cfg = ModelConfig.from_path(path, args.dtype, args.context_length, device=target_runner.device)
    check_same_vocab(path, cfg, args.model_path, target_runner.model_config)
    size = target_runner.max_total_num_tokens + args.resolved_max_running_requests * args.speculative_num_draft_tokens
    rc = derive_config(RunnerConfig, args, device=target_runner.device, max_total_tokens=size, tp_size=1,
                       max_running_requests=args.resolved_max_running_requests, page_size=1, load_format="auto")
    return ModelRunner(cfg, rc)


def check_same_vocab(draft_path: str, draft_cfg, target_path: str, target_cfg) -> None:
    """The draft must speak the target's token ids: the same vocabulary size and, when both
    checkpoints carry a tokenizer.json, the same tokenizer."""
    if draft_cfg.vocab_size != target_cfg.vocab_size:
        raise ValueError(f"speculative_draft_model_path: the draft's vocabulary ({draft_cfg.vocab_size} tokens) "
                         f"differs from the target's ({target_cfg.vocab_size}); STANDALONE needs the same tokenizer")
    files = [os.path.join(p, "tokenizer.json") for p in (draft_path, target_path)]
    if all(os.path.isfile(f) for f in files):
        import json

        vocab = []
        for f in files:
            with open(f, encoding="utf-8") as fh:
                vocab.append(json.load(fh).get("model", {}).get("vocab"))
        if vocab[0] != vocab[1]:
            raise ValueError("speculative_draft_model_path: the draft's tokenizer.json vocabulary differs from the "
                             "target's; STANDALONE needs the same tokenizer")


@dataclass
class _DraftKV:
    req_pool_idx: int


@dataclass
class _DraftSeq:
    """What the draft runner needs of a request: its row in the draft's table."""

    kv: _DraftKV


@dataclass
class _DraftState:
    req: Req
    seq: _DraftSeq
    tokens: List[int] = field(default_factory=list)  # tokens whose draft KV is stored, in order


class StandaloneDrafter:
    def __init__(self, draft_runner, target_runner):
        self.runner = draft_runner
        self.device = draft_runner.device
        self._states: Dict[int, _DraftState] = {}

    # ------------------------------------------------------------------ memory
    def _state(self, req: Req) -> Optional[_DraftState]:
        st = self._states.get(id(req))
        if st is None:
            row = self.runner.req_to_token_pool.alloc()
            if row is None:
                return None
            st = self._states[id(req)] = _DraftState(req, _DraftSeq(_DraftKV(row)))
        return st

    def _truncate(self, st: _DraftState, n: int) -> None:
        if n < len(st.tokens):
            row = self.runner.req_to_token_pool.req_to_token[st.seq.kv.req_pool_idx]
            self.runner.allocator.free(row[n:len(st.tokens)].clone())
            del st.tokens[n:]

    def release(self, req: Req) -> None:
        st = self._states.pop(id(req), None)
        if st is not None:
            self._truncate(st, 0)
            self.runner.req_to_token_pool.free(st.seq.kv.req_pool_idx)

    def gc(self, live: Sequence[Req]) -> None:
        """Drops the draft state of requests the scheduler no longer holds."""
        keep = {id(r) for r in live}
        for st in [s for k, s in self._states.items() if k not in keep]:
            self.release(st.req)

    def check_idle(self, live: Sequence[Req]) -> None:
        """The draft's slots are free or held by a live request's state, each once."""
        keep = {id(r) for r in live}
        stale = [s.req.rid for k, s in self._states.items() if k not in keep]
        if stale:
            raise RuntimeError(f"draft KV still held for requests the scheduler dropped: {stale[:3]}")
        table = self.runner.req_to_token_pool.req_to_token
        held = [table[s.seq.kv.req_pool_idx, :len(s.tokens)] for s in self._states.values()]
        self.runner.allocator.check_integrity(torch.cat(held) if held else torch.zeros(0, dtype=torch.int64),
                                              exclusive=True)

    # ------------------------------------------------------------------ drafting
    def _run(self, states: List[_DraftState], new: List[List[int]], mode: ForwardMode) -> Optional[torch.Tensor]:
        """Stores the draft KV of `new[i]` after each state's tokens; logits at each last new token."""
        alloc = self.runner.allocator
        lens = [len(n) for n in new]
        pre = [len(s.tokens) for s in states]
        loc = alloc.alloc_extend([-1] * len(states), pre, lens)
        if loc is None:
            return None
        table = self.runner.req_to_token_pool
        for s, p, sl in zip(states, pre, torch.split(loc, lens)):
            table.write(s.seq.kv.req_pool_idx, p, sl)
        batch = ScheduleBatch([s.seq for s in states], mode, [t for n in new for t in n], loc, pre, lens,
                              [True] * len(states), [None] * len(states))
        try:
            logits, _ = self.runner.forward(batch)
        except BaseException:
            alloc.free(loc)
            raise
        for s, n in zip(states, new):
            s.tokens.extend(n)
        return logits.float()

    def _pick(self, logits: torch.Tensor, reqs: List[Req]) -> Tuple[List[int], List[Optional[torch.Tensor]]]:
        """Greedy requests: argmax; sampled ones: a draw from the draft's q (returned with it)."""
        from radixlm.speculative.worker import target_probs

        ids = logits.argmax(dim=-1).tolist()
        qs: List[Optional[torch.Tensor]] = [None] * len(reqs)
        for i, r in enumerate(reqs):
            if not r.sampling_params.is_greedy:
                q = target_probs(logits[i:i + 1], r)[0]
                gen = r.generator
                ids[i] = int(torch.multinomial(q.to(gen.device) if gen is not None else q, 1, generator=gen)[0])
                qs[i] = q
        return ids, qs

    @torch.inference_mode()
    def propose(self, reqs: Sequence[Req], ks: Sequence[int]) -> Tuple[List[List[int]], List[Optional[torch.Tensor]]]:
        drafts: List[List[int]] = [[] for _ in reqs]
        qrows: List[List[torch.Tensor]] = [[] for _ in reqs]
        todo, states, new = [], [], []
        for i, (r, k) in enumerate(zip(reqs, ks)):
            st = self._state(r) if k > 0 else None
            if st is None:
                continue
            seq = r.fill_ids
            c, n = 0, min(len(st.tokens), len(seq) - 1)
            while c < n and st.tokens[c] == seq[c]:  # (usually short: what changed since the last proposal)
                c += 1
            self._truncate(st, c)
            todo.append(i)
            states.append(st)
            new.append(seq[c:])
        step = 0
        mode = ForwardMode.EXTEND
        while todo:
            logits = self._run(states, new, mode)
            if logits is None:  # the draft pool is full: these requests verify the drafts they have
                logger.warning("draft KV pool full: %d requests draft fewer tokens this step", len(todo))
                break
            picked, qs = self._pick(logits, [reqs[i] for i in todo])
            keep = []
            for j, (i, t, q) in enumerate(zip(todo, picked, qs)):
                drafts[i].append(t)
                if q is not None:
                    qrows[i].append(q)
                if len(drafts[i]) < ks[i]:
                    keep.append(j)
            todo = [todo[j] for j in keep]
            states = [states[j] for j in keep]
            new = [[picked[j]] for j in keep]
            mode = ForwardMode.DECODE
            step += 1
        return drafts, [torch.stack(q) if q else None for q in qrows]
