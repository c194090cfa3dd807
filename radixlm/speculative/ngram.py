"""NGRAM drafting: the request's own prompt and output predict its continuation.

For the sequence S (prompt + output), the drafter finds the longest suffix of S (at most
`max_ngram` tokens, at least 1) that occurred earlier in S, takes its most recent earlier occurrence
and proposes the tokens that followed it (up to k). Agents copy a lot (file contents, tool output,
code being edited), so these drafts are often right; a wrong draft only costs verify compute.

Each request's index (n-gram -> end position of its latest occurrence, for n = 1..max_ngram) is
built incrementally as its sequence grows, so a proposal costs O(max_ngram) dictionary look-ups plus
the new tokens' insertions, not a scan of the sequence. `propose_reference` is the plain scan the
index must agree with (tested).
"""

from __future__ import annotations

import weakref
from typing import Dict, List, Sequence, Tuple


def propose_reference(seq: Sequence[int], k: int, max_ngram: int) -> List[int]:
    """Plain O(len * max_ngram) scan: the longest suffix n-gram with an earlier occurrence (ending
    before the last position), its most recent occurrence, and the k tokens after it."""
    n_seq = len(seq)
    for n in range(min(max_ngram, n_seq - 1), 0, -1):
        suffix = list(seq[n_seq - n:])
        for end in range(n_seq - 2, n - 2, -1):  # end: index of the occurrence's last token
            if list(seq[end - n + 1:end + 1]) == suffix:
                return list(seq[end + 1:end + 1 + k])
    return []


class _Index:
    __slots__ = ("tokens", "last_end")

    def __init__(self) -> None:
        self.tokens: List[int] = []  # the sequence indexed so far (its n-grams end before len - 1)
        self.last_end: Dict[Tuple[int, ...], int] = {}


class NgramDrafter:
    def __init__(self, max_ngram: int):
        self.max_ngram = max_ngram
        self._index: "weakref.WeakKeyDictionary[object, _Index]" = weakref.WeakKeyDictionary()

    def _sync(self, key, seq: Sequence[int]) -> _Index:
        """The request's index with every n-gram ending before seq's last position inserted."""
        idx = self._index.get(key)
        if idx is None or len(idx.tokens) > len(seq) or idx.tokens[-1:] != list(seq[len(idx.tokens) - 1:
                                                                                    len(idx.tokens)]):
            idx = self._index[key] = _Index()
        start = max(len(idx.tokens) - 1, 0)  # ends indexed so far: 0 .. len(tokens) - 2
        idx.tokens = list(seq)
        toks, table, m = idx.tokens, idx.last_end, self.max_ngram
        for end in range(start, len(toks) - 1):
            for n in range(1, min(m, end + 1) + 1):
                table[tuple(toks[end - n + 1:end + 1])] = end
        return idx

    def propose(self, reqs: Sequence, ks: Sequence[int]) -> Tuple[List[List[int]], List[None]]:
        """The drafter interface (SpecDecoder): up to ks[i] drafts for each request; NGRAM drafts are
        deterministic (no draft distribution: None)."""
        return [self.propose_one(r, r.fill_ids, k) if k > 0 else [] for r, k in zip(reqs, ks)], [None] * len(reqs)

    def propose_one(self, key, seq: Sequence[int], k: int) -> List[int]:
        """Up to k draft tokens for the sequence `seq` of request `key` (any weak-referenceable object)."""
        if k <= 0 or len(seq) < 2:
            return []
        idx = self._sync(key, seq)
        toks, n_seq = idx.tokens, len(seq)
        for n in range(min(self.max_ngram, n_seq - 1), 0, -1):
            end = idx.last_end.get(tuple(toks[n_seq - n:]))
            if end is not None:
                return toks[end + 1:end + 1 + k]
        return []

    def release(self, key) -> None:
        self._index.pop(key, None)

    def check_idle(self, live_reqs) -> None:
        """NGRAM holds no device memory; its indexes go with their requests (weak references)."""
        return None
