"""Scheduling policy: the order in which waiting requests are considered, and the admission
budget of one prefill step (`PrefillAdder`). Pure functions over requests, the radix cache and
free-token counts: no model, no device, so every rule here is unit-testable.
"""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from radixlm.core import Req

POLICIES = ("lpm", "fcfs", "dfs-weight", "random", "lof")
LPM_FALLBACK_QUEUE_LEN = 128  # above this, lpm costs more than it saves: use fcfs (SGLang's rule)
DECODE_RESERVE_CAP = 4096  # at most this many future tokens are reserved per request
IN_BATCH_PREFIX_MIN = 32  # waiting requests sharing this many new tokens go one at a time
MIN_CHUNK_TOKENS = 32  # a chunked prefill waits rather than crawl beside running requests in smaller chunks


def validate_policy(name: str) -> str:
    if name not in POLICIES:
        raise ValueError(f"schedule_policy {name!r} is not supported. Valid: {', '.join(POLICIES)}")
    return name


def order_waiting(queue: List[Req], policy: str, tree_cache, rng: random.Random,
                  matches: Optional[Dict[int, object]] = None, priority_sign: int = 0) -> List[Req]:
    """Returns the waiting queue in the order admission should consider it. Cache-aware policies
    match each request's `fill_ids[:-1]` (in its cache namespace) against the tree; given a dict,
    `matches` receives those matches (id(req) -> match) so that admission in the same step need not
    match again. With priority scheduling (`priority_sign` 1: higher values first, -1: lower values
    first; 0: off) requests are ordered by priority first, the policy's order within one priority
    (SGLang's (priority * sign, policy key) sort; a missing priority counts as 0)."""
    ordered = _policy_order(queue, policy, tree_cache, rng, matches)
    if priority_sign:  # a stable sort keeps the policy's order among equal priorities
        ordered.sort(key=lambda r: -priority_sign * (r.priority or 0))
    return ordered


def _policy_order(queue: List[Req], policy: str, tree_cache, rng: random.Random,
                  matches: Optional[Dict[int, object]]) -> List[Req]:
    cache_aware = policy in ("lpm", "dfs-weight") and not tree_cache.disable
    if cache_aware and policy == "lpm" and len(queue) > LPM_FALLBACK_QUEUE_LEN:
        cache_aware = False
    if not cache_aware:
        if policy == "random":
            q = list(queue)
            rng.shuffle(q)
            return q
        if policy == "lof":
            return sorted(queue, key=lambda r: (-r.max_new_tokens, r.arrival_seq))
        return sorted(queue, key=lambda r: r.arrival_seq)
    matches = {} if matches is None else matches
    matches.update({id(r): tree_cache.match_prefix(r.fill_ids[:-1], r.cache_namespace) for r in queue})
    if policy == "lpm":
        return sorted(queue, key=lambda r: (-len(matches[id(r)].indices), r.arrival_seq))
    return _dfs_weight_order(queue, matches, tree_cache.root_node)


def _dfs_weight_order(queue: List[Req], matches: Dict[int, object], root) -> List[Req]:
    """Visits the tree depth-first, heaviest subtree (most waiting requests under it) first."""
    at_node: Dict[int, List[Req]] = defaultdict(list)
    weight: Dict[int, int] = defaultdict(int)
    for r in sorted(queue, key=lambda r: r.arrival_seq):
        node = matches[id(r)].last_node
        at_node[id(node)].append(r)
        while node is not None:
            weight[id(node)] += 1
            node = node.parent
    out: List[Req] = []
    stack = [(root, False)]
    while stack:  # post-order: a subtree's deeper matches first, the node's own requests after them
        node, expanded = stack.pop()
        if expanded:
            out.extend(at_node.get(id(node), []))
            continue
        stack.append((node, True))
        kids = [c for c in node.children.values() if weight.get(id(c), 0) > 0]
        kids.sort(key=lambda c: weight[id(c)])  # lightest pushed first, heaviest popped first
        stack.extend((c, False) for c in kids)
    return out


def common_prefix_len(a: List[int], b: List[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


@dataclass
class PrefillAdder:
    """Token budgets of one prefill step (SGLang's PrefillAdder rules).

    rem_total: free + evictable KV tokens minus what running requests may still need;
    rem_input: max_prefill_tokens; rem_chunk: chunked_prefill_size.
    """

    rem_total: float
    rem_input: int
    rem_chunk: Optional[int]
    page_size: int = 1
    admitted_fill_ids: List[List[int]] = field(default_factory=list)
    admitted_namespaces: List[object] = field(default_factory=list)  # cache namespace of each admitted_fill_ids

    @staticmethod
    def decode_reserve(req: Req, new_token_ratio: float) -> float:
        left = max(req.max_new_tokens - len(req.output_ids), 0)
        return min(left, DECODE_RESERVE_CAP) * new_token_ratio

    def shares_new_prefix(self, req: Req, prefix_len: int, namespace=None) -> bool:
        """True when an already admitted request (of the same cache namespace) is about to compute
        the same new tokens: this one waits a step and then hits the cache instead of computing them
        again."""
        fill = req.fill_ids
        for ns, other in zip(self.admitted_namespaces, self.admitted_fill_ids):
            if ns != namespace:
                continue
            lcp = min(common_prefix_len(fill, other), len(fill) - 1)  # the last token is never cached
            if lcp > prefix_len and (lcp - prefix_len >= IN_BATCH_PREFIX_MIN or lcp == len(fill) - 1):
                return True
        return False

    def budget_for(self, extend: int, reserve: float, first: bool) -> int:
        """How many of a request's `extend` new tokens may run this step (0: stop admitting).

        `first`: nothing is running and nothing was admitted yet, so the request may use the whole
        pool, chunked to what is free, and ignores the decode reserve.
        """
        take = extend
        if self.rem_chunk is not None and take > self.rem_chunk:
            take = self.rem_chunk // self.page_size * self.page_size
        if first:
            if take > self.rem_total:
                take = int(self.rem_total) // self.page_size * self.page_size
            return max(take, 0)
        needed = take + (reserve if take == extend else 0)
        if needed > self.rem_total or take > self.rem_input:
            return 0
        return max(take, 0)

    def budget_for_chunk(self, left: int, first: bool) -> int:
        """How many of the chunked request's `left` tokens its next chunk takes: what fits in
        rem_chunk and rem_total (page-aligned), SGLang's `min(rem_chunk, rem_total)`. 0 (wait, and
        let the running requests decode) when what fits next to running requests is less than
        MIN_CHUNK_TOKENS (or than a smaller full chunk); with nothing running (`first`) any
        progress is taken."""
        take = left if self.rem_chunk is None else min(left, self.rem_chunk)
        useful = take if take < MIN_CHUNK_TOKENS else MIN_CHUNK_TOKENS
        fits = max(int(self.rem_total), 0) // self.page_size * self.page_size
        if take > fits:
            take = fits
        if not first and take < useful:
            return 0
        return take

    def commit(self, fill_ids: List[int], taken: int, reserve: float, namespace=None) -> None:
        pages = -(-taken // self.page_size) * self.page_size  # a partial page still takes a page
        self.rem_total -= pages + reserve
        self.rem_input -= taken
        if self.rem_chunk is not None:
            self.rem_chunk -= taken
        self.admitted_fill_ids.append(fill_ids)
        self.admitted_namespaces.append(namespace)
