"""Unit and stateful property tests for radixlm.mem.radix_cache.RadixCache."""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from radixlm.mem.allocator import TokenToKVPoolAllocator
from radixlm.mem.radix_cache import MatchResult, RadixCache, TreeNode


def make(size: int = 64, page_size: int = 1, disable: bool = False) -> Tuple[TokenToKVPoolAllocator, RadixCache]:
    alloc = TokenToKVPoolAllocator(size, page_size=page_size)
    return alloc, RadixCache(alloc, page_size=page_size, disable=disable)


def put(cache: RadixCache, key: Sequence[int]) -> torch.Tensor:
    """Caller-side insert: fresh slots for the whole key, free the duplicates."""
    value = cache.allocator.alloc(len(key))
    assert value is not None
    n = cache.insert(key, value)
    tree = cache.match_prefix(key).indices
    dup = value[:n][value[:n] != tree[:n]]
    cache.allocator.free(dup)
    return tree


def conserved(alloc: TokenToKVPoolAllocator, cache: RadixCache) -> None:
    cache.check_integrity()
    alloc.check_integrity(cache.all_values(), exclusive=True)
    assert alloc.available_size() + cache.total_size() == alloc.size


# ------------------------------------------------------------------- unit tests
def test_empty_and_root() -> None:
    alloc, cache = make()
    m = cache.match_prefix([1, 2, 3])
    assert isinstance(m, MatchResult) and len(m.indices) == 0 and m.last_node is cache.root_node
    assert m.indices.dtype == torch.int64
    assert cache.match_prefix([]).last_node is cache.root_node
    assert cache.total_size() == 0 and cache.evict(10) == 0
    conserved(alloc, cache)


def test_split_mid_edge() -> None:
    alloc, cache = make()
    slots = put(cache, [1, 2, 3, 4])
    m = cache.match_prefix([1, 2, 9])
    assert m.indices.tolist() == slots[:2].tolist()
    node = m.last_node
    assert node.key == [1, 2] and list(node.children) == [3]
    child = node.children[3]
    assert child.key == [3, 4] and child.parent is node and child.value.tolist() == slots[2:].tolist()
    assert cache.total_size() == 4
    conserved(alloc, cache)


def test_match_at_any_depth() -> None:
    alloc, cache = make()
    a = put(cache, [1, 2, 3])
    b = put(cache, [1, 2, 4, 5])
    c = put(cache, [7])
    assert a[:2].tolist() == b[:2].tolist()
    assert cache.match_prefix([1, 2, 4, 5, 6]).indices.tolist() == b.tolist()
    assert cache.match_prefix([1, 2, 3]).indices.tolist() == a.tolist()
    assert cache.match_prefix([1]).indices.tolist() == a[:1].tolist()
    assert cache.match_prefix([7, 7]).indices.tolist() == c.tolist()
    assert len(cache.match_prefix([2]).indices) == 0
    assert cache.total_size() == 3 + 2 + 1
    conserved(alloc, cache)


def test_insert_returns_already_present_length() -> None:
    alloc, cache = make()
    v1 = alloc.alloc(3)
    assert cache.insert([1, 2, 3], v1) == 0
    v2 = alloc.alloc(5)
    assert cache.insert([1, 2, 3, 4, 5], v2) == 3
    alloc.free(v2[:3])  # caller's duplicates
    assert cache.match_prefix([1, 2, 3, 4, 5]).indices.tolist() == v1.tolist() + v2[3:].tolist()
    v3 = alloc.alloc(2)
    assert cache.insert([1, 2], v3) == 2  # fully present: nothing adopted
    alloc.free(v3)
    assert cache.insert([], torch.empty(0, dtype=torch.int64)) == 0
    conserved(alloc, cache)


def test_insert_validates_lengths() -> None:
    alloc, cache = make(page_size=2)
    with pytest.raises(ValueError):
        cache.insert([1, 2, 3], alloc.alloc(3))
    with pytest.raises(ValueError):
        cache.insert([1, 2], torch.tensor([2, 3, 4]))
    with pytest.raises(ValueError):
        RadixCache(alloc, page_size=1)


def test_lock_prevents_eviction() -> None:
    alloc, cache = make()
    put(cache, [1, 2, 3])
    put(cache, [4, 5])
    node = cache.match_prefix([1, 2, 3]).last_node
    assert cache.inc_lock_ref(node) == 3
    assert (cache.evictable_size(), cache.protected_size()) == (2, 3)
    assert cache.evict(100) == 2
    assert cache.match_prefix([1, 2, 3]).last_node is node
    assert len(cache.match_prefix([4, 5]).indices) == 0
    conserved(alloc, cache)
    with pytest.raises(RuntimeError):
        cache.reset()
    # a split below a locked node keeps both halves protected
    m = cache.match_prefix([1, 9])
    assert m.last_node.lock_ref == 1 and cache.protected_size() == 3
    conserved(alloc, cache)
    assert cache.dec_lock_ref(node) == 3
    with pytest.raises(RuntimeError):
        cache.dec_lock_ref(node)
    assert cache.evict(1) == 2  # leaf [2, 3] (split off by the match above) is enough
    assert cache.evict(1) == 1 and cache.total_size() == 0
    conserved(alloc, cache)


def test_lock_counts_are_nested() -> None:
    alloc, cache = make()
    put(cache, [1, 2, 3, 4])
    deep = cache.match_prefix([1, 2, 3, 4]).last_node
    shallow = cache.match_prefix([1, 2]).last_node  # splits deep's edge
    assert cache.inc_lock_ref(deep) == 4
    assert cache.inc_lock_ref(shallow) == 0
    assert shallow.lock_ref == 2 and deep.lock_ref == 1
    assert cache.dec_lock_ref(deep) == 2
    assert cache.evict(10) == 2 and cache.protected_size() == 2
    assert cache.dec_lock_ref(shallow) == 2
    assert cache.inc_lock_ref(cache.root_node) == 0 and cache.dec_lock_ref(cache.root_node) == 0
    conserved(alloc, cache)


def test_lru_order() -> None:
    alloc, cache = make()
    put(cache, [1])
    put(cache, [2])
    put(cache, [3])
    cache.match_prefix([1])  # 1 is now most recent; 2 is the oldest
    assert cache.evict(1) == 1
    assert len(cache.match_prefix([2]).indices) == 0
    assert cache.evict(1) == 1  # then 3
    assert len(cache.match_prefix([3]).indices) == 0
    assert len(cache.match_prefix([1]).indices) == 1
    conserved(alloc, cache)


def test_evict_cascades_to_parent() -> None:
    alloc, cache = make()
    put(cache, [1, 2, 3])
    put(cache, [1, 2, 4])
    put(cache, [5, 5])
    cache.match_prefix([5, 5])  # newest
    assert cache.evict(3) == 4  # leaves [3], [4] then their parent [1, 2]
    assert len(cache.match_prefix([1]).indices) == 0
    assert cache.total_size() == 2
    conserved(alloc, cache)


def test_page4_only_whole_pages_match() -> None:
    alloc, cache = make(size=64, page_size=4)
    key = [1, 2, 3, 4, 5, 6, 7, 8]
    value = put(cache, key)
    assert len(cache.match_prefix([1, 2, 3]).indices) == 0
    assert cache.match_prefix([1, 2, 3, 4, 5, 6, 7]).indices.tolist() == value[:4].tolist()
    assert len(cache.match_prefix([1, 2, 3, 9, 5, 6, 7, 8]).indices) == 0
    m = cache.match_prefix([1, 2, 3, 4, 5, 6, 7, 9])  # diverges inside page 2: only page 1 matches
    assert m.indices.tolist() == value[:4].tolist() and m.last_node.key == [1, 2, 3, 4]
    other = put(cache, [1, 2, 3, 4, 5, 6, 7, 9])
    assert other[:4].tolist() == value[:4].tolist() and other[4:].tolist() != value[4:].tolist()
    assert set(cache.match_prefix([1, 2, 3, 4]).last_node.children) == {(5, 6, 7, 8), (5, 6, 7, 9)}
    assert cache.total_size() == 12
    conserved(alloc, cache)
    cache.reset()
    assert alloc.available_size() == alloc.size


def test_disabled_cache() -> None:
    alloc, cache = make(disable=True)
    m = cache.match_prefix([1, 2])
    assert len(m.indices) == 0 and m.last_node is cache.root_node
    with pytest.raises(RuntimeError):
        cache.insert([1], alloc.alloc(1))
    assert cache.evict(5) == 0 and cache.total_size() == 0


def test_reset_frees_everything_and_debug_output() -> None:
    alloc, cache = make()
    put(cache, [1, 2, 3])
    put(cache, [1, 4])
    text = cache.pretty_print()
    assert "[2, 3]" in text and "RadixCache" in repr(cache)
    assert sorted(cache.all_values().tolist()) == sorted(set(cache.all_values().tolist()))
    cache.reset()
    assert alloc.available_size() == alloc.size and cache.total_size() == 0
    conserved(alloc, cache)


def test_check_integrity_detects_corruption() -> None:
    _, cache = make()
    put(cache, [1, 2, 3])
    cache._evictable_size += 1
    with pytest.raises(RuntimeError, match="size counters"):
        cache.check_integrity()


def test_hit_count() -> None:
    _, cache = make()
    put(cache, [1, 2])
    before = cache.match_prefix([1, 2]).last_node.hit_count
    assert cache.match_prefix([1, 2]).last_node.hit_count == before + 1


# -------------------------------------------------------- stateful property test
Prefix = Tuple[int, ...]
Page = Tuple[int, ...]
keys = st.lists(st.integers(0, 3), min_size=0, max_size=8)


class RadixMachine(RuleBasedStateMachine):
    """Cache vs a naive model: every cached page-aligned prefix -> slots of its last page."""

    page_size = 1
    pool = 24

    def __init__(self) -> None:
        super().__init__()
        self.alloc = TokenToKVPoolAllocator(self.pool, page_size=self.page_size)
        self.cache = RadixCache(self.alloc, page_size=self.page_size)
        self.ref: Dict[Prefix, Page] = {}
        self.locks: List[Tuple[TreeNode, Prefix]] = []

    # ------------------------------------------------------------ model helpers
    def aligned(self, key: Sequence[int]) -> List[int]:
        return list(key[: len(key) - len(key) % self.page_size])

    def pages_of(self, key: Sequence[int]) -> List[Prefix]:
        """The page-aligned non-empty prefixes of key, shortest first."""
        ps = self.page_size
        return [tuple(key[: j + ps]) for j in range(0, len(key) - ps + 1, ps)]

    def ref_match(self, key: Sequence[int]) -> List[int]:
        slots: List[int] = []
        for prefix in self.pages_of(self.aligned(key)):
            if prefix not in self.ref:
                break
            slots += self.ref[prefix]
        return slots

    def check_match(self, key: Sequence[int]) -> MatchResult:
        m = self.cache.match_prefix(key)
        assert m.indices.tolist() == self.ref_match(key)
        return m

    def alloc_with_evict(self, n: int) -> Optional[torch.Tensor]:
        out = self.alloc.alloc(n)
        if out is None:
            self.evict_and_sync(n - self.alloc.available_size())
            out = self.alloc.alloc(n)
        return out

    def evict_and_sync(self, k: int) -> None:
        evictable = self.cache.evictable_size()
        freed = self.cache.evict(k)
        assert freed >= min(k, evictable) and freed <= evictable
        kept = set(self.cache.all_values().tolist())
        gone = [p for p, page in self.ref.items() if page[0] not in kept]
        for p in gone:
            del self.ref[p]
        assert len(gone) * self.page_size == freed

    # ------------------------------------------------------------------- rules
    @rule(key=keys, via_match=st.booleans())
    def insert(self, key: List[int], via_match: bool) -> None:
        key = self.aligned(key)
        m = self.check_match(key) if via_match else None
        prefix = m.indices if m is not None else torch.empty(0, dtype=torch.int64)
        if m is not None:
            self.cache.inc_lock_ref(m.last_node)
        fresh = self.alloc_with_evict(len(key) - len(prefix))
        if m is not None:
            self.cache.dec_lock_ref(m.last_node)
        if fresh is None:
            return
        value = torch.cat([prefix, fresh])
        tree = self.ref_match(key)
        n = self.cache.insert(key, value)
        assert n == len(tree) and n >= len(prefix)
        dup = value[:n][value[:n] != torch.tensor(tree, dtype=torch.int64)]
        assert dup.numel() == n - len(prefix)
        self.alloc.free(dup)
        for j in range(n, len(key), self.page_size):
            self.ref[tuple(key[: j + self.page_size])] = tuple(value[j : j + self.page_size].tolist())

    @rule(key=keys)
    def match(self, key: List[int]) -> None:
        self.check_match(key)

    @rule(key=keys)
    def lock(self, key: List[int]) -> None:
        m = self.check_match(key)
        self.cache.inc_lock_ref(m.last_node)
        self.locks.append((m.last_node, tuple(key[: len(m.indices)])))

    @precondition(lambda self: self.locks)
    @rule(i=st.integers(0, 100))
    def unlock(self, i: int) -> None:
        node, _ = self.locks.pop(i % len(self.locks))
        self.cache.dec_lock_ref(node)

    @rule(k=st.integers(0, 12))
    def evict(self, k: int) -> None:
        self.evict_and_sync(k)

    # -------------------------------------------------------------- invariants
    @invariant()
    def tree_equals_model(self) -> None:
        ps = self.page_size
        seen: Dict[Prefix, Page] = {}
        stack: List[Tuple[TreeNode, Prefix]] = [(self.cache.root_node, ())]
        while stack:
            node, path = stack.pop()
            for child in node.children.values():
                slots = child.value.tolist()
                for j in range(0, len(child.key), ps):
                    seen[path + tuple(child.key[: j + ps])] = tuple(slots[j : j + ps])
                stack.append((child, path + tuple(child.key)))
        assert seen == self.ref

    @invariant()
    def locks_and_sizes(self) -> None:
        protected = set()
        for node, prefix in self.locks:
            assert node.lock_ref > 0
            for p in self.pages_of(prefix):
                assert p in self.ref, "a locked prefix was evicted"
                protected.add(p)
        assert self.cache.protected_size() == len(protected) * self.page_size
        assert self.cache.evictable_size() == (len(self.ref) - len(protected)) * self.page_size

    @invariant()
    def integrity(self) -> None:
        conserved(self.alloc, self.cache)

    def teardown(self) -> None:
        while self.locks:
            self.cache.dec_lock_ref(self.locks.pop()[0])
        self.cache.check_integrity()
        self.cache.reset()
        assert self.alloc.available_size() == self.alloc.size
        assert self.cache.total_size() == 0
        self.alloc.check_integrity(torch.empty(0, dtype=torch.int64))


_machine_settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


class RadixMachinePage2(RadixMachine):
    page_size = 2


TestRadixMachinePage1 = RadixMachine.TestCase
TestRadixMachinePage1.settings = _machine_settings
TestRadixMachinePage2 = RadixMachinePage2.TestCase
TestRadixMachinePage2.settings = _machine_settings


# ------------------------------------------------------------- eviction heap (no tree walk per call)
class _WalkingEvictCache(RadixCache):
    """The reference eviction: a heap over every unlocked leaf, rebuilt by a tree walk per call."""

    def evict(self, num_tokens: int) -> int:
        import heapq

        if self.disable or num_tokens <= 0:
            return 0
        heap = [(n.last_access_time, n.id, n) for n in self._nodes() if n.is_leaf() and n.lock_ref == 0]
        heapq.heapify(heap)
        freed = 0
        while heap and freed < num_tokens:
            _, _, node = heapq.heappop(heap)
            parent = node.parent
            freed += self._delete_leaf(node)
            if parent is not self.root_node and parent.is_leaf() and parent.lock_ref == 0:
                heapq.heappush(heap, (parent.last_access_time, parent.id, parent))
        return freed


def test_evict_does_not_walk_the_tree(monkeypatch) -> None:
    alloc, cache = make(size=4096)
    for i in range(500):
        put(cache, [i % 7, i, i + 1])
    monkeypatch.setattr(cache, "_nodes", lambda: (_ for _ in ()).throw(AssertionError("evict walked the tree")))
    freed = sum(cache.evict(1) for _ in range(50))
    assert freed >= 50
    monkeypatch.undo()
    conserved(alloc, cache)


def test_incremental_eviction_matches_the_walking_reference() -> None:
    """Random inserts, matches, locks, unlocks and evictions on both caches: identical trees."""
    import random

    rng = random.Random(0)
    a_alloc, a = make(size=512)
    b_alloc = TokenToKVPoolAllocator(512, page_size=1)
    b = _WalkingEvictCache(b_alloc, page_size=1)
    locks: List[Tuple[TreeNode, TreeNode]] = []
    for step in range(1500):
        op = rng.random()
        key = [rng.randrange(4) for _ in range(rng.randrange(1, 8))]
        if op < 0.4:
            for alloc, cache in ((a_alloc, a), (b_alloc, b)):
                if alloc.available_size() < len(key):
                    cache.evict(len(key))
                if alloc.available_size() >= len(key):
                    put(cache, key)
        elif op < 0.6:
            ra, rb = a.match_prefix(key), b.match_prefix(key)
            assert ra.indices.tolist() == rb.indices.tolist()
        elif op < 0.7:
            ra, rb = a.match_prefix(key), b.match_prefix(key)
            if len(ra.indices):
                a.inc_lock_ref(ra.last_node)
                b.inc_lock_ref(rb.last_node)
                locks.append((ra.last_node, rb.last_node))
        elif op < 0.8 and locks:
            na, nb = locks.pop(rng.randrange(len(locks)))
            assert a.dec_lock_ref(na) == b.dec_lock_ref(nb)
        else:
            n = rng.randrange(1, 12)
            assert a.evict(n) == b.evict(n), step
        assert sorted(a.all_values().tolist()) == sorted(b.all_values().tolist()), step
    conserved(a_alloc, a)
    assert len(a._evict_heap) <= sum(1 for _ in a._nodes())


def test_insert_and_match_returns_what_match_prefix_would():
    import torch as _t

    from radixlm.mem.allocator import TokenToKVPoolAllocator
    from radixlm.mem.radix_cache import RadixCache

    for page in (1, 4):
        alloc = TokenToKVPoolAllocator(512, page_size=page)
        cache = RadixCache(alloc, page_size=page)
        for key in ([1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 3, 4, 9, 9, 9, 9], [1, 2, 3, 4, 5, 6, 7, 8, 7, 7, 7, 7], []):
            val = alloc.alloc(len(key)) if key else _t.empty(0, dtype=_t.int64)
            present, got = cache.insert_and_match(key, val)
            if present:
                alloc.free(val[:present])
            want = cache.match_prefix(key)
            assert got.last_node is want.last_node
            assert _t.equal(got.indices, want.indices) and len(got.indices) == len(key)
        cache.check_integrity()
