"""Token-to-KV-pool slot allocator.

Owns: the free/used state of every KV-cache slot of one token-to-KV pool,
kept at page granularity (``page_size`` consecutive slots form a page).

In:  allocation requests (``alloc``, ``alloc_extend``), slot index tensors
     to give back (``free``), and for checking, the set of slots that other
     components claim to hold (``check_integrity``).
Out: int64 slot-index tensors on ``device``.

Layout: page 0 (slots ``0 .. page_size-1``) is the padding page and is never
handed out, so the KV tensors must have ``num_slots_total`` rows.
Usable pages are ``1 .. num_pages``.

Must not touch: the KV tensors themselves, request state, or the prefix
cache. It only knows which pages are free; callers own what they were given
until they hand it back with ``free``.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor

IntSeq = Union[Sequence[int], Tensor]


class TokenToKVPoolAllocator:
    """Page-granular free list over ``size`` usable KV slots.

    Free pages live in ``_free_pages[:_num_free]`` used as a stack: allocation
    pops from the end, freeing pushes onto it. After ``clear()`` the stack is
    descending so the lowest pages are handed out first. ``_page_free`` is a
    boolean mask (index = page id) used to detect double frees in O(n).

    ``validate`` turns on the checks of ``free`` (double free, padding page,
    range). Each of them reads a device value, which on a GPU waits for every
    kernel queued before it: under overlap scheduling that is the forward in
    flight. So they default to on for CPU pools and off for GPU pools; with
    them off and ``page_size == 1`` neither ``alloc`` nor ``free`` ever waits
    for the device. (A paged ``free`` still needs the number of distinct pages
    touched, which is data-dependent: one wait per call.)
    """

    def __init__(
        self,
        size: int,
        page_size: int = 1,
        device: Union[str, torch.device] = "cpu",
        validate: Optional[bool] = None,
    ) -> None:
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        num_pages = int(size) // page_size
        if num_pages < 1:
            raise ValueError(f"size {size} is smaller than one page of {page_size} tokens")
        self.page_size: int = page_size
        self.num_pages: int = num_pages
        self.size: int = num_pages * page_size
        self.num_slots_total: int = self.size + page_size
        self.device = torch.device(device)
        self.validate: bool = self.device.type == "cpu" if validate is None else bool(validate)
        self._free_pages = torch.empty(num_pages, dtype=torch.int64, device=self.device)
        self._page_free = torch.zeros(num_pages + 1, dtype=torch.bool, device=self.device)
        self._page_offsets = torch.arange(page_size, dtype=torch.int64, device=self.device)
        self._num_free = 0
        self.clear()

    # ------------------------------------------------------------------ state
    def clear(self) -> None:
        """Mark every usable page free again (lowest page allocated first)."""
        torch.arange(self.num_pages, 0, -1, out=self._free_pages)
        self._page_free.fill_(True)
        self._page_free[0] = False
        self._num_free = self.num_pages

    def available_size(self) -> int:
        """Number of free token slots (free pages * page_size)."""
        return self._num_free * self.page_size

    def _empty(self) -> Tensor:
        return torch.empty(0, dtype=torch.int64, device=self.device)

    def _pop_pages(self, k: int) -> Tensor:
        """Take ``k`` free pages (caller checked availability); ascending order."""
        start = self._num_free - k
        pages = self._free_pages[start : self._num_free].flip(0)
        self._num_free = start
        self._page_free[pages] = False
        return pages

    def _pages_to_slots(self, pages: Tensor) -> Tensor:
        return (pages.unsqueeze(1) * self.page_size + self._page_offsets).reshape(-1)

    # ------------------------------------------------------------- allocation
    def alloc(self, n: int) -> Optional[Tensor]:
        """Return ``n`` slots starting at a fresh page, or None if not enough pages.

        Takes ceil(n / page_size) whole pages; the unused tail of the last page
        belongs to the caller too (it comes back when any of its slots is freed).
        """
        if n < 0:
            raise ValueError(f"cannot allocate a negative number of slots ({n})")
        if n == 0:
            return self._empty()
        k = -(-n // self.page_size)
        if k > self._num_free:
            return None
        if self.page_size == 1:
            return self._pop_pages(k)
        return self._pages_to_slots(self._pop_pages(k))[:n]

    def alloc_extend(
        self,
        last_slots: IntSeq,
        prefix_lens: IntSeq,
        extend_lens: IntSeq,
    ) -> Optional[Tensor]:
        """Slots for positions ``prefix_lens[i] .. prefix_lens[i]+extend_lens[i]-1``, all i.

        Request i first fills the rest of its partial last page (slots
        ``last_slots[i]+1, ...``; ignored when ``prefix_lens[i] % page_size == 0``),
        then takes fresh pages. All-or-nothing: returns None and takes nothing
        if the fresh pages needed by the whole batch are not available.
        """
        if self.page_size == 1 and not isinstance(extend_lens, Tensor):  # host lists: no device round trip
            lens = [int(e) for e in extend_lens]
            if any(e < 0 for e in lens):
                raise ValueError("extend_lens must be >= 0")
            return self.alloc(sum(lens))
        ext = self._as_i64(extend_lens)
        if ext.numel() and bool((ext < 0).any()):
            raise ValueError("extend_lens must be >= 0")
        if self.page_size == 1:
            return self.alloc(int(ext.sum()))
        pre = self._as_i64(prefix_lens)
        last = self._as_i64(last_slots)
        if not (pre.numel() == ext.numel() == last.numel()):
            raise ValueError("last_slots, prefix_lens and extend_lens must have equal lengths")
        return self._alloc_extend_paged(last, pre, ext)

    def _as_i64(self, xs: IntSeq) -> Tensor:
        return torch.as_tensor(xs, dtype=torch.int64, device=self.device).reshape(-1)

    def _alloc_extend_paged(self, last: Tensor, pre: Tensor, ext: Tensor) -> Optional[Tensor]:
        ps = self.page_size
        partial = pre % ps
        bad = (partial != 0) & (last % ps != partial - 1)
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"request {i}: last_slots={int(last[i])} is not at in-page offset "
                f"{int(partial[i]) - 1} implied by prefix_len={int(pre[i])}"
            )
        if ext.numel() and bool((ext == 1).all()):
            return self._decode_slots(last, partial == 0)
        room = torch.where(partial == 0, torch.zeros_like(partial), ps - partial)
        fill = torch.minimum(room, ext)
        new_pages = (ext - fill + ps - 1) // ps
        total_pages = int(new_pages.sum())
        if total_pages > self._num_free:
            return None
        total = int(ext.sum())
        if total == 0:
            return self._empty()
        pages = self._pop_pages(total_pages)
        return self._extend_slots(last, ext, fill, new_pages, pages, total)

    def _decode_slots(self, last: Tensor, needs_page: Tensor) -> Optional[Tensor]:
        """Fast path, one token per request: next slot in the page, or a fresh page."""
        rows = needs_page.nonzero().reshape(-1)
        if rows.numel() > self._num_free:
            return None
        out = last + 1
        out[rows] = self._pop_pages(rows.numel()) * self.page_size
        return out

    def _extend_slots(
        self, last: Tensor, ext: Tensor, fill: Tensor, new_pages: Tensor, pages: Tensor, total: int
    ) -> Tensor:
        """Vectorised gather of per-token slots for ``alloc_extend``."""
        ps = self.page_size
        req = torch.repeat_interleave(torch.arange(ext.numel(), device=self.device), ext, output_size=total)
        tok_start = torch.cumsum(ext, 0) - ext
        page_start = torch.cumsum(new_pages, 0) - new_pages
        j = torch.arange(total, device=self.device) - tok_start[req]
        k = (j - fill[req]).clamp_min(0)
        page_idx = (page_start[req] + k // ps).clamp_max(max(pages.numel() - 1, 0))
        fresh = pages[page_idx] * ps + k % ps if pages.numel() else torch.zeros_like(j)
        return torch.where(j < fill[req], last[req] + 1 + j, fresh)

    # ------------------------------------------------------------------- free
    def free(self, indices: Tensor) -> None:
        """Give back slots. With page_size > 1 every page touched is freed (once).

        Raises RuntimeError (and frees nothing) on a double free, on a slot of
        the padding page 0, or on an out-of-range slot.
        """
        idx = torch.as_tensor(indices, dtype=torch.int64, device=self.device).reshape(-1)
        if idx.numel() == 0:
            return
        if not self.validate:
            self._push_free(idx if self.page_size == 1 else torch.unique(idx // self.page_size))
            return
        self._check_range(idx, "free")
        if self.page_size == 1:
            pages = idx
            uniq = torch.unique(pages)
            if uniq.numel() != pages.numel():
                dup = self._first_duplicate(pages)
                raise RuntimeError(f"double free: slot {dup} given twice in one free() call")
        else:
            pages = torch.unique(idx // self.page_size)
        already = self._page_free[pages]
        if bool(already.any()):
            page = int(pages[already.nonzero()[0, 0]])
            raise RuntimeError(
                f"double free: slot {page * self.page_size} (page {page}) is already free"
            )
        self._push_free(pages)

    def _push_free(self, pages: Tensor) -> None:
        """Push ``pages`` onto the free stack; ``numel`` is host-side, so no device wait."""
        k = pages.numel()
        self._free_pages[self._num_free : self._num_free + k] = pages
        self._num_free += k
        self._page_free[pages] = True

    def _check_range(self, idx: Tensor, what: str) -> None:
        bad = (idx < self.page_size) | (idx >= self.num_slots_total)
        if bool(bad.any()):
            slot = int(idx[bad.nonzero()[0, 0]])
            kind = "padding page 0" if 0 <= slot < self.page_size else "out of range"
            raise RuntimeError(f"{what}: slot {slot} is {kind} (valid: {self.page_size}..{self.num_slots_total - 1})")

    @staticmethod
    def _first_duplicate(xs: Tensor) -> int:
        s = torch.sort(xs).values
        return int(s[1:][s[1:] == s[:-1]][0])

    # -------------------------------------------------------------- integrity
    def check_integrity(self, held: Tensor, exclusive: bool = False) -> None:
        """Verify free pages and pages(held) partition all usable pages.

        ``held`` is every slot owned by anybody. Repeated slots are allowed
        (shared prefixes) unless ``exclusive`` is True. Raises RuntimeError.
        """
        held = torch.as_tensor(held, dtype=torch.int64, device=self.device).reshape(-1)
        self._check_free_list()
        if held.numel():
            self._check_range(held, "check_integrity")
            if exclusive and torch.unique(held).numel() != held.numel():
                raise RuntimeError(f"slot {self._first_duplicate(held)} is held twice")
        held_pages = torch.unique(held // self.page_size)
        both = self._page_free[held_pages]
        if bool(both.any()):
            page = int(held_pages[both.nonzero()[0, 0]])
            raise RuntimeError(f"page {page} (slot {page * self.page_size}) is both free and held")
        covered = self._page_free.clone()
        covered[held_pages] = True
        missing = (~covered[1:]).nonzero().reshape(-1) + 1
        if missing.numel():
            raise RuntimeError(
                f"leak: {missing.numel()} page(s) neither free nor held, e.g. page "
                f"{int(missing[0])} (slot {int(missing[0]) * self.page_size})"
            )

    def _check_free_list(self) -> None:
        stack = self._free_pages[: self._num_free]
        if bool(self._page_free[0]):
            raise RuntimeError("padding page 0 is marked free")
        if int(self._page_free.sum()) != self._num_free:
            raise RuntimeError("free-page mask and free-page count disagree")
        if stack.numel() and not bool(self._page_free[stack].all()):
            raise RuntimeError("free-page stack holds a page not marked free")
        if torch.unique(stack).numel() != stack.numel():
            raise RuntimeError("free-page stack holds a page twice")

    def __repr__(self) -> str:
        return (
            f"TokenToKVPoolAllocator(size={self.size}, page_size={self.page_size}, "
            f"free_pages={self._num_free}/{self.num_pages}, device={self.device})"
        )
