"""The wire format between a prefill worker's bootstrap server and a decode worker.

One ZeroMQ connection per (decode worker, prefill worker): the decode worker's DEALER socket
connects to the prefill worker's ROUTER socket on its bootstrap port; the ROUTER's routing id of that
connection is the decode worker's receive address. Every message is a multipart ZeroMQ message:

* control: [b"C", JSON object] with "t" (the type) and "room", types:
  decode -> prefill: `register` {room, n_tokens, layout}, `ack` {room, bytes} (cumulative KV bytes
  received: the sender's credit), `done_ack` {room}, `cancel` {room, message};
  prefill -> decode: `keepalive` {room} (the request is queued or computing), `done` {room,
  first_token, logprob, top_logprobs, cached_tokens, total_bytes}, `error` {room, message}.
* KV chunk: [b"K", header (struct CHUNK_HEADER: room u64, layer u32, start u32, n_tokens u32), K bytes,
  V bytes]: tokens [start, start+n_tokens) of one layer, each tensor [n_tokens, kv_heads, head_dim] in
  the layout's dtype, C-contiguous, raw.

Owns encoding and decoding only; what the messages mean lives in prefill.py and decode.py.
"""

from __future__ import annotations

import json
import struct
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Tuple

CONTROL, CHUNK = b"C", b"K"
CHUNK_HEADER = struct.Struct("<QIII")  # room, layer, start token, n_tokens
MAX_CONTROL_BYTES = 64 * 1024
MAX_ROOM = 2**64 - 1


class ProtocolError(ValueError):
    """A malformed message from a peer (it is dropped and logged; it never takes a worker down)."""


@dataclass(frozen=True)
class KVLayout:
    """What both sides must agree on for raw KV bytes to mean the same thing."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str  # torch dtype name, e.g. "float32"

    @property
    def itemsize(self) -> int:
        import torch

        return torch.empty((), dtype=getattr(torch, self.dtype)).element_size()

    def token_bytes(self) -> int:
        """Bytes of one token's K (or V) in one layer."""
        return self.num_kv_heads * self.head_dim * self.itemsize

    def to_json(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: Any) -> "KVLayout":
        if not isinstance(d, dict):
            raise ProtocolError("layout must be an object")
        try:
            return cls(int(d["num_layers"]), int(d["num_kv_heads"]), int(d["head_dim"]), str(d["dtype"]))
        except (KeyError, TypeError, ValueError) as e:
            raise ProtocolError(f"bad layout: {e}") from None

    @classmethod
    def of_pool(cls, pool) -> "KVLayout":
        return cls(pool.num_layers, pool.num_kv_heads, pool.head_dim, str(pool.dtype).replace("torch.", ""))


def control(t: str, room: int, **fields: Any) -> List[bytes]:
    return [CONTROL, json.dumps({"t": t, "room": room, **fields}).encode()]


def chunk(room: int, layer: int, start: int, k: bytes, v: bytes, n_tokens: int) -> List[bytes]:
    return [CHUNK, CHUNK_HEADER.pack(room, layer, start, n_tokens), k, v]


def parse(frames: List[bytes]) -> Tuple[str, Dict[str, Any]]:
    """("control", dict) or ("chunk", {room, layer, start, n_tokens, k, v}); ProtocolError otherwise."""
    if not frames:
        raise ProtocolError("empty message")
    kind = bytes(frames[0])
    if kind == CONTROL:
        if len(frames) != 2 or len(frames[1]) > MAX_CONTROL_BYTES:
            raise ProtocolError("a control message is [b'C', JSON] of at most 64 KiB")
        try:
            msg = json.loads(bytes(frames[1]))
        except ValueError as e:
            raise ProtocolError(f"control message is not JSON: {e}") from None
        if not isinstance(msg, dict) or not isinstance(msg.get("t"), str) or not _is_room(msg.get("room")):
            raise ProtocolError("a control message needs 't' (string) and 'room' (unsigned 64-bit integer)")
        return "control", msg
    if kind == CHUNK:
        if len(frames) != 4 or len(frames[1]) != CHUNK_HEADER.size:
            raise ProtocolError("a KV chunk is [b'K', header, K bytes, V bytes]")
        room, layer, start, n = CHUNK_HEADER.unpack(bytes(frames[1]))
        return "chunk", {"room": room, "layer": layer, "start": start, "n_tokens": n, "k": frames[2],
                         "v": frames[3]}
    raise ProtocolError(f"unknown message kind {kind[:8]!r}")


def _is_room(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and 0 <= x <= MAX_ROOM
