"""Unit tests of radixlm/sched/schedule_policy.py with no model: the order in which waiting
requests are considered (`order_waiting`) and the admission budget of one prefill step
(`PrefillAdder`), on a real RadixCache + TokenToKVPoolAllocator and plain `Req`s."""

from __future__ import annotations

import random
from typing import List, Sequence

import pytest

from radixlm.core import Req
from radixlm.mem.allocator import TokenToKVPoolAllocator
from radixlm.mem.radix_cache import RadixCache
from radixlm.sampling_params import SamplingParams
from radixlm.sched.schedule_policy import (
    DECODE_RESERVE_CAP,
    IN_BATCH_PREFIX_MIN,
    LPM_FALLBACK_QUEUE_LEN,
    POLICIES,
    PrefillAdder,
    order_waiting,
    validate_policy,
)


def make_cache(size: int = 4096, page_size: int = 1, disable: bool = False) -> RadixCache:
    return RadixCache(TokenToKVPoolAllocator(size, page_size=page_size), page_size=page_size, disable=disable)


def put(cache: RadixCache, key: Sequence[int]) -> None:
    """Caches key the way the scheduler does: fresh slots, duplicates of what is cached go back."""
    key = list(key)
    value = cache.allocator.alloc(len(key))
    assert value is not None
    present = cache.insert(key, value)
    if present:
        cache.allocator.free(value[:present])


_seq = iter(range(10**9))


def req(ids: Sequence[int], max_new_tokens: int = 16, arrival: int = None, rid: str = None) -> Req:
    n = next(_seq)
    r = Req(rid or f"r{n}", list(ids), SamplingParams(max_new_tokens=max_new_tokens))
    r.arrival_seq = n if arrival is None else arrival
    return r


def rids(reqs: List[Req]) -> List[str]:
    return [r.rid for r in reqs]


def test_validate_policy():
    for p in POLICIES:
        assert validate_policy(p) == p
    with pytest.raises(ValueError, match="schedule_policy"):
        validate_policy("sjf")


# ---------------------------------------------------------------------------------- order_waiting
def test_lpm_longest_cached_prefix_first():
    cache = make_cache()
    put(cache, range(1, 11))  # 1..10
    put(cache, [20, 21, 22, 23, 24, 25])
    a = req([300, 301, 302], rid="none", arrival=0)
    b = req(list(range(1, 11)) + [99], rid="ten", arrival=1)
    c = req([20, 21, 22, 99], rid="three-early", arrival=2)
    d = req([1, 2, 3, 50, 51], rid="three-late", arrival=3)
    e = req(list(range(1, 11)), rid="nine", arrival=4)  # the last token is never matched
    out = order_waiting([a, d, c, e, b], "lpm", cache, random.Random(0))
    assert rids(out) == ["ten", "nine", "three-early", "three-late", "none"]


def test_lpm_falls_back_to_fcfs_on_long_queues():
    cache = make_cache()
    put(cache, range(1, 40))

    def queue(n):
        # arrival order is the list order reversed; the request that arrived last has the cache hit
        q = [req([500 + i, 501 + i], arrival=n - 2 - i, rid=f"q{i}") for i in range(n - 1)]
        return [req(list(range(1, 40)) + [7], arrival=n - 1, rid="hit")] + q

    q = queue(LPM_FALLBACK_QUEUE_LEN)
    assert order_waiting(q, "lpm", cache, random.Random(0))[0].rid == "hit"
    q = queue(LPM_FALLBACK_QUEUE_LEN + 1)
    out = order_waiting(q, "lpm", cache, random.Random(0))
    assert [r.arrival_seq for r in out] == list(range(LPM_FALLBACK_QUEUE_LEN + 1))
    assert out[-1].rid == "hit"


def test_fcfs_is_arrival_order_whatever_the_cache():
    cache = make_cache()
    put(cache, range(1, 30))
    q = [req(list(range(1, 30)) + [5], arrival=2, rid="c"), req([400], arrival=0, rid="a"),
         req([1, 2, 3, 4], arrival=1, rid="b")]
    assert rids(order_waiting(q, "fcfs", cache, random.Random(0))) == ["a", "b", "c"]
    assert rids(q) == ["c", "a", "b"]  # the queue itself is not reordered in place


def test_lof_longest_output_first_then_arrival():
    cache = make_cache()
    q = [req([1], max_new_tokens=8, arrival=0, rid="short"), req([2], max_new_tokens=512, arrival=3, rid="long-late"),
         req([3], max_new_tokens=512, arrival=1, rid="long-early"), req([4], max_new_tokens=64, arrival=2, rid="mid")]
    assert rids(order_waiting(q, "lof", cache, random.Random(0))) == ["long-early", "long-late", "mid", "short"]


def test_random_is_a_seeded_permutation():
    cache = make_cache()
    q = [req([i + 3], arrival=i, rid=f"r{i}") for i in range(20)]
    a = order_waiting(q, "random", cache, random.Random(123))
    b = order_waiting(q, "random", cache, random.Random(123))
    c = order_waiting(q, "random", cache, random.Random(124))
    assert sorted(rids(a)) == sorted(rids(q)) and len(a) == len(q)
    assert rids(a) == rids(b)
    assert rids(a) != rids(c)
    assert rids(a) != rids(q)
    assert rids(q) == [f"r{i}" for i in range(20)]  # input untouched
    # the scheduler's rng advances: successive calls give different orders
    rng = random.Random(5)
    assert rids(order_waiting(q, "random", cache, rng)) != rids(order_waiting(q, "random", cache, rng))


def _dfs_tree(alias_root: bool = True):
    cache = make_cache()
    x = list(range(1, 9))
    put(cache, x + [10, 11, 12])  # X -> X1
    put(cache, x + [20, 21, 22])  # X -> X2
    put(cache, [50, 51, 52, 53, 54, 55])  # Y
    put(cache, [60, 61, 62, 63])  # Z
    return cache, x


def test_dfs_weight_runs_on_a_real_radix_cache():
    cache, x = _dfs_tree(alias_root=False)
    q = [req(x + [10, 11, 12, 9], rid="a"), req([400, 401], rid="b")]
    assert sorted(rids(order_waiting(q, "dfs-weight", cache, random.Random(0)))) == ["a", "b"]


def test_dfs_weight_heaviest_subtree_first():
    cache, x = _dfs_tree()
    q = [
        req([50, 51, 52, 53, 54, 55, 9], arrival=0, rid="y"),
        req([60, 61, 62, 63, 9], arrival=1, rid="z1"),
        req(x + [20, 21, 22, 9], arrival=2, rid="x2"),
        req(x + [10, 11, 12, 9], arrival=3, rid="x1a"),
        req([60, 61, 62, 63, 8], arrival=4, rid="z2"),
        req(x + [10, 11, 12, 8], arrival=5, rid="x1b"),
        req(x + [10, 11, 12, 7], arrival=6, rid="x1c"),
        req(x + [20, 21, 22, 8], arrival=7, rid="x2b"),
    ]
    out = rids(order_waiting(q, "dfs-weight", cache, random.Random(0)))
    # X holds 5 (X1: 3, X2: 2) > Z: 2 > Y: 1; inside a node, arrival order
    assert out == ["x1a", "x1b", "x1c", "x2", "x2b", "z1", "z2", "y"]


def test_dfs_weight_uncached_requests_go_last():
    cache, x = _dfs_tree()
    q = [
        req([400, 401, 402], arrival=0, rid="nohit"),
        req(x + [10, 11, 12, 9], arrival=1, rid="x1a"),
        req(x + [10, 11, 12, 8], arrival=2, rid="x1b"),
    ]
    assert rids(order_waiting(q, "dfs-weight", cache, random.Random(0))) == ["x1a", "x1b", "nohit"]


@pytest.mark.parametrize("policy", ["lpm", "dfs-weight"])
def test_cache_aware_policies_fall_back_to_fcfs_when_cache_disabled(policy):
    cache = make_cache(disable=True)
    q = [req(list(range(1, 30)), arrival=2, rid="c"), req([400], arrival=0, rid="a"), req([1, 2], arrival=1, rid="b")]
    assert rids(order_waiting(q, policy, cache, random.Random(0))) == ["a", "b", "c"]


def test_lpm_with_pages_counts_whole_pages():
    cache = make_cache(page_size=4)
    put(cache, list(range(1, 13)))  # 3 pages
    q = [req(list(range(1, 7)) + [99], arrival=0, rid="one-page"),  # matches 1..6 -> 4 tokens
         req(list(range(1, 11)) + [99], arrival=1, rid="two-pages")]  # matches 1..10 -> 8 tokens
    assert rids(order_waiting(q, "lpm", cache, random.Random(0))) == ["two-pages", "one-page"]


# ---------------------------------------------------------------------------------- PrefillAdder
def adder(rem_total=1000.0, rem_input=1000, rem_chunk=None, page_size=1) -> PrefillAdder:
    return PrefillAdder(rem_total=rem_total, rem_input=rem_input, rem_chunk=rem_chunk, page_size=page_size)


def test_whole_request_when_it_fits():
    a = adder(rem_chunk=100)
    assert a.budget_for(60, 10.0, first=False) == 60
    assert a.budget_for(100, 0.0, first=False) == 100


@pytest.mark.parametrize("page,chunk,want", [(1, 10, 10), (4, 10, 8), (4, 12, 12), (16, 40, 32), (4, 3, 0)])
def test_chunking_to_rem_chunk_floored_to_page(page, chunk, want):
    a = adder(rem_chunk=chunk, page_size=page)
    assert a.budget_for(100, 5.0, first=False) == want
    assert a.budget_for(100, 5.0, first=True) == want


def test_chunk_does_not_pay_the_decode_reserve():
    a = adder(rem_total=60, rem_chunk=50)
    assert a.budget_for(90, 1000.0, first=False) == 50  # a chunk samples nothing: no reserve yet
    a = adder(rem_total=60, rem_chunk=100)
    assert a.budget_for(90, 1000.0, first=False) == 0  # whole request: reserve counts


def test_stop_when_total_exceeds_rem_total():
    a = adder(rem_total=100)
    assert a.budget_for(90, 10.0, first=False) == 90  # exactly fits
    assert a.budget_for(90, 10.5, first=False) == 0
    assert a.budget_for(101, 0.0, first=False) == 0


def test_rem_input_limits_later_requests():
    a = adder(rem_input=50)
    assert a.budget_for(50, 0.0, first=False) == 50
    assert a.budget_for(51, 0.0, first=False) == 0
    assert a.budget_for(51, 0.0, first=True) == 51  # the first request may exceed max_prefill_tokens


def test_first_ignores_the_reserve_and_chunks_to_what_is_free():
    a = adder(rem_total=100)
    assert a.budget_for(90, 10_000.0, first=True) == 90
    assert a.budget_for(150, 0.0, first=True) == 100
    a = adder(rem_total=102.5, page_size=4)
    assert a.budget_for(150, 0.0, first=True) == 100
    a = adder(rem_total=-3)
    assert a.budget_for(10, 0.0, first=True) == 0


def test_commit_updates_budgets():
    a = adder(rem_total=1000, rem_input=500, rem_chunk=300, page_size=4)
    a.commit([1, 2, 3, 4, 5], 5, 2.5)
    assert a.rem_total == 1000 - 8 - 2.5  # a partial page takes a whole page
    assert a.rem_input == 495 and a.rem_chunk == 295
    assert a.admitted_fill_ids == [[1, 2, 3, 4, 5]]
    a.commit([7] * 8, 8, 0.0)
    assert a.rem_total == 1000 - 8 - 2.5 - 8 and a.rem_input == 487 and a.rem_chunk == 287
    b = adder(rem_chunk=None)
    b.commit([1], 1, 0.0)
    assert b.rem_chunk is None


def test_budget_shrinks_across_admissions():
    a = adder(rem_total=100, rem_input=1000, rem_chunk=64)
    take = a.budget_for(40, 10.0, first=True)
    assert take == 40
    a.commit([0] * 40, take, 10.0)  # 50 left, 24 of the chunk left
    assert a.budget_for(30, 0.0, first=False) == 24  # chunked to what is left of rem_chunk
    assert a.budget_for(20, 30.0, first=False) == 20  # 20 + 30 == 50
    assert a.budget_for(20, 31.0, first=False) == 0


def test_decode_reserve():
    r = req([1, 2], max_new_tokens=10)
    assert PrefillAdder.decode_reserve(r, 0.5) == 5.0
    r.output_ids = [3, 4, 5, 6]
    assert PrefillAdder.decode_reserve(r, 0.5) == 3.0
    r.output_ids = list(range(12))
    assert PrefillAdder.decode_reserve(r, 0.5) == 0.0
    big = req([1], max_new_tokens=100_000)
    assert PrefillAdder.decode_reserve(big, 1.0) == DECODE_RESERVE_CAP


def test_shares_new_prefix():
    base = list(range(100, 140))  # 40 tokens
    a = adder()
    assert not a.shares_new_prefix(req(base), 0)  # nothing admitted yet
    a.commit(base, len(base), 0.0)
    assert a.shares_new_prefix(req(base), 0)  # identical prompt
    assert a.shares_new_prefix(req([5, 6, 7]), 0) is False
    n = IN_BATCH_PREFIX_MIN
    assert a.shares_new_prefix(req(base[:n] + [1, 2, 3]), 0)  # 32 shared new tokens
    assert not a.shares_new_prefix(req(base[:n - 1] + [1, 2, 3]), 0)  # 31
    longer = base + [7, 8, 9]
    assert a.shares_new_prefix(req(longer), len(base) - n)  # exactly 32 of the shared tokens are new
    assert not a.shares_new_prefix(req(longer), len(base) - n + 1)  # only 31 new
    assert not a.shares_new_prefix(req(longer), len(base))  # all shared tokens already cached
    short = adder()
    short.commit([5, 6, 7], 3, 0.0)
    assert short.shares_new_prefix(req([5, 6, 7]), 0)  # identical short prompts go one at a time
    assert short.shares_new_prefix(req([5, 6, 8]), 0)  # all its cacheable tokens are being computed
    assert not short.shares_new_prefix(req([5, 9, 8]), 0)


def test_identical_prompt_already_cached_is_not_deferred():
    base = list(range(100, 140))
    a = adder()
    a.commit(base, 1, 0.0)  # the other copy computes only its last token
    assert not a.shares_new_prefix(req(base), len(base) - 1)


def test_admission_reuses_the_orderings_match():
    """lpm matches each waiting request once per step: admission takes the ordering's match."""
    from tests.sched_harness import make_req, make_scheduler

    sched = make_scheduler(4000, schedule_policy="lpm", max_running=4)
    for i in range(6):
        sched.add_request(make_req(f"r{i}", 40 + i, 4, seed=i))
    calls = []
    real = sched.tree_cache.match_prefix
    sched.tree_cache.match_prefix = lambda key, *ns: calls.append(len(key)) or real(key, *ns)
    batch = sched.prefill.build([])
    assert len(calls) == 6  # one per waiting request, none again at admission
    assert batch.batch_size == 4
