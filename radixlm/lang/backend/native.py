"""The request logic shared by the backends that speak radixlm's native generate API (the HTTP
`RuntimeEndpoint` and the in-process `EngineBackend`): they differ only in how a /generate body
reaches the runtime (`_generate`, `_generate_stream`).

select() traffic (the same as SGLang's frontend, so the prefix is cached once and reused):
  1. {"text": prefix, "sampling_params": {"max_new_tokens": 0}}: caches the prefix, gives its length P.
  2. ONE batch {"text": [prefix + c for c in choices], "sampling_params": {"max_new_tokens": 0,
     "temperature": 0}, "return_logprob": true, "return_text_in_logprobs": true,
     "logprob_start_len": max(P - 2, 0)} (lower when a choice re-tokenizes the prefix's tail).
  3. unconditional_likelihood_normalized only: {"input_ids": [[anchor] + choice ids, ...],
     "sampling_params": {"max_new_tokens": 0}, "return_logprob": true, "logprob_start_len": 0}.

A choice's tokens are the tokens of `prefix + choice` from the first one that differs from the
prefix's own tokenization (so a token that merges the prefix's last characters with the choice's
first ones counts as the choice's); its score is the mean log-probability of those tokens.
"""

from __future__ import annotations

from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

from radixlm.lang.backend.base import BackendError, BaseBackend
from radixlm.lang.choices import ChoicesDecision, mean, resolve_method

GREEDY_MAX_TEMPERATURE = 1e-5


def _common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class NativeBackend(BaseBackend):
    tokenizer = None  # a local HF tokenizer when one is available (exact choice boundaries)

    # ------------------------------------------------------------------ transport (subclasses)
    def _generate(self, body: Dict[str, Any]) -> Any:
        raise NotImplementedError

    def _generate_stream(self, body: Dict[str, Any]) -> Iterator[Dict[str, Any]]:
        """Yields response objects with cumulative text, like the server's SSE events."""
        raise NotImplementedError

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _check(out: Dict[str, Any]) -> Dict[str, Any]:
        fr = out.get("meta_info", {}).get("finish_reason") or {}
        if fr.get("type") == "abort":
            raise BackendError(f"request aborted: {fr.get('message')}")
        return out

    def _body(self, s, sampling) -> Dict[str, Any]:
        if not s.text_:
            raise ValueError("gen: the prompt is empty; add some text before the first gen")
        body = {"text": s.text_, "sampling_params": sampling.to_native()}
        body.update(sampling.logprob_fields())
        return body

    # ------------------------------------------------------------------ BaseBackend
    def cache_prefix(self, prefix_str: str) -> None:
        if prefix_str:
            self._check(self._generate({"text": prefix_str, "sampling_params": {"max_new_tokens": 0}}))

    def commit_lazy_operations(self, s) -> None:
        self.cache_prefix(s.text_)

    def generate(self, s, sampling) -> Tuple[str, Dict[str, Any]]:
        out = self._check(self._generate(self._body(s, sampling)))
        return out["text"], out["meta_info"]

    def generate_stream(self, s, sampling) -> Iterator[Tuple[str, Dict[str, Any]]]:
        body = self._body(s, sampling)
        body["stream"] = True
        pos = 0
        for out in self._generate_stream(body):
            if "error" in out:
                raise BackendError(f"stream failed: {out['error'].get('message')}")
            self._check(out)
            text = out["text"]
            yield text[pos:], out["meta_info"]
            pos = len(text)

    def select(self, s, choices: List[str], temperature: float, choices_method: Any) -> ChoicesDecision:
        if temperature > GREEDY_MAX_TEMPERATURE:
            raise ValueError("select: only temperature 0 is supported (choices are scored, not sampled)")
        method = resolve_method(choices_method)
        prefix = s.text_
        n_prefix = 0
        if prefix:
            n_prefix = self._check(self._generate({"text": prefix, "sampling_params": {"max_new_tokens": 0}})
                                   )["meta_info"]["prompt_tokens"]
        start = max(n_prefix - 2, 0)
        firsts: Optional[List[int]] = None  # per choice: its first token's position (local tokenizer)
        full: List[List[int]] = []
        if self.tokenizer is not None:
            p_ids = self.tokenizer.encode(prefix) if prefix else []
            full = [self.tokenizer.encode(prefix + c) for c in choices]
            if len(p_ids) == n_prefix or not prefix:
                firsts = [min(_common_prefix_len(p_ids, f), len(f) - 1) for f in full]
                start = min([start] + firsts)
        outs = self._generate({
            "text": [prefix + c for c in choices],
            "sampling_params": {"max_new_tokens": 0, "temperature": 0},
            "return_logprob": True, "return_text_in_logprobs": True, "logprob_start_len": start})
        if isinstance(outs, dict):
            outs = [outs]
        token_lps: List[List[Optional[float]]] = []
        entries_per_choice: List[List[Any]] = []
        cached = []
        for i, (c, out) in enumerate(zip(choices, outs)):
            self._check(out)
            entries = [list(e) for e in out["meta_info"]["input_token_logprobs"]]
            if firsts is not None and [int(e[1]) for e in entries] == full[i][start:]:
                first = firsts[i]
            else:  # no local tokenizer, or it disagrees with the runtime's
                first = self._first_choice_token(prefix, c, entries, start, n_prefix)
            mine = entries[max(first - start, 0):]
            entries_per_choice.append(mine)
            token_lps.append([e[0] for e in mine])
            cached.append(out["meta_info"].get("cached_tokens", 0))
        unconditional = None
        if getattr(method, "requires_unconditional_logprobs", False):
            unconditional = self._unconditional(entries_per_choice)
        decision = method(choices, token_lps, unconditional)
        meta = dict(decision.meta_info)
        meta.update({
            "choices": list(choices),
            "choices_method": getattr(method, "name", repr(method)),
            "normalized_prompt_logprobs": [mean(lps) for lps in token_lps],
            "input_token_logprobs": entries_per_choice,
            "output_token_logprobs": [[] for _ in choices],
            "prompt_tokens": n_prefix,
            "logprob_start_len": start,
            "cached_tokens": cached,
        })
        if unconditional is not None:
            meta["unconditional_token_logprobs"] = unconditional
        return ChoicesDecision(decision.decision, meta)

    @staticmethod
    def _first_choice_token(prefix: str, choice: str, entries: List[List[Any]], start: int, n_prefix: int) -> int:
        """Without a local tokenizer: the first token whose text reaches past the prefix, found
        from the per-token texts the server returns; falls back to position n_prefix."""
        texts = [e[2] if len(e) > 2 else None for e in entries]
        full = prefix + choice
        if all(isinstance(t, str) for t in texts):
            tail = "".join(texts)
            if full.endswith(tail):
                offset = len(full) - len(tail)
                for j, t in enumerate(texts):
                    if offset + len(t) > len(prefix):
                        return start + j
                    offset += len(t)
        return n_prefix

    def _anchor_token(self) -> Optional[int]:
        tok = self.tokenizer
        if tok is None:
            return None
        for tid in (tok.bos_token_id, tok.eos_token_id):
            if isinstance(tid, int):
                return tid
        return None

    def _unconditional(self, entries_per_choice: List[List[Any]]) -> List[List[Optional[float]]]:
        """The choices' tokens scored after a single anchor token (BOS, else EOS) instead of the
        prompt; without a known anchor the first token has no unconditional score (None)."""
        anchor = self._anchor_token()
        ids = [[int(e[1]) for e in mine] for mine in entries_per_choice]
        rows = [([anchor] if anchor is not None else []) + x for x in ids]
        todo = [i for i, r in enumerate(rows) if r]
        result: List[List[Optional[float]]] = [[] for _ in rows]
        if not todo:
            return result
        outs = self._generate({"input_ids": [rows[i] for i in todo], "sampling_params": {"max_new_tokens": 0},
                               "return_logprob": True, "logprob_start_len": 0})
        if isinstance(outs, dict):
            outs = [outs]
        for i, out in zip(todo, outs):
            lps = [e[0] for e in self._check(out)["meta_info"]["input_token_logprobs"]]
            result[i] = lps[1:] if anchor is not None else [None] + lps[1:]
        return result
