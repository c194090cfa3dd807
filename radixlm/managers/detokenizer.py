"""Incremental detokenization: turns a growing list of output ids into text deltas.

Owns per-request decode state. UTF-8 safe (a byte-level token that ends inside a multi-byte
character is held until the character completes), honours skip_special_tokens, and holds back the
last few characters while a stop string could still be forming so that a stop string never
reaches the client; at the end the text is trimmed before the matched stop string. A stop_regex is
held back the same way (its maximum match width - 1 characters, at most STOP_REGEX_MAX_WINDOW - 1)
and the text is trimmed before its first match in the text not yet sent. Configured by a request's
`DetokenizeParams` (the sampling fields that shape its text); its stop regexes are compiled once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from radixlm.core import FinishReason
from radixlm.managers.io_struct import DetokenizeParams
from radixlm.sampling_params import StopRegex, compile_stop_regexes

# Re-decode this many tokens before the new ones so that merges at the boundary come out right.
_CONTEXT_TOKENS = 5


def trim_stop(text: str, reason: Optional[FinishReason], params: DetokenizeParams,
              regexes: Optional[List[StopRegex]] = None, sent: int = 0) -> str:
    """Final text: cut before a matched stop string, or before the first match of the matched
    stop_regex at or after `sent` (text already sent cannot be taken back); unless no_stop_trim."""
    if reason is None or reason.type != "stop" or params.no_stop_trim or not isinstance(reason.matched, str):
        return text
    if reason.matched in (params.stop or ()):
        idx = text.find(reason.matched)
        return text[:idx] if idx >= 0 else text
    for r in regexes or ():
        if r.pattern == reason.matched:
            try:
                m = r.search(text[sent:])
            except TimeoutError:
                return text
            return text[:sent + m.start()] if m is not None else text
    return text


@dataclass
class IncrementalDetokenizer:
    tokenizer: object
    params: DetokenizeParams
    ids: List[int] = field(default_factory=list)
    text: str = ""  # confirmed text of ids[:read_offset]
    read_offset: int = 0
    sent: int = 0  # characters already handed out
    regexes: List[StopRegex] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.params.stop_regex:
            self.regexes = compile_stop_regexes(self.params.stop_regex)

    def _decode(self, ids: List[int]) -> str:
        p = self.params
        return self.tokenizer.decode(ids, skip_special_tokens=p.skip_special_tokens,
                                     spaces_between_special_tokens=p.spaces_between_special_tokens)

    def add(self, new_ids: List[int], reason: Optional[FinishReason] = None) -> str:
        """Feeds new tokens; returns the text delta that is safe to show now."""
        p = self.params
        ids = list(new_ids)
        if reason is not None and reason.type == "stop" and isinstance(reason.matched, int) \
                and not p.no_stop_trim and ids and ids[-1] == reason.matched:
            ids = ids[:-1]  # the matched stop token is not part of the text
        self.ids.extend(ids)
        ctx = max(self.read_offset - _CONTEXT_TOKENS, 0)
        prefix = self._decode(self.ids[ctx:self.read_offset])
        full = self._decode(self.ids[ctx:])
        if len(full) > len(prefix) and (reason is not None or not full.endswith("\ufffd")):
            self.text += full[len(prefix):]
            self.read_offset = len(self.ids)
        if reason is not None:
            final = trim_stop(self.text, reason, p, self.regexes, self.sent)
            delta = final[self.sent:]
            self.sent = len(final)
            self.text = final
            return delta
        hold = max([len(s) for s in p.stop or ()] + [r.width for r in self.regexes] + [1]) - 1
        visible = len(self.text) - hold
        if visible <= self.sent:
            return ""
        delta = self.text[self.sent:visible]
        self.sent = visible
        return delta
