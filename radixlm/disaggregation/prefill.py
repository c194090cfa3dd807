"""Prefill side of PD disaggregation: the bootstrap server and the KV each request sends.

Owns the ROUTER socket bound on `--disaggregation-bootstrap-port` (in the scheduler process, read
by the scheduler loop between steps), the registrations decode workers sent for rooms, and the
transfers of prefilled requests. A request carrying `bootstrap_room` is prefilled as usual (radix
cache on: a shared prefix is computed once per prefill worker); when its first token is sampled its
KV stays locked (`cache_unfinished`) and the request waits in the scheduler's `transfer` queue until:

* a decode worker has registered the room, the KV has gone out in credit-bounded chunks, then `done`
  with the first token, and the decode worker answered `done_ack`: the request finishes normally
  (its KV goes to the radix cache, unlocked), its one token is the prefill response; or
* a deadline passes (no registration, no acknowledgement for `timeout` s), the decode worker's
  connection is gone, or it cancels: the request is aborted (503, naming the decode peer) and its
  KV is unlocked into the radix cache as a finished request's would be.

While a registered room's request is queued or computing, its decode worker gets a `keepalive`
every timeout/3 s, so a busy prefill worker is never mistaken for a dead one.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Dict, List, Optional

from radixlm.core import FinishReason, Req, ReqOutput
from radixlm.disaggregation import protocol
from radixlm.disaggregation.common import (
    IDLE_WAIT_S,
    MAX_MESSAGES_PER_POLL,
    peer_abort,
    set_socket_options,
    tcp_address,
)
from radixlm.disaggregation.protocol import KVLayout, ProtocolError
from radixlm.disaggregation.transfer import CHUNK_TARGET_BYTES, KVSendState, chunk_tokens_for, layout_mismatch

if TYPE_CHECKING:
    from radixlm.sched.scheduler import Scheduler

logger = logging.getLogger(__name__)
MAX_PENDING_REGISTRATIONS = 4096  # registrations for rooms whose request has not been prefilled yet
MAX_EXPIRED_ROOMS = 4096


@dataclass
class Registration:
    identity: bytes  # the decode worker's connection (its receive address)
    n_tokens: int
    layout: KVLayout
    at: float


@dataclass
class Transfer:
    req: Req
    out: ReqOutput  # the first token's output, sent when the transfer ends
    deadline: float
    reg: Optional[Registration] = None
    send: Optional[KVSendState] = None
    done_sent: bool = False
    t0: float = field(default_factory=time.monotonic)  # when the prefill finished
    cancelled: Optional[str] = None  # why the decode side gave up before the prefill finished


class PrefillBootstrap:
    is_prefill = True

    def __init__(self, host: str, port: int, timeout: float, max_inflight_bytes: int, layout: KVLayout,
                 page_size: int, ctx=None):
        import zmq

        self.timeout = timeout
        self.max_inflight_bytes = max_inflight_bytes
        self.layout = layout
        # chunks of at most half the window, so that two are in flight while the first is acknowledged
        self.chunk_tokens = chunk_tokens_for(layout, page_size, min(CHUNK_TARGET_BYTES, max_inflight_bytes // 2))
        self.ctx = ctx or zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.ROUTER)
        set_socket_options(self.sock)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a vanished decode worker is an error, not a drop
        self.address = tcp_address(host, port)
        try:
            self.sock.bind(self.address)
        except zmq.ZMQError as e:
            self.sock.close(0)
            raise RuntimeError(f"disaggregation_bootstrap_port: cannot bind the bootstrap server to {self.address}: "
                               f"{e} (another prefill worker on this port?)") from None
        self.regs: Dict[int, Registration] = OrderedDict()
        self.known: Dict[int, Req] = {}  # room -> its request, not yet prefilled
        self.transfers: Dict[int, Transfer] = {}
        self.expired: Dict[int, str] = OrderedDict()  # room -> why it ended (answers late registrations)
        self._last_keepalive = 0.0

    def close(self) -> None:
        self.sock.close(0)

    # ------------------------------------------------------------------ scheduler hooks
    def has_work(self) -> bool:
        return bool(self.transfers)

    def add(self, req: Req) -> None:
        self.known[req.bootstrap_room] = req

    def drop(self, rid: str) -> List[Req]:
        return []  # prefill-side requests live in the scheduler's queues

    def pending_reqs(self) -> List[Req]:
        return []

    def prefilled(self, sched: "Scheduler", req: Req, out: ReqOutput) -> None:
        """`req` computed its prompt and sampled its first token (`out`, held back): its KV stays locked
        for the transfer."""
        room = req.bootstrap_room
        self.known.pop(room, None)
        sched.kv.cache_unfinished(req)
        sched.q.transfer.append(req)
        tr = Transfer(req, out, time.monotonic() + self.timeout, self.regs.pop(room, None))
        if room in self.expired:  # its decode worker cancelled already: end it at the next poll
            tr.deadline, tr.cancelled = 0.0, self.expired[room]
        self.transfers[room] = tr

    def poll(self, sched: "Scheduler") -> List[ReqOutput]:
        import zmq

        if not sched.q.has_compute() and self.transfers:  # nothing to compute: wait a little for the peers
            self.sock.poll(int(IDLE_WAIT_S * 1000), zmq.POLLIN)
        outputs: List[ReqOutput] = []
        for _ in range(MAX_MESSAGES_PER_POLL):
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK, copy=True)
            except zmq.Again:
                break
            try:
                outputs += self._handle(sched, frames[0], frames[1:])
            except (ProtocolError, ValueError, TypeError) as e:  # a bad peer never takes the worker down
                logger.warning("bootstrap server dropped a message: %s", e)
        now = time.monotonic()
        for room, tr in list(self.transfers.items()):
            if tr.req not in sched.q.transfer:  # aborted meanwhile (client gone): it freed its KV already
                self._end(room, "the prefill request was aborted", tr.reg)
                continue
            outputs += self._advance(sched, room, tr, now)
        self._keepalives(now)
        self._prune(now)
        return outputs

    # ------------------------------------------------------------------ messages
    def _handle(self, sched, identity: bytes, frames: List[bytes]) -> List[ReqOutput]:
        kind, msg = protocol.parse(frames)
        if kind != "control":
            raise ProtocolError("a decode worker sent a KV chunk")
        room, t = msg["room"], msg["t"]
        tr = self.transfers.get(room)
        if t == "register":
            reg = Registration(identity, int(msg.get("n_tokens", -1)), KVLayout.from_json(msg.get("layout")),
                               time.monotonic())
            if room in self.expired:
                self._send(identity, protocol.control("error", room, message=self.expired[room]))
            elif tr is not None:
                if tr.reg is not None:
                    self._send(identity, protocol.control("error", room, message="room registered twice"))
                else:
                    tr.reg = reg
            else:
                self.regs[room] = reg
                while len(self.regs) > MAX_PENDING_REGISTRATIONS:
                    self.regs.pop(next(iter(self.regs)))
            return []
        reg = self.regs.get(room)
        if t == "cancel" and tr is None and reg is not None and reg.identity == identity:
            self.regs.pop(room)  # the decode side gave up before the prefill: don't wait for it
            self._end(room, f"the decode worker cancelled: {msg.get('message')}", None)
            return []
        if tr is None or tr.reg is None or tr.reg.identity != identity:
            return []  # about a room that ended here (late ack, cancel): nothing to do
        if t == "ack":
            if tr.send is None:
                raise ProtocolError(f"room {room}: ack before any KV was sent")
            tr.send.on_ack(int(msg.get("bytes", -1)))
            tr.deadline = time.monotonic() + self.timeout
            return []
        if t == "done_ack":
            return [self._finish(sched, room, tr, None)]
        if t == "cancel":
            return [self._finish(sched, room, tr, f"the decode worker cancelled: {msg.get('message')}")]
        raise ProtocolError(f"unknown control message {t!r}")

    def _advance(self, sched, room: int, tr: Transfer, now: float) -> List[ReqOutput]:
        """Sends what the credit allows; fails the transfer at its deadline or when the peer is gone."""
        import zmq

        if tr.reg is not None and tr.send is None:
            err = layout_mismatch(self.layout, tr.reg.layout)
            if err is None and tr.reg.n_tokens != len(tr.req.origin_input_ids):
                err = (f"the decode worker reserved {tr.reg.n_tokens} tokens for a prompt of "
                       f"{len(tr.req.origin_input_ids)} (same tokenizer and chat template?)")
            if err is not None:
                self._send(tr.reg.identity, protocol.control("error", room, message=err))
                return [self._finish(sched, room, tr, err)]
            slots = sched.kv.row(tr.req)[:tr.req.kv.kv_len].to("cpu")
            tr.send = KVSendState(room, slots, self.layout, self.chunk_tokens, self.max_inflight_bytes)
            tr.deadline = now + self.timeout
        try:
            while tr.send is not None and tr.send.can_send():
                if not self._send(tr.reg.identity, tr.send.chunk_frames(sched.runner.token_to_kv_pool)):
                    break
                tr.send.mark_sent()
            if tr.send is not None and tr.send.all_sent and not tr.done_sent:
                req = tr.req
                lp = req.output_logprobs[0] if req.return_logprob and req.output_logprobs else None
                top = req.output_top_logprobs[0] if req.return_logprob and req.output_top_logprobs else None
                if self._send(tr.reg.identity, protocol.control(
                        "done", room, first_token=req.output_ids[0], logprob=lp, top_logprobs=top,
                        cached_tokens=req.cached_tokens, total_bytes=tr.send.total_bytes)):
                    tr.done_sent = True
        except zmq.ZMQError as e:
            if e.errno != zmq.EHOSTUNREACH:
                raise
            return [self._finish(sched, room, tr, f"decode peer of room {room} disconnected")]
        if tr.cancelled is not None:
            return [self._finish(sched, room, tr, tr.cancelled)]
        if now > tr.deadline:
            what = ("no decode worker registered the room" if tr.reg is None
                    else "the decode worker stopped acknowledging the KV")
            return [self._finish(sched, room, tr, f"{what} within {self.timeout:g} s (room {room})")]
        return []

    def _send(self, identity: bytes, frames: List[bytes]) -> bool:
        """False when the connection's queue is full (try again later); raises when the peer is gone."""
        import zmq

        try:
            self.sock.send_multipart([identity, *frames], zmq.NOBLOCK, copy=False)
            return True
        except zmq.Again:
            return False

    def _finish(self, sched, room: int, tr: Transfer, error: Optional[str]) -> ReqOutput:
        """The transfer ended (error None: acknowledged by the decode worker). The request's KV goes to
        the radix cache like any finished request's; its held first-token output is sent."""
        req, out = tr.req, tr.out
        self.transfers.pop(room, None)
        sched.q.transfer.remove(req)
        sched.kv.cache_finished(req)
        logger.info("PD room %d: transfer ended %.3f s after the prefill (registered %s)", room,
                    time.monotonic() - tr.t0, "yes" if tr.reg else "no")
        if error is None:
            reason = out.finished_reason or FinishReason("length", length=len(req.output_ids))
        else:
            logger.warning("PD prefill room %s (request %s) failed: %s", room, req.rid, error)
            reason = peer_abort(f"KV transfer to the decode worker failed: {error}")
            sched.stats.num_failed_reqs += 1
        self._end(room, error or "the transfer is complete", None)
        req.finished_reason = out.finished_reason = reason
        return out

    def _end(self, room: int, why: str, reg: Optional[Registration]) -> None:
        self.transfers.pop(room, None)
        if reg is not None:
            try:
                self._send(reg.identity, protocol.control("error", room, message=why))
            except Exception:  # noqa: BLE001 - best effort: the peer may be gone
                pass
        self.expired[room] = why
        while len(self.expired) > MAX_EXPIRED_ROOMS:
            self.expired.pop(next(iter(self.expired)))

    # ------------------------------------------------------------------ keep-alives, expiry
    def _keepalives(self, now: float) -> None:
        if now - self._last_keepalive < self.timeout / 3:
            return
        self._last_keepalive = now
        for room, reg in list(self.regs.items()):
            req = self.known.get(room)
            if req is None:
                continue
            try:
                if req.finished:  # ended before its prefill (aborted, bad request): tell the decode worker
                    self.regs.pop(room)
                    self.known.pop(room)
                    self._end(room, f"the prefill request ended: {req.finished_reason.message or 'aborted'}",
                              reg)
                else:
                    self._send(reg.identity, protocol.control("keepalive", room))
            except Exception:  # noqa: BLE001 - the decode worker went away: its request times out there
                self.regs.pop(room, None)

    def _prune(self, now: float) -> None:
        for room in [r for r, reg in self.regs.items() if now - reg.at > self.timeout and r not in self.known]:
            del self.regs[room]  # the request never came here (the router failed to send it?)
        for room in [r for r, req in self.known.items() if req.finished and r not in self.regs]:
            del self.known[room]
