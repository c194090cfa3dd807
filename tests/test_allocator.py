"""Unit and property tests for radixlm.mem.allocator.TokenToKVPoolAllocator."""

from __future__ import annotations

from typing import List, Tuple

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from radixlm.mem.allocator import TokenToKVPoolAllocator


def _held(*ts: torch.Tensor) -> torch.Tensor:
    return torch.cat([t for t in ts]) if ts else torch.empty(0, dtype=torch.int64)


# ------------------------------------------------------------------ page_size 1
def test_construction_page1() -> None:
    a = TokenToKVPoolAllocator(10)
    assert (a.size, a.page_size, a.num_pages, a.num_slots_total) == (10, 1, 10, 11)
    assert a.available_size() == 10


def test_construction_rounds_down_and_rejects_tiny() -> None:
    a = TokenToKVPoolAllocator(10, page_size=4)
    assert (a.size, a.num_pages, a.num_slots_total) == (8, 2, 12)
    with pytest.raises(ValueError):
        TokenToKVPoolAllocator(3, page_size=4)
    with pytest.raises(ValueError):
        TokenToKVPoolAllocator(0)


def test_alloc_free_page1() -> None:
    a = TokenToKVPoolAllocator(8)
    x = a.alloc(3)
    assert x.dtype == torch.int64 and x.tolist() == [1, 2, 3]
    assert a.available_size() == 5
    assert a.alloc(6) is None and a.available_size() == 5
    y = a.alloc(5)
    assert sorted(y.tolist()) == [4, 5, 6, 7, 8]
    assert a.available_size() == 0 and a.alloc(1) is None
    assert a.alloc(0).numel() == 0
    a.check_integrity(_held(x, y))
    a.free(x)
    assert a.available_size() == 3
    a.check_integrity(y)
    a.clear()
    assert a.available_size() == 8 and a.alloc(2).tolist() == [1, 2]


def test_alloc_extend_page1_is_plain_pop() -> None:
    a = TokenToKVPoolAllocator(8)
    out = a.alloc_extend([5, 0, 7], [3, 0, 9], [1, 2, 1])
    assert out.numel() == 4 and a.available_size() == 4
    assert a.alloc_extend([0], [0], [5]) is None and a.available_size() == 4


def test_double_free_page1() -> None:
    a = TokenToKVPoolAllocator(8)
    x = a.alloc(3)
    a.free(x[:1])
    with pytest.raises(RuntimeError, match="slot 1"):
        a.free(x[:1])
    with pytest.raises(RuntimeError, match="slot 2"):
        a.free(torch.tensor([2, 2]))
    with pytest.raises(RuntimeError, match="slot 0"):
        a.free(torch.tensor([0]))
    with pytest.raises(RuntimeError, match="slot 9"):
        a.free(torch.tensor([9]))
    with pytest.raises(RuntimeError, match="slot 5"):
        a.free(torch.tensor([2, 5]))  # 5 was never allocated; 2 must not be freed either
    assert a.available_size() == 6
    a.check_integrity(x[1:])


def test_check_integrity_catches_leak_and_overlap() -> None:
    a = TokenToKVPoolAllocator(8)
    x = a.alloc(3)
    with pytest.raises(RuntimeError, match="leak"):
        a.check_integrity(x[:2])
    with pytest.raises(RuntimeError, match="both free and held"):
        a.check_integrity(torch.cat([x, torch.tensor([6])]))
    with pytest.raises(RuntimeError, match="held twice"):
        a.check_integrity(torch.cat([x, x[:1]]), exclusive=True)
    a.check_integrity(torch.cat([x, x[:1]]))


# ------------------------------------------------------------------ page_size 4
def test_alloc_page4() -> None:
    a = TokenToKVPoolAllocator(16, page_size=4)
    assert a.num_pages == 4 and a.num_slots_total == 20
    x = a.alloc(5)
    assert x.tolist() == [4, 5, 6, 7, 8]
    assert a.available_size() == 8
    assert a.alloc(9) is None and a.available_size() == 8
    a.check_integrity(x)


def test_alloc_extend_page4_continues_partial_page() -> None:
    a = TokenToKVPoolAllocator(32, page_size=4)
    r0 = a.alloc(6)  # pages 1, 2 -> slots 4..9 used, 10, 11 spare
    r1 = a.alloc(4)  # page 3 -> slots 12..15, full
    assert r0.tolist() == [4, 5, 6, 7, 8, 9] and r1.tolist() == [12, 13, 14, 15]
    out = a.alloc_extend([9, 15], [6, 4], [3, 2])
    # r0: 10, 11 fill its page, then fresh page 4 (16); r1: fresh page 5 (20, 21)
    assert out.tolist() == [10, 11, 16, 20, 21]
    assert a.available_size() == 32 - 5 * 4
    # decode for a batch, mixing partial and aligned positions
    out = a.alloc_extend([16, 21], [9, 6], [1, 1])
    assert out.tolist() == [17, 22]
    assert a.available_size() == 32 - 5 * 4
    a.check_integrity(torch.cat([r0, r1, torch.tensor([10, 11, 16, 17, 20, 21, 22])]))


def test_alloc_extend_page4_all_or_nothing() -> None:
    a = TokenToKVPoolAllocator(16, page_size=4)
    r = a.alloc(3)  # page 1
    free_before = a.available_size()
    assert a.alloc_extend([r[-1].item(), 0], [3, 0], [5, 9]) is None  # needs 1 + 3 pages, 3 free
    assert a.available_size() == free_before
    out = a.alloc_extend([r[-1].item(), 0], [3, 0], [5, 4])
    assert out.tolist() == [7, 8, 9, 10, 11, 12, 13, 14, 15]


def test_alloc_extend_rejects_inconsistent_last_slot() -> None:
    a = TokenToKVPoolAllocator(16, page_size=4)
    a.alloc(3)
    with pytest.raises(ValueError):
        a.alloc_extend([5], [3], [1])  # position 2 must be at in-page offset 2, slot 5 is offset 1


def test_free_page4_frees_whole_pages_once() -> None:
    a = TokenToKVPoolAllocator(16, page_size=4)
    x = a.alloc(6)
    a.free(torch.tensor([4, 5, 9]))  # pages 1 and 2, page 1 given twice
    assert a.available_size() == 16
    with pytest.raises(RuntimeError, match="double free"):
        a.free(torch.tensor([x[-1].item()]))
    with pytest.raises(RuntimeError, match="slot 2"):
        a.free(torch.tensor([2]))
    a.check_integrity(torch.empty(0, dtype=torch.int64))


def test_check_integrity_page4_leak() -> None:
    a = TokenToKVPoolAllocator(16, page_size=4)
    x = a.alloc(4)
    y = a.alloc(2)
    a.check_integrity(torch.cat([x[:1], y]))  # any slot of a page holds it
    with pytest.raises(RuntimeError, match="leak"):
        a.check_integrity(x)


def test_deterministic_after_clear() -> None:
    a = TokenToKVPoolAllocator(16, page_size=4)
    first = a.alloc(7).tolist()
    a.free(a.alloc(4))
    a.clear()
    assert a.alloc(7).tolist() == first


def test_large_pool_decode_batch() -> None:
    a = TokenToKVPoolAllocator(1 << 20, page_size=16)
    prefix = torch.randint(1, 300, (256,))
    reqs = a.alloc_extend([0] * 256, [0] * 256, prefix.tolist())
    assert reqs.numel() == int(prefix.sum())
    ends = torch.cumsum(prefix, 0) - 1
    out = a.alloc_extend(reqs[ends].tolist(), prefix.tolist(), [1] * 256)
    assert out.numel() == 256 and torch.unique(out).numel() == 256


# ------------------------------------------------------------------ properties
def _naive_extend(a: TokenToKVPoolAllocator, last: List[int], pre: List[int], ext: List[int]) -> Tuple[int, List[int]]:
    """Reference: pages needed and per-token page-relative layout (-1 = fresh page)."""
    ps, pages, layout = a.page_size, 0, []
    for l, p, e in zip(last, pre, ext):
        fill = 0 if p % ps == 0 else min(ps - p % ps, e)
        layout += [l + 1 + j for j in range(fill)]
        pages += -(-(e - fill) // ps)
        layout += [-1] * (e - fill)
    return pages, layout


@settings(max_examples=120, deadline=None)
@given(
    page_size=st.sampled_from([1, 2, 4]),
    reqs=st.lists(st.tuples(st.integers(0, 9), st.integers(0, 6)), min_size=0, max_size=6),
    decode=st.booleans(),
)
def test_alloc_extend_matches_naive(page_size: int, reqs: List[Tuple[int, int]], decode: bool) -> None:
    a = TokenToKVPoolAllocator(40, page_size=page_size)
    pre = [p for p, _ in reqs]
    ext = [1 if decode else e for _, e in reqs]  # decode: the one-token fast path
    owned = [a.alloc(p) for p in pre]
    if any(o is None for o in owned):
        return
    last = [int(o[-1]) if o.numel() else 0 for o in owned]
    pages, layout = _naive_extend(a, last, pre, ext)
    before = a.available_size()
    out = a.alloc_extend(last, pre, ext)
    if pages * page_size > before:
        assert out is None and a.available_size() == before
        return
    assert out is not None and a.available_size() == before - pages * page_size
    got = out.tolist()
    assert [g for g, l in zip(got, layout) if l != -1] == [l for l in layout if l != -1]
    pos = 0
    for e in ext:  # each request's fresh slots are whole pages taken in order
        fresh = [g for g, l in zip(got[pos : pos + e], layout[pos : pos + e]) if l == -1]
        assert all(f % page_size == k % page_size for k, f in enumerate(fresh))
        assert all(fresh[k] == fresh[k - 1] + 1 for k in range(1, len(fresh)) if k % page_size)
        pos += e
    everything = torch.cat(owned + [out]) if owned else out
    assert torch.unique(everything).numel() == everything.numel()
    a.check_integrity(everything, exclusive=True)


@settings(max_examples=60, deadline=None)
@given(
    page_size=st.sampled_from([1, 3]),
    ops=st.lists(st.tuples(st.booleans(), st.integers(0, 10)), max_size=30),
)
def test_random_alloc_free_keeps_integrity(page_size: int, ops: List[Tuple[bool, int]]) -> None:
    a = TokenToKVPoolAllocator(30, page_size=page_size)
    owned: List[torch.Tensor] = []
    for is_alloc, n in ops:
        if is_alloc:
            before = a.available_size()
            x = a.alloc(n)
            assert (x is None) == (-(-n // page_size) * page_size > before)
            if x is not None and x.numel():
                owned.append(x)
        elif owned:
            a.free(owned.pop(n % len(owned)))
        held = torch.cat(owned) if owned else torch.empty(0, dtype=torch.int64)
        a.check_integrity(held, exclusive=True)
        used_pages = sum(-(-o.numel() // page_size) for o in owned)
        assert a.available_size() == a.size - used_pages * page_size


@settings(max_examples=40, deadline=None)
@given(
    page_size=st.sampled_from([1, 3]),
    ops=st.lists(st.tuples(st.booleans(), st.integers(0, 10)), max_size=30),
)
def test_unvalidated_free_hands_out_the_same_slots(page_size: int, ops: List[Tuple[bool, int]]) -> None:
    """GPU pools skip free()'s checks (each waits for the device): same slots, same integrity, for valid use."""
    checked = TokenToKVPoolAllocator(30, page_size=page_size)
    fast = TokenToKVPoolAllocator(30, page_size=page_size, validate=False)
    assert checked.validate and not fast.validate
    owned: List[Tuple[torch.Tensor, torch.Tensor]] = []
    for is_alloc, n in ops:
        if is_alloc:
            x, y = checked.alloc(n), fast.alloc(n)
            assert (x is None) == (y is None)
            if x is not None and x.numel():
                assert torch.equal(x, y)
                owned.append((x, y))
        elif owned:
            x, y = owned.pop(n % len(owned))
            checked.free(x)
            fast.free(y)
        assert fast.available_size() == checked.available_size()
        held = torch.cat([y for _, y in owned]) if owned else torch.empty(0, dtype=torch.int64)
        fast.check_integrity(held, exclusive=True)


def test_validate_defaults_on_for_cpu_only() -> None:
    assert TokenToKVPoolAllocator(8).validate
    assert not TokenToKVPoolAllocator(8, validate=False).validate


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_page1_alloc_free_never_waits_for_the_device() -> None:
    """Under overlap scheduling a device wait in alloc/free stalls on the forward in flight."""
    a = TokenToKVPoolAllocator(4096, page_size=1, device="cuda")
    assert not a.validate
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        x = a.alloc(100)
        y = a.alloc_extend([0], [0], [7])
        a.free(x)
        a.free(y)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert a.available_size() == a.size
    a.check_integrity(torch.empty(0, dtype=torch.int64, device="cuda"))
