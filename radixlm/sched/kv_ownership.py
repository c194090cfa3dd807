"""KV ownership of requests: who holds which pool slot, and the hand-overs between a request,
the radix cache and the free pool.

Owns the invariant the scheduler's `check_integrity` verifies: every slot is free, held by the radix
tree, or held by exactly one request as `req_to_token[row, cache_protected_len:kv_len]` (the first
`cache_protected_len` slots of a row belong to the tree, locked through `req.kv.last_node`).
It decides nothing about which requests run: that is the scheduler's job.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from radixlm.core import Req

if TYPE_CHECKING:
    from radixlm.mem.allocator import TokenToKVPoolAllocator
    from radixlm.mem.kv_pool import ReqToTokenPool
    from radixlm.mem.radix_cache import MatchResult, RadixCache
from radixlm.mem.host_copy import to_device_int64


def step_slots(batch) -> List[Tuple[Req, torch.Tensor]]:
    """(request, the slots this step took for its new tokens) for each request of a batch."""
    return list(zip(batch.reqs, torch.split(batch.out_cache_loc, list(batch.extend_lens))))


class KVOwnership:
    def __init__(self, allocator: "TokenToKVPoolAllocator", req_to_token_pool: "ReqToTokenPool",
                 tree_cache: "RadixCache"):
        self.allocator = allocator
        self.req_to_token_pool = req_to_token_pool
        self.tree_cache = tree_cache
        self.page_size = allocator.page_size

    def check_integrity(self, live_reqs: Iterable[Req], extra: Optional[Dict[int, int]] = None) -> None:
        """`extra`: id(req) -> slots a step in flight holds for the request after its kv_len."""
        self.tree_cache.check_integrity()
        held = [self.tree_cache.all_values()]
        for req in live_reqs:
            end = req.kv.kv_len + (extra or {}).get(id(req), 0)
            held.append(self.row(req)[req.kv.cache_protected_len:end])
        self.allocator.check_integrity(torch.cat(held))

    def token_usage(self) -> float:
        """Share of the pool neither free nor evictable (SGLang's `token usage`)."""
        free = self.allocator.available_size() + self.tree_cache.evictable_size()
        return 1.0 - free / self.allocator.size

    def alloc_with_evict(self, last_slots, prefix_lens, extend_lens) -> Optional[torch.Tensor]:
        loc = self.allocator.alloc_extend(last_slots, prefix_lens, extend_lens)
        if loc is None and not self.tree_cache.disable:
            need = sum(extend_lens) + self.page_size * len(extend_lens)
            self.tree_cache.evict(need)
            loc = self.allocator.alloc_extend(last_slots, prefix_lens, extend_lens)
        return loc

    def last_slots(self, reqs: Sequence[Req]) -> List[int]:
        """Slot of each request's last computed token (only paged allocation needs it): one gather,
        one device sync, whatever the batch size."""
        if self.page_size == 1 or not reqs:
            return [-1] * len(reqs)
        table = self.req_to_token_pool.req_to_token
        rows = torch.tensor([r.kv.req_pool_idx for r in reqs], device=table.device)
        cols = torch.tensor([max(r.kv.kv_len - 1, 0) for r in reqs], device=table.device)
        slots = table[rows, cols].tolist()
        return [s if r.kv.kv_len > 0 else -1 for s, r in zip(slots, reqs)]

    def write_decode_slots(self, reqs: Sequence[Req], loc: torch.Tensor) -> None:
        self.write_slots(reqs, [r.kv.kv_len for r in reqs], loc)

    def write_slots(self, reqs: Sequence[Req], cols: Sequence[int], loc: torch.Tensor) -> None:
        """req_to_token[req i, cols[i]] = loc[i], without waiting for queued device work."""
        table = self.req_to_token_pool.req_to_token
        rows = to_device_int64([r.kv.req_pool_idx for r in reqs], table.device)
        table[rows, to_device_int64(list(cols), table.device)] = loc.to(table.device)

    def row(self, req: Req) -> torch.Tensor:
        return self.req_to_token_pool.req_to_token[req.kv.req_pool_idx]

    def free(self, req: Req) -> None:
        """Returns the request's own slots and row to the pools and drops its lock (no caching)."""
        self.free_with_step_slots([req], [None])

    def free_with_step_slots(self, reqs: Sequence[Req], step_slots: Sequence[Optional[torch.Tensor]]) -> None:
        """Frees requests (own slots, row, lock) together with the slots a step that failed had
        taken for each (`step_slots[i]`, whether or not `kv_len` counts them yet). Every page goes
        back once, also where a step's slots continue a request's partial page. A request that holds
        no row only drops its lock (a failure between locking a prefix and taking a row)."""
        held = []
        for req, extra in zip(reqs, step_slots):
            if req.kv.req_pool_idx is None:
                continue
            held.append(self.row(req)[req.kv.cache_protected_len:req.kv.kv_len])
            if extra is not None:
                held.append(extra.to(held[-1].device))
        slots = torch.cat(held) if held else None
        if slots is not None and slots.numel():
            self.allocator.free(torch.unique(slots))
        for req in reqs:
            if req.kv.last_node is not None:
                self.tree_cache.dec_lock_ref(req.kv.last_node)
            if req.kv.req_pool_idx is not None:
                self.req_to_token_pool.free(req.kv.req_pool_idx)
            req.kv.req_pool_idx, req.kv.last_node = None, None

    def _insert_computed(self, req: Req) -> Tuple[int, "MatchResult"]:
        """Gives the request's page-aligned computed tokens to the tree; frees its duplicates.
        Returns the aligned length now held by the tree and the tree's match of it."""
        aligned = req.kv.kv_len // self.page_size * self.page_size
        row = self.row(req)
        present, match = self.tree_cache.insert_and_match(req.fill_ids[:aligned], row[:aligned].clone(),
                                                          req.cache_namespace)
        if present > req.kv.cache_protected_len:
            self.allocator.free(row[req.kv.cache_protected_len:present].clone())
        return aligned, match

    def cache_finished(self, req: Req) -> None:
        """A finished request: its computed KV goes into the radix cache (unless disabled)."""
        if self.tree_cache.disable or req.kv.req_pool_idx is None:
            self.free(req)
            return
        aligned, _ = self._insert_computed(req)
        row = self.row(req)
        if req.kv.kv_len > aligned:
            self.allocator.free(row[aligned:req.kv.kv_len].clone())
        self.tree_cache.dec_lock_ref(req.kv.last_node)
        self.req_to_token_pool.free(req.kv.req_pool_idx)
        req.kv.req_pool_idx, req.kv.last_node = None, None
        req.kv.cache_protected_len = req.kv.kv_len = 0

    def cache_unfinished(self, req: Req) -> None:
        """A request that continues: share what it computed so far and lock it for the request."""
        if self.tree_cache.disable:
            return
        aligned, match = self._insert_computed(req)
        self.req_to_token_pool.write(req.kv.req_pool_idx, 0, match.indices)
        self.tree_cache.inc_lock_ref(match.last_node)
        self.tree_cache.dec_lock_ref(req.kv.last_node)
        req.kv.last_node = match.last_node
        req.kv.cache_protected_len = aligned
