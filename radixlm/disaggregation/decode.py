"""Decode side of PD disaggregation: reserving KV for a prompt, receiving it, joining the batch.

Owns one DEALER socket per prefill worker it talks to (connected to the worker's bootstrap server;
ZeroMQ reconnects by itself when a restarted prefill worker comes back on the same port), the
requests waiting for a reservation (`prealloc`) and the rooms being received. For a request that
carries `bootstrap_host/port/room`:

1. reserve a request row and KV slots for the whole prompt (waits while the pool is full), put the
   request in the scheduler's `transfer` queue and send `register` to the prefill worker;
2. write each KV chunk into the reserved slots (checked against the reservation), acknowledging the
   bytes received (the sender's credit);
3. on `done`: the first token is appended as the request's first output and the request joins the
   running batch (or finishes, when that token ends it); `done_ack` releases the prefill side.

Deadline: a room that hears nothing from its prefill worker (chunk, keep-alive, done) for
`--disaggregation-timeout` s, or gets `error`, is aborted with a 503 naming the peer, and its
reserved KV is freed; other requests and /health are untouched. Faster when the connection says so
(a ZeroMQ socket monitor per peer): a prefill worker whose connection closes, or that refuses to
connect, fails the rooms registered with it at once (within the reconnect interval, <= 0.25 s). A
request still waiting for a reservation after the timeout is aborted the same way (the prefill
worker gave up on it by then).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, List, Optional, Tuple

from radixlm.core import FinishReason, Req, ReqOutput
from radixlm.disaggregation import protocol
from radixlm.disaggregation.common import (
    IDLE_WAIT_S,
    MAX_MESSAGES_PER_POLL,
    FirstToken,
    peer_abort,
    set_socket_options,
    tcp_address,
)
from radixlm.disaggregation.protocol import KVLayout, ProtocolError
from radixlm.disaggregation.transfer import KVRecvState

if TYPE_CHECKING:
    from radixlm.sched.scheduler import Scheduler

logger = logging.getLogger(__name__)
MAX_IDLE_PEERS = 64  # connections to prefill workers with no room in flight kept open
RECONNECT_IVL_MS, RECONNECT_IVL_MAX_MS = 100, 250  # a dead peer is noticed within 0.25 s


@dataclass
class Peer:
    """The connection to one prefill worker's bootstrap server, and what its monitor last said."""

    sock: object  # DEALER
    monitor: object  # PAIR receiving the DEALER's connection events
    down: Optional[str] = None  # why the connection is down (None: up, or connecting for the first time)
    down_at: float = 0.0

    def close(self) -> None:
        try:
            self.sock.disable_monitor()
        except Exception:  # noqa: BLE001 - closing anyway
            pass
        self.monitor.close(0)
        self.sock.close(0)


@dataclass
class Room:
    req: Req
    peer: str
    recv: KVRecvState
    deadline: float
    acked: int = 0
    t0: float = 0.0  # when the room was registered (monotonic)


class DecodeTransfers:
    is_prefill = False

    def __init__(self, timeout: float, layout: KVLayout, default_bootstrap_port: int, ctx=None):
        import zmq

        self.timeout = timeout
        self.layout = layout
        self.default_port = default_bootstrap_port
        self.ctx = ctx or zmq.Context.instance()
        self.peers: Dict[str, Peer] = {}  # tcp address -> its connection
        self.prealloc: List[Tuple[Req, float]] = []
        self.rooms: Dict[int, Room] = {}

    def close(self) -> None:
        for peer in self.peers.values():
            peer.close()

    # ------------------------------------------------------------------ scheduler hooks
    def has_work(self) -> bool:
        return bool(self.prealloc or self.rooms)

    def add(self, req: Req) -> None:
        self.prealloc.append((req, time.monotonic() + self.timeout))

    def drop(self, rid: str) -> List[Req]:
        """Takes the requests `rid` out of the reservation queue (an abort); they hold no KV."""
        gone = [r for r, _ in self.prealloc if r.rid == rid]
        self.prealloc = [(r, d) for r, d in self.prealloc if r.rid != rid]
        return gone

    def pending_reqs(self) -> List[Req]:
        return [r for r, _ in self.prealloc]

    def peer_of(self, req: Req) -> str:
        return tcp_address(req.bootstrap_host, req.bootstrap_port or self.default_port)

    def poll(self, sched: "Scheduler") -> List[ReqOutput]:
        import zmq

        self._watch_connections()  # before registering: a room fails only for what happens after it
        outputs = self._reserve(sched)
        if not sched.q.has_compute() and self.rooms:
            zmq.select([p.sock for p in self.peers.values()], [], [], IDLE_WAIT_S)  # nothing to compute: wait
        touched = set()
        for addr, peer in list(self.peers.items()):
            for _ in range(MAX_MESSAGES_PER_POLL):
                try:
                    frames = peer.sock.recv_multipart(zmq.NOBLOCK, copy=True)
                except zmq.Again:
                    break
                try:
                    outputs += self._handle(sched, addr, frames, touched)
                except (ProtocolError, ValueError, TypeError) as e:  # a bad peer never takes the worker down
                    logger.warning("PD decode dropped a message from %s: %s", addr, e)
        for room in touched:  # credit back to the senders: one cumulative ack per room per step
            rm = self.rooms.get(room)
            if rm is not None and rm.recv.received_bytes > rm.acked:
                self._send(rm.peer, protocol.control("ack", room, bytes=rm.recv.received_bytes))
                rm.acked = rm.recv.received_bytes
        now = time.monotonic()
        for room, rm in list(self.rooms.items()):
            peer = self.peers.get(rm.peer)
            if rm.req not in sched.q.transfer:  # aborted meanwhile: its KV is freed already
                self.rooms.pop(room)
                self._send(rm.peer, protocol.control("cancel", room, message="the decode request was aborted"))
            elif peer is not None and peer.down is not None and peer.down_at >= rm.t0:
                outputs.append(self._abort(sched, room, f"prefill peer {rm.peer} {peer.down} (bootstrap room "
                                                        f"{room})"))
            elif now > rm.deadline:
                self._send(rm.peer, protocol.control("cancel", room, message="timed out"))
                outputs.append(self._abort(sched, room, f"prefill peer {rm.peer} sent nothing for "
                                                        f"{self.timeout:g} s (bootstrap room {room}); is it alive?"))
        self._close_idle_peers()
        return outputs

    # ------------------------------------------------------------------ reservation
    def _reserve(self, sched) -> List[ReqOutput]:
        """Reserves KV for waiting requests in arrival order (a constrained one once its grammar is
        compiled: the first token must go through its matcher) and registers them."""
        outputs, now, waiting, full = [], time.monotonic(), [], False
        for req, deadline in self.prealloc:
            n = len(req.origin_input_ids)
            if req.grammar_future is not None:
                for _, message in sched.grammars.resolve([req]):
                    outputs.append(sched.out.finish(req, FinishReason("abort", message=message)))
            if req.finished:
                continue
            loc = None
            if req.grammar_future is None and not full:
                row = sched.req_to_token_pool.alloc()
                loc = sched.kv.alloc_with_evict([-1], [0], [n]) if row is not None else None
                if loc is None and row is not None:
                    sched.req_to_token_pool.free(row)
                full = loc is None  # later requests wait behind this one
            if loc is None:
                if now > deadline:
                    what = "its grammar to compile" if req.grammar_future is not None else \
                        f"KV memory for the prompt's {n} tokens"
                    outputs.append(sched.out.finish(req, peer_abort(
                        f"waited {self.timeout:g} s for {what} on this decode worker")))
                else:
                    waiting.append((req, deadline))
                continue
            sched.req_to_token_pool.write(row, 0, loc)
            req.kv.req_pool_idx, req.kv.kv_len, req.kv.cache_protected_len = row, n, 0
            req.kv.last_node = sched.tree_cache.root_node
            sched.q.transfer.append(req)
            room, peer = req.bootstrap_room, self.peer_of(req)
            self.rooms[room] = Room(req, peer, KVRecvState(room, loc.to("cpu"), self.layout), now + self.timeout,
                                    t0=now)
            if not self._send(peer, protocol.control("register", room, n_tokens=n, layout=self.layout.to_json())):
                outputs.append(self._abort(sched, room, f"prefill peer {peer} is not reachable (its queue is full)"))
        self.prealloc = waiting
        return outputs

    # ------------------------------------------------------------------ messages
    def _handle(self, sched, addr: str, frames, touched: set) -> List[ReqOutput]:
        kind, msg = protocol.parse(frames)
        rm = self.rooms.get(msg["room"])
        if rm is None or rm.peer != addr:
            return []  # a room that ended here (late chunk, stale message of a restarted peer)
        room = msg["room"]
        rm.deadline = time.monotonic() + self.timeout
        if kind == "chunk":
            try:
                rm.recv.write(sched.runner.token_to_kv_pool, msg["layer"], msg["start"], msg["n_tokens"],
                              msg["k"], msg["v"])
            except ProtocolError as e:
                self._send(addr, protocol.control("cancel", room, message=str(e)))
                return [self._abort(sched, room, f"bad KV from prefill peer {addr}: {e}")]
            touched.add(room)
            return []
        t = msg["t"]
        if t == "keepalive":
            return []
        if t == "error":
            return [self._abort(sched, room, f"prefill peer {addr} failed room {room}: {msg.get('message')}")]
        if t == "done":
            if not rm.recv.complete:
                err = f"done after {rm.recv.received_bytes} of {rm.recv.total_bytes} KV bytes"
                self._send(addr, protocol.control("cancel", room, message=err))
                return [self._abort(sched, room, f"prefill peer {addr}: {err}")]
            self._send(addr, protocol.control("done_ack", room))
            return [self._join(sched, room, msg)]
        raise ProtocolError(f"unknown control message {t!r}")

    def _join(self, sched, room: int, msg: Dict) -> ReqOutput:
        """The KV is in place: the first token becomes the request's first output; it decodes on."""
        rm = self.rooms.pop(room)
        req = rm.req
        logger.info("PD room %d: %d KV bytes received, joined %.3f s after registering", room,
                    rm.recv.received_bytes, time.monotonic() - rm.t0)
        sched.q.transfer.remove(req)
        cached = msg.get("cached_tokens")
        req.cached_tokens = cached if isinstance(cached, int) and 0 <= cached <= len(req.origin_input_ids) else 0
        tok = msg.get("first_token")
        if not isinstance(tok, int) or not 0 <= tok < sched.runner.model_config.vocab_size:
            sched.kv.free(req)
            return sched.out.finish(req, peer_abort(f"prefill peer sent an invalid first token {tok!r}"))
        out = sched.out.append_token(req, FirstToken(tok, msg.get("logprob"), msg.get("top_logprobs")), 0)
        if req.finished:
            sched.kv.cache_finished(req)
        elif req.pending_tokens:  # jump-forward appended forced tokens: they are extended first
            sched.park_for_extend(req)
        else:
            sched.kv.cache_unfinished(req)
            sched.q.running.append(req)
        return out

    def _abort(self, sched, room: int, message: str) -> ReqOutput:
        req = self.rooms.pop(room).req
        logger.warning("PD decode request %s aborted: %s", req.rid, message)
        sched.q.transfer.remove(req)
        sched.kv.free(req)
        sched.stats.num_failed_reqs += 1
        return sched.out.finish(req, peer_abort(message))

    # ------------------------------------------------------------------ sockets
    def _socket(self, addr: str):
        import zmq

        peer = self.peers.get(addr)
        if peer is None:
            sock = self.ctx.socket(zmq.DEALER)
            set_socket_options(sock)
            sock.setsockopt(zmq.RECONNECT_IVL, RECONNECT_IVL_MS)
            sock.setsockopt(zmq.RECONNECT_IVL_MAX, RECONNECT_IVL_MAX_MS)
            monitor = sock.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED
                                              | zmq.EVENT_CONNECT_RETRIED)
            sock.connect(addr)
            peer = self.peers[addr] = Peer(sock, monitor)
        return peer.sock

    def _watch_connections(self) -> None:
        """Reads each connection's monitor: a closed or refused connection marks the peer down (the
        rooms registered before that fail), a completed one up."""
        import zmq
        from zmq.utils.monitor import recv_monitor_message

        for peer in self.peers.values():
            for _ in range(MAX_MESSAGES_PER_POLL):
                try:
                    ev = recv_monitor_message(peer.monitor, zmq.NOBLOCK)["event"]
                except zmq.Again:
                    break
                if ev == zmq.EVENT_CONNECTED:
                    peer.down = None
                elif ev in (zmq.EVENT_DISCONNECTED, zmq.EVENT_CONNECT_RETRIED):
                    peer.down = "closed the connection" if ev == zmq.EVENT_DISCONNECTED else "refused the connection"
                    peer.down_at = time.monotonic()

    def _send(self, addr: str, frames) -> bool:
        import zmq

        try:
            self._socket(addr).send_multipart(frames, zmq.NOBLOCK)
            return True
        except zmq.Again:
            return False

    def _close_idle_peers(self) -> None:
        if len(self.peers) <= MAX_IDLE_PEERS:
            return
        busy = {rm.peer for rm in self.rooms.values()}
        for addr in [a for a in self.peers if a not in busy][:len(self.peers) - MAX_IDLE_PEERS]:
            self.peers.pop(addr).close()

