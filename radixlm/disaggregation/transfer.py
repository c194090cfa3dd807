"""KV transfer backend `tcp`: the bytes of one request's KV, cut into chunks and written back.

`KVSendState` (prefill side) turns a request's KV slots into per-layer, page-aligned chunks of raw
bytes (protocol.chunk), and lets out only as many as the credit allows: bytes sent and not yet
acknowledged by the receiver stay within `max_inflight_bytes` (at least one chunk is always
allowed, so a chunk larger than the window still goes, alone). `KVRecvState` (decode side) checks
each chunk against the request's reserved slots and layout and writes it into the KV pool; it knows
when every byte has arrived. Both are plain objects over a KV pool (`MHATokenToKVPool`): the sockets,
deadlines and requests are the business of prefill.py and decode.py.

Other backends (mooncake, nixl: RDMA on GPU clusters) are not implemented: `check_backend` says so.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import List, Optional, Set, Tuple

import torch

from radixlm.disaggregation import protocol
from radixlm.disaggregation.protocol import KVLayout, ProtocolError

CHUNK_TARGET_BYTES = 256 * 1024  # K + V of one layer per chunk, about
BACKEND_PACKAGES = {"mooncake": "mooncake-transfer-engine (module mooncake)", "nixl": "nixl"}


def check_backend(name: str) -> None:
    """Only `tcp` is implemented; a clear error for the others, whether or not their package is here."""
    if name == "tcp":
        return
    if name not in BACKEND_PACKAGES:
        raise ValueError(f"disaggregation_transfer_backend: {name!r} is not one of tcp, mooncake, nixl")
    installed = importlib.util.find_spec(name) is not None
    raise ValueError(f"disaggregation_transfer_backend: {name} is not implemented in radixlm"
                     + (" (the package is installed, but no backend uses it)" if installed
                        else f" (and {BACKEND_PACKAGES[name]} is not installed)")
                     + "; use tcp (ZeroMQ over TCP)")


def chunk_tokens_for(layout: KVLayout, page_size: int, target_bytes: int = CHUNK_TARGET_BYTES) -> int:
    """Tokens per chunk: whole pages, about `target_bytes` of K+V of one layer, at least one page."""
    pages = max(1, target_bytes // (2 * layout.token_bytes() * page_size))
    return pages * page_size


def chunk_plan(n_tokens: int, num_layers: int, chunk_tokens: int) -> List[Tuple[int, int, int]]:
    """(layer, start, n) of every chunk, token ranges outermost so the receiver's layers fill evenly."""
    return [(layer, s, min(chunk_tokens, n_tokens - s)) for s in range(0, n_tokens, chunk_tokens)
            for layer in range(num_layers)]


@dataclass
class KVSendState:
    """One request's KV on its way out. `slots`: the request's KV slots, in token order."""

    room: int
    slots: torch.Tensor
    layout: KVLayout
    chunk_tokens: int
    max_inflight_bytes: int
    plan: List[Tuple[int, int, int]] = field(default_factory=list)
    next_chunk: int = 0
    sent_bytes: int = 0
    acked_bytes: int = 0

    def __post_init__(self):
        self.plan = chunk_plan(len(self.slots), self.layout.num_layers, self.chunk_tokens)

    @property
    def total_bytes(self) -> int:
        return 2 * len(self.slots) * self.layout.num_layers * self.layout.token_bytes()

    @property
    def all_sent(self) -> bool:
        return self.next_chunk >= len(self.plan)

    @property
    def inflight_bytes(self) -> int:
        return self.sent_bytes - self.acked_bytes

    def chunk_bytes(self, i: int) -> int:
        return 2 * self.plan[i][2] * self.layout.token_bytes()

    def can_send(self) -> bool:
        if self.all_sent:
            return False
        return self.inflight_bytes == 0 or self.inflight_bytes + self.chunk_bytes(self.next_chunk) \
            <= self.max_inflight_bytes

    def chunk_frames(self, pool) -> List[bytes]:
        """The next chunk's frames (`can_send()` must be true); `mark_sent()` once they went out."""
        layer, start, n = self.plan[self.next_chunk]
        loc = self.slots[start:start + n].to(pool.k_buffer[layer].device)
        k = pool.k_buffer[layer][loc].contiguous().cpu()
        v = pool.v_buffer[layer][loc].contiguous().cpu()
        return protocol.chunk(self.room, layer, start, _raw(k), _raw(v), n)

    def mark_sent(self) -> None:
        self.sent_bytes += self.chunk_bytes(self.next_chunk)
        self.next_chunk += 1

    def on_ack(self, nbytes: int) -> None:
        if not self.acked_bytes <= nbytes <= self.sent_bytes:
            raise ProtocolError(f"room {self.room}: ack of {nbytes} bytes, but {self.sent_bytes} were sent "
                                f"and {self.acked_bytes} acknowledged")
        self.acked_bytes = nbytes


@dataclass
class KVRecvState:
    """One request's KV on its way in, into `slots` (reserved for its prompt, token order)."""

    room: int
    slots: torch.Tensor
    layout: KVLayout
    received_bytes: int = 0
    seen: Set[Tuple[int, int]] = field(default_factory=set)

    @property
    def total_bytes(self) -> int:
        return 2 * len(self.slots) * self.layout.num_layers * self.layout.token_bytes()

    @property
    def complete(self) -> bool:
        return self.received_bytes == self.total_bytes

    def write(self, pool, layer: int, start: int, n: int, k: bytes, v: bytes) -> None:
        """Checks a chunk against the reservation and the layout, and writes it into the pool."""
        lay = self.layout
        if not 0 <= layer < lay.num_layers or n <= 0 or start + n > len(self.slots):
            raise ProtocolError(f"room {self.room}: chunk layer {layer} tokens [{start}, {start + n}) is outside "
                                f"the {len(self.slots)} reserved tokens x {lay.num_layers} layers")
        if (layer, start) in self.seen:
            raise ProtocolError(f"room {self.room}: chunk layer {layer} start {start} arrived twice")
        want = n * lay.token_bytes()
        if len(k) != want or len(v) != want:
            raise ProtocolError(f"room {self.room}: chunk of {n} tokens needs {want} bytes each for K and V, got "
                                f"{len(k)} and {len(v)}")
        dtype = getattr(torch, lay.dtype)
        shape = (n, lay.num_kv_heads, lay.head_dim)
        buf = pool.k_buffer[layer]
        loc = self.slots[start:start + n].to(buf.device)
        buf[loc] = _tensor(k, dtype, shape).to(buf.device)
        pool.v_buffer[layer][loc] = _tensor(v, dtype, shape).to(buf.device)
        self.seen.add((layer, start))
        self.received_bytes += 2 * want


def _raw(t: torch.Tensor) -> bytes:
    """A CPU tensor's bytes (bf16 has no numpy dtype: viewed as bytes first)."""
    return t.reshape(-1).view(torch.uint8).numpy().tobytes()


def _tensor(data, dtype: torch.dtype, shape) -> torch.Tensor:
    mv = memoryview(data)
    return torch.frombuffer(bytearray(mv), dtype=torch.uint8).view(dtype).reshape(shape)


def layout_mismatch(mine: KVLayout, theirs: KVLayout) -> Optional[str]:
    if mine == theirs:
        return None
    return f"KV layouts differ: this worker {mine.to_json()}, the peer {theirs.to_json()} (same model and dtype?)"
