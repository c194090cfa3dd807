"""RadixAttention prefix cache: a radix tree from token ids to KV-slot indices.

Owns: the tree of cached token prefixes, the KV slots stored in it (from the
moment ``insert`` adopts them until ``evict``/``reset`` frees them through the
allocator), per-node lock counts and LRU access stamps, the incremental
evictable/protected size counters, and the eviction heap: every unlocked leaf
has one entry in it (pushed when it becomes an unlocked leaf, checked lazily
when popped), so ``evict`` costs O(evicted log n), never a walk of the tree.

In:  token-id keys (``match_prefix``, ``insert``), slot tensors to adopt
     (``insert``), lock/unlock of matched nodes, eviction demands.
Out: ``MatchResult`` (matched slot indices + last node), sizes, freed counts.

Namespaces: a key may carry a namespace (SGLang's ``extra_key`` / ``cache_salt``; any hashable,
None for the shared one). Each namespace is its own subtree under the root: the root's children are
keyed by (namespace, first token or page), every node records its namespace, and matching or
inserting never leaves it, so requests of different namespaces never share KV. Locks, eviction
(one LRU heap over all namespaces) and the integrity check are the same for all of them.

Must not touch: request state, the req-to-token table, or KV tensor contents.
It frees slots only through ``allocator.free`` and only slots it owns; it
never allocates. With ``page_size > 1`` everything is in whole pages.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass
from typing import Hashable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from radixlm.mem.allocator import TokenToKVPoolAllocator

KeyLike = Union[Sequence[int], Tensor]


class TreeNode:
    """One radix-tree edge+node: ``key`` tokens stored at ``value`` slots.

    ``lock_ref`` counts locks held on this node or any descendant; ``id`` is a
    creation counter used as the LRU tie-break; ``in_heap``: the node has an
    entry in the cache's eviction heap; ``parent`` is None once it is evicted.
    """

    __slots__ = ("children", "parent", "key", "value", "lock_ref", "last_access_time", "hit_count", "id",
                 "in_heap", "namespace")

    def __init__(self, node_id: int, key: List[int], value: Tensor, parent: Optional["TreeNode"], now: float,
                 namespace: Hashable = None) -> None:
        self.children: dict = {}
        self.parent: Optional[TreeNode] = parent
        self.key: List[int] = key
        self.value: Tensor = value
        self.lock_ref: int = 0
        self.last_access_time: float = now
        self.hit_count: int = 0
        self.id: int = node_id
        self.in_heap: bool = False
        self.namespace: Hashable = namespace

    def is_leaf(self) -> bool:
        return not self.children

    def __repr__(self) -> str:
        ns = "" if self.namespace is None else f", ns={self.namespace!r}"
        return f"TreeNode(id={self.id}, key={self.key}, lock_ref={self.lock_ref}, t={self.last_access_time}{ns})"


@dataclass
class MatchResult:
    """Matched KV slots (``len(indices)`` = matched length) and the node where the match ends."""

    indices: Tensor
    last_node: TreeNode


class RadixCache:
    """Prefix cache keyed by token ids; values are KV-slot indices."""

    def __init__(self, allocator: TokenToKVPoolAllocator, page_size: int = 1, disable: bool = False) -> None:
        if page_size != allocator.page_size:
            raise ValueError(f"page_size {page_size} != allocator.page_size {allocator.page_size}")
        self.allocator = allocator
        self.page_size = page_size
        self.disable = disable
        self.device = allocator.device
        self._ids = itertools.count()
        self._clock = itertools.count(1)
        self._init_tree()

    # ---------------------------------------------------------------- helpers
    def _tick(self) -> float:
        return float(next(self._clock))

    def _empty(self) -> Tensor:
        return torch.empty(0, dtype=torch.int64, device=self.device)

    def _child_key(self, key: Sequence[int], namespace: Hashable = None) -> Hashable:
        base = key[0] if self.page_size == 1 else tuple(key[: self.page_size])
        return base if namespace is None else (namespace, base)

    def _key_of(self, node: TreeNode) -> Hashable:
        """The key ``node`` is stored under in its parent's children."""
        return self._child_key(node.key, node.namespace)

    def _match_len(self, a: Sequence[int], b: Sequence[int]) -> int:
        """Common-prefix length, rounded down to whole pages."""
        n = 0
        for x, y in zip(a, b):
            if x != y:
                break
            n += 1
        return n - n % self.page_size

    @staticmethod
    def _as_list(key: KeyLike) -> List[int]:
        return key.tolist() if isinstance(key, Tensor) else [int(t) for t in key]

    def _split(self, child: TreeNode, n: int) -> TreeNode:
        """Split ``child`` after ``n`` tokens; return the new upper node."""
        parent = child.parent
        assert parent is not None
        mid = TreeNode(next(self._ids), child.key[:n], child.value[:n], parent, child.last_access_time,
                       child.namespace)
        mid.lock_ref = child.lock_ref
        mid.hit_count = child.hit_count
        child.key = child.key[n:]
        child.value = child.value[n:]
        child.parent = mid
        mid.children[self._key_of(child)] = child
        parent.children[self._key_of(mid)] = mid
        return mid

    def _nodes(self) -> Iterator[TreeNode]:
        """All nodes except root, parents before children."""
        stack = list(self.root_node.children.values())
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())

    # ------------------------------------------------------------------ reset
    def reset(self) -> None:
        """Free every slot held by the tree and empty it. Raises if any node is locked."""
        locked = next((n for n in self._nodes() if n.lock_ref > 0), None)
        if locked is not None:
            raise RuntimeError(f"reset() while {locked} is locked")
        values = self.all_values()
        if values.numel():
            self.allocator.free(values)
        self._init_tree()

    def _init_tree(self) -> None:
        self.root_node = TreeNode(next(self._ids), [], self._empty(), None, self._tick())
        self.root_node.lock_ref = 1
        self._evictable_size = 0
        self._protected_size = 0
        self._evict_heap: List[tuple] = []  # (last_access_time when pushed, id, node); stale entries allowed

    # ------------------------------------------------------------------ match
    def match_prefix(self, key: KeyLike, namespace: Hashable = None) -> MatchResult:
        """Longest cached prefix of ``key`` in ``namespace`` (whole pages only). Splits so last_node
        ends at the match."""
        key = self._as_list(key)
        key = key[: len(key) - len(key) % self.page_size]
        if self.disable or not key:
            return MatchResult(self._empty(), self.root_node)
        now = self._tick()
        node = self.root_node
        node.last_access_time = now
        values: List[Tensor] = []
        i = 0
        while i < len(key):
            child = node.children.get(self._child_key(key[i:], namespace))
            if child is None:
                break
            child.last_access_time = now
            child.hit_count += 1
            n = self._match_len(child.key, key[i:])
            if n < len(child.key):
                child = self._split(child, n)
            values.append(child.value)
            node = child
            i += n
        indices = torch.cat(values) if values else self._empty()
        return MatchResult(indices, node)

    # ----------------------------------------------------------------- insert
    def insert(self, key: KeyLike, value: Tensor, namespace: Hashable = None) -> int:
        """Insert key -> value (in ``namespace``); return the length that was already cached.

        The tree adopts ``value[returned:]``; ``value[:returned]`` stays the
        caller's (free those slots that differ from the tree's).
        """
        return self.insert_and_match(key, value, namespace)[0]

    def insert_and_match(self, key: KeyLike, value: Tensor, namespace: Hashable = None) -> Tuple[int, MatchResult]:
        """``insert``, also returning the match of the whole key that the insert leaves: the
        tree's slots for it and the node it ends on (what ``match_prefix(key)`` would return
        next, without walking the tree again)."""
        if self.disable:
            raise RuntimeError("insert() on a disabled RadixCache")
        key = self._as_list(key)
        if len(key) != value.numel():
            raise ValueError(f"key length {len(key)} != value length {value.numel()}")
        if len(key) % self.page_size:
            raise ValueError(f"key length {len(key)} is not a multiple of page_size {self.page_size}")
        value = value.reshape(-1).to(device=self.device, dtype=torch.int64)
        now = self._tick()
        node = self.root_node
        node.last_access_time = now
        values: List[Tensor] = []
        i = 0
        while i < len(key):
            ck = self._child_key(key[i:], namespace)
            child = node.children.get(ck)
            if child is None:
                leaf = TreeNode(next(self._ids), key[i:], value[i:].clone(), node, now, namespace)
                node.children[ck] = leaf
                self._evictable_size += len(leaf.key)
                self._push_evictable(leaf)
                values.append(leaf.value)
                return i, MatchResult(torch.cat(values), leaf)
            child.last_access_time = now
            n = self._match_len(child.key, key[i:])
            if n < len(child.key):
                child = self._split(child, n)
            values.append(child.value)
            node = child
            i += n
        return i, MatchResult(torch.cat(values) if values else self._empty(), node)

    # ------------------------------------------------------------------ locks
    def inc_lock_ref(self, node: TreeNode) -> int:
        """Lock ``node`` and its ancestors; return tokens moved evictable -> protected."""
        moved = 0
        while node is not self.root_node:
            if node.lock_ref == 0:
                moved += len(node.key)
            node.lock_ref += 1
            node = node.parent
        self._evictable_size -= moved
        self._protected_size += moved
        return moved

    def dec_lock_ref(self, node: TreeNode) -> int:
        """Unlock ``node`` and its ancestors; return tokens moved protected -> evictable."""
        n = node
        while n is not self.root_node:
            if n.lock_ref <= 0:
                raise RuntimeError(f"dec_lock_ref below zero at {n}")
            n = n.parent
        moved = 0
        while node is not self.root_node:
            node.lock_ref -= 1
            if node.lock_ref == 0:
                moved += len(node.key)
                self._push_evictable(node)
            node = node.parent
        self._evictable_size += moved
        self._protected_size -= moved
        return moved

    # ------------------------------------------------------------------ evict
    def evict(self, num_tokens: int) -> int:
        """Free unlocked leaves in LRU order until >= num_tokens freed; return tokens freed."""
        if self.disable or num_tokens <= 0:
            return 0
        heap = self._evict_heap
        freed = 0
        while heap and freed < num_tokens:
            t, _, node = heapq.heappop(heap)
            node.in_heap = False
            if node.parent is None or not node.is_leaf() or node.lock_ref > 0:
                continue  # evicted, grew a child or got locked since: pushed again when evictable
            if t != node.last_access_time:  # touched since it was pushed: back in at its real time
                self._push_evictable(node)
                continue
            parent = node.parent
            freed += self._delete_leaf(node)
            self._push_evictable(parent)
        return freed

    def _push_evictable(self, node: TreeNode) -> None:
        """Gives an unlocked leaf its heap entry (at most one per node)."""
        if node.in_heap or node is self.root_node or node.lock_ref > 0 or not node.is_leaf() or node.parent is None:
            return
        node.in_heap = True
        heapq.heappush(self._evict_heap, (node.last_access_time, node.id, node))

    def _delete_leaf(self, node: TreeNode) -> int:
        self.allocator.free(node.value)
        del node.parent.children[self._key_of(node)]
        node.parent = None
        self._evictable_size -= len(node.key)
        return len(node.key)

    # ------------------------------------------------------------------ sizes
    def evictable_size(self) -> int:
        return self._evictable_size

    def protected_size(self) -> int:
        return self._protected_size

    def total_size(self) -> int:
        return self._evictable_size + self._protected_size

    def all_values(self) -> Tensor:
        """Every slot held by the tree (no particular order)."""
        values = [n.value for n in self._nodes()]
        return torch.cat(values) if values else self._empty()

    # -------------------------------------------------------------- integrity
    def check_integrity(self) -> None:
        """Recompute sizes and lock sums from a walk; raise RuntimeError on mismatch."""
        evictable = protected = 0
        if self.root_node.lock_ref != 1 or self.root_node.key:
            raise RuntimeError("root must have an empty key and lock_ref 1")
        for node in self._nodes():
            self._check_node(node)
            if node.lock_ref == 0:
                evictable += len(node.key)
            else:
                protected += len(node.key)
        self._check_children(self.root_node)
        if (evictable, protected) != (self._evictable_size, self._protected_size):
            raise RuntimeError(
                f"size counters (evictable={self._evictable_size}, protected={self._protected_size}) "
                f"!= walk (evictable={evictable}, protected={protected})"
            )
        values = self.all_values()
        if torch.unique(values).numel() != values.numel():
            raise RuntimeError("a slot is stored in the tree twice")

    def _check_node(self, node: TreeNode) -> None:
        if not node.key or len(node.key) % self.page_size:
            raise RuntimeError(f"{node}: key length {len(node.key)} not a positive multiple of page_size")
        if node.value.numel() != len(node.key):
            raise RuntimeError(f"{node}: value length {node.value.numel()} != key length {len(node.key)}")
        if node.lock_ref < 0:
            raise RuntimeError(f"{node}: negative lock_ref")
        if node.is_leaf() and node.lock_ref == 0 and not node.in_heap:
            raise RuntimeError(f"{node}: an unlocked leaf without an eviction-heap entry")
        if self.page_size > 1:
            pages = node.value.reshape(-1, self.page_size)
            offsets = torch.arange(self.page_size, device=self.device)
            if not bool((pages == pages[:, :1] + offsets).all()) or bool((pages[:, 0] % self.page_size).any()):
                raise RuntimeError(f"{node}: value is not made of whole pages")
        self._check_children(node)

    def _check_children(self, node: TreeNode) -> None:
        child_locks = 0
        for ck, child in node.children.items():
            if child.parent is not node:
                raise RuntimeError(f"{child}: parent pointer is wrong")
            if not child.key or self._key_of(child) != ck:
                raise RuntimeError(f"{child}: stored under child key {ck!r}")
            if node is not self.root_node and child.namespace != node.namespace:
                raise RuntimeError(f"{child}: namespace differs from its parent's {node.namespace!r}")
            child_locks += child.lock_ref
        if node is not self.root_node and node.lock_ref < child_locks:
            raise RuntimeError(f"{node}: lock_ref {node.lock_ref} < sum of children's {child_locks}")

    # ------------------------------------------------------------------ debug
    def pretty_print(self) -> str:
        """Indented dump of the tree (also returned as a string)."""
        lines = [repr(self)]
        stack = [(c, 1) for c in reversed(list(self.root_node.children.values()))]
        while stack:
            node, depth = stack.pop()
            lines.append(
                f"{'  ' * depth}{'' if node.namespace is None else repr(node.namespace) + ' '}"
                f"{node.key} -> {node.value.tolist()} "
                f"lock={node.lock_ref} t={node.last_access_time:g} hits={node.hit_count}"
            )
            stack.extend((c, depth + 1) for c in reversed(list(node.children.values())))
        text = "\n".join(lines)
        print(text)
        return text

    def __repr__(self) -> str:
        return (
            f"RadixCache(page_size={self.page_size}, disable={self.disable}, "
            f"evictable={self._evictable_size}, protected={self._protected_size})"
        )
