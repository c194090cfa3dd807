"""TokenizerManager: the server's side of the runtime, in the main (asyncio) process.

Owns the tokenizer, request validation (RequestBuilder), the ZeroMQ sockets to the scheduler
process and from the detokenizer process, and one `ReqState` (req_state.py, shared with the offline
Engine) per in-flight request. HTTP handlers `build`, `submit`, then `wait_all` or iterate `stream`;
the receive loop folds each `BatchStrOut` item into its request's state.
It also starts and watches the two child processes: when the scheduler dies, or the receive loop
itself stops, every waiting client gets an error (503) and the server shuts down instead of hanging.
A message that fails to decode, or one of an unexpected type, is logged and dropped, never fatal.
Every wait on another process has a deadline: start-up (`launch`), control replies
(`CONTROL_TIMEOUT_S`, matched by req_id), sends (`SEND_TIMEOUT_S`); a generation waits as long as
the runtime is alive (the watchdog fails it when not). `unhealthy_reason()` is the cheap liveness
check behind /health.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing as mp
import os
import shutil
import signal
import tempfile
import time
from typing import Any, AsyncIterator, Callable, Dict, List, Optional

from radixlm.managers.io_struct import (
    AbortReq,
    BatchStrOut,
    FlushCacheReq,
    FlushCacheReqOutput,
    GetInternalStateReq,
    GetInternalStateReqOutput,
    LoRAAdapterReqOutput,
    SchedulerReady,
    TokenizedGenerateReqInput,
    decode_or_drop,
    encode,
)
from radixlm.managers.req_state import ReqState
from radixlm.managers.request_builder import RequestBuilder
from radixlm.managers.scheduler_process import IPCNames
from radixlm.managers.sglang_fields import check_generate_fields
from radixlm.server_args import ServerArgs

logger = logging.getLogger(__name__)

CONTROL_TIMEOUT_S = 30.0  # a control request (flush, state) not answered by then: 503
SEND_TIMEOUT_S = 10.0  # a message the scheduler's socket does not take by then: 503
EXIT_DELAY_S = 1.0  # after a fatal runtime failure: time to answer the pending 503s, then exit


class ServiceUnavailable(RuntimeError):
    """The runtime cannot take requests (scheduler gone, shutting down, queue full): HTTP 503.
    `retry_after` (seconds) is set when the condition is transient (load shedding): the HTTP layer
    sends it as Retry-After, so a client or router backs off instead of hammering."""

    def __init__(self, message: str, retry_after: Optional[int] = None):
        super().__init__(message)
        self.retry_after = retry_after


SHED_RETRY_AFTER_S = 1  # Retry-After of a load-shedding 503: the queue drains within a few decode steps


class TokenizerManager:
    def __init__(self, args: ServerArgs):
        from radixlm.managers.tokenizer import get_tokenizer
        from radixlm.models.model_config import ModelConfig

        self.startup_marks: Dict[str, float] = {"main.imported": time.time()}  # see startup_timeline
        self.args = args
        self.model_config = ModelConfig.from_path(args.model_path, args.dtype, args.context_length)
        self.tokenizer = None if args.skip_tokenizer_init else get_tokenizer(args.resolved_tokenizer_path,
                                                                             args.trust_remote_code,
                                                                             args.chat_template)
        self.startup_marks["main.tokenizer"] = time.time()
        self.builder = RequestBuilder.from_server_args(args, self.tokenizer, self.model_config.vocab_size,
                                                       self.model_config.context_len)
        self.served_model_name = args.served_model_name or args.model_path
        from radixlm.lora.server import LoRARegistry

        self.lora = LoRARegistry(args)  # adapter names lora_path may pick (radixlm/lora/server.py)
        if self.lora.enabled:
            self.builder.lora_names = self.lora.names
        self.states: Dict[str, ReqState] = {}
        self.control_waiters: Dict[int, asyncio.Future] = {}  # req_id -> reply
        self._control_ids = itertools.count(1)
        self.dead_reason: Optional[str] = None
        self._tasks: List[asyncio.Task] = []
        self.on_fatal: Callable[[], None] = lambda: os.kill(os.getpid(), signal.SIGTERM)  # the server exits
        self.num_dropped_messages = 0
        self.server_info: Dict[str, Any] = {}
        self.procs: List[mp.Process] = []
        self._ipc_dir = tempfile.mkdtemp(prefix="radixlm-ipc-")
        self.ipc = IPCNames(*(f"ipc://{self._ipc_dir}/{n}" for n in ("scheduler", "detokenizer", "tokenizer")))
        self.num_requests_total = 0

    # ------------------------------------------------------------------ processes
    def launch(self, timeout: float = 600.0, start_method: str = "spawn") -> None:
        """Starts the detokenizer and scheduler processes and waits until the model is loaded."""
        self.start(start_method)
        self.wait_ready(timeout)

    def start(self, start_method: str = "spawn") -> None:
        """Starts the child processes; `wait_ready` waits for the scheduler (the server builds its
        app in between). start_method "fork" (the server, on CPU: `fork_is_safe`) starts them with
        this process's imports (torch, transformers) already done: on a small model those imports
        are most of the start-up, and with "spawn" each child repeats them. CUDA does not survive
        a fork."""
        import zmq

        from radixlm.managers.detokenizer_manager import run_detokenizer_process
        from radixlm.managers.scheduler_process import run_scheduler_process
        from radixlm.managers.tp_launch import prepare_tp_args, start_tp_followers

        args = prepare_tp_args(self.args)  # tp_size > 1: the model must split; a rendezvous address
        ctx = mp.get_context(start_method)
        pid = os.getpid()
        self.detok_proc = ctx.Process(target=run_detokenizer_process, args=(self.args, self.ipc, pid),
                                      name="radixlm-detokenizer", daemon=True)
        self.sched_proc = ctx.Process(target=run_scheduler_process, args=(args, self.ipc, pid),
                                      name="radixlm-scheduler", daemon=True)
        self.sched_proc.start()
        self.detok_proc.start()
        self.startup_marks["children.started"] = time.time()
        # ZeroMQ after the children (a forked child must not inherit a context); their messages
        # wait in their sockets until this one binds
        self._zctx = zmq.Context()
        self._start_recv = self._zctx.socket(zmq.PULL)
        self._start_recv.bind(self.ipc.tokenizer_input)
        # every process is watched: a dead tensor-parallel rank is a dead runtime (503, exit)
        self.procs = [self.sched_proc, self.detok_proc, *start_tp_followers(args, pid)]

    def wait_ready(self, timeout: float = 600.0) -> None:
        """Waits until the scheduler has loaded the model; raises (children stopped) when it fails,
        a process dies, or `timeout` s pass."""
        import zmq

        from radixlm.managers.tp_launch import first_dead

        recv = self._start_recv
        poller = zmq.Poller()
        poller.register(recv, zmq.POLLIN)
        deadline = time.time() + timeout
        ready: Optional[SchedulerReady] = None
        while ready is None:
            if time.time() > deadline:
                self.shutdown()
                raise RuntimeError("the scheduler did not become ready in time")
            if not self.sched_proc.is_alive() and not poller.poll(0):  # (its last word may be waiting)
                self.shutdown()
                raise RuntimeError(f"the scheduler process exited during start-up (code {self.sched_proc.exitcode})")
            dead = first_dead(self.procs)
            if dead is not None:
                self.shutdown()
                raise RuntimeError(f"{dead} during start-up")
            if poller.poll(200):
                msg = decode_or_drop(recv.recv(), "tokenizer manager (start-up)", logger)
                if isinstance(msg, SchedulerReady):
                    ready = msg
        if not ready.ok:
            self.shutdown()
            raise RuntimeError(f"the scheduler failed to start: {ready.error}")
        self.server_info = ready.info
        self.startup_marks.update(ready.info.get("startup", {}), **{"scheduler.ready": time.time()})
        recv.close(linger=0)

    def fork_is_safe(self) -> bool:
        """Whether `launch` may fork: on the CPU, from a process that has started no other thread
        (the server's main process before uvicorn), and not initialised CUDA."""
        import sys
        import threading

        torch = sys.modules.get("torch")
        cuda_used = torch is not None and torch.cuda.is_initialized()
        return self.args.resolved_device == "cpu" and threading.active_count() == 1 and not cuda_used \
            and "fork" in mp.get_all_start_methods()

    def connect(self) -> None:
        """Opens the asyncio sockets; call from inside the server's event loop."""
        import zmq
        import zmq.asyncio

        self._actx = zmq.asyncio.Context()
        self.recv_sock = self._actx.socket(zmq.PULL)
        self.recv_sock.bind(self.ipc.tokenizer_input)
        self.send_sock = self._actx.socket(zmq.PUSH)
        self.send_sock.connect(self.ipc.scheduler_input)
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._recv_loop()), loop.create_task(self._watch_children())]

    def shutdown(self) -> None:
        shutil.rmtree(self._ipc_dir, ignore_errors=True)
        for p in self.procs:
            if p.is_alive():
                p.terminate()
        for p in self.procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
        self.procs = []

    async def _watch_children(self) -> None:
        while self.dead_reason is None:
            await asyncio.sleep(0.5)
            reason = self._failure()
            if reason is not None:
                self._on_dead(reason)

    def _failure(self) -> Optional[str]:
        for p in self.procs:
            if not p.is_alive():
                return f"{p.name} exited with code {p.exitcode}"
        if self._tasks and self._tasks[0].done():
            return "the tokenizer manager's receive loop stopped"
        return None

    def unhealthy_reason(self) -> Optional[str]:
        """None when the runtime can serve: child processes alive and the receive loop running.
        Cheap (no message to the scheduler): this is /health."""
        if self.dead_reason is not None:
            return self.dead_reason
        if not self._tasks:
            return "the tokenizer manager is not connected yet"
        return self._failure()

    def _on_dead(self, reason: str) -> None:
        if self.dead_reason is not None:
            return
        logger.error("runtime failure: %s; failing in-flight requests and shutting down", reason)
        self.dead_reason = reason
        for st in self.states.values():
            st.fail(ServiceUnavailable(f"the runtime is unavailable: {reason}"))
        for fut in self.control_waiters.values():
            if not fut.done():
                fut.set_exception(ServiceUnavailable(f"the runtime is unavailable: {reason}"))
        asyncio.get_running_loop().call_later(EXIT_DELAY_S, self.on_fatal)  # answer the pending 503s, then exit

    # ------------------------------------------------------------------ receive
    async def _recv_loop(self) -> None:
        """Fills request states from the detokenizer's outputs and answers control waiters. A bad
        message is logged and dropped; if the loop itself fails, the runtime is declared dead."""
        try:
            while True:
                data = await self.recv_sock.recv()
                msg = decode_or_drop(data, "tokenizer manager", logger)
                if msg is None:
                    self.num_dropped_messages += 1
                    continue
                try:
                    self._dispatch(msg)
                except Exception:  # noqa: BLE001 - a malformed message must not stop the loop
                    self.num_dropped_messages += 1
                    logger.exception("tokenizer manager dropped a %s: handling it failed", type(msg).__name__)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - without this loop every request would hang
            self._on_dead(f"the tokenizer manager's receive loop failed: {type(e).__name__}: {e}")

    def _dispatch(self, msg) -> None:
        if isinstance(msg, BatchStrOut):
            for item in msg.items:
                st = self.states.get(item.rid)
                if st is not None:
                    st.absorb(item)
        elif isinstance(msg, (FlushCacheReqOutput, GetInternalStateReqOutput, LoRAAdapterReqOutput)):
            fut = self.control_waiters.pop(msg.req_id, None)
            if fut is None:
                logger.warning("tokenizer manager dropped a late %s (req_id %s)", type(msg).__name__, msg.req_id)
            elif not fut.done():
                fut.set_result(msg)
        else:
            self.num_dropped_messages += 1
            logger.error("tokenizer manager dropped an unexpected message %s", type(msg).__name__)

    async def _control(self, req, timeout: float = CONTROL_TIMEOUT_S):
        self._check_alive()
        req.req_id = next(self._control_ids)
        fut = asyncio.get_running_loop().create_future()
        self.control_waiters[req.req_id] = fut
        try:
            await self._send(req)
            return await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            raise ServiceUnavailable(f"the scheduler did not answer {type(req).__name__} within {timeout:g} s") \
                from None
        finally:
            self.control_waiters.pop(req.req_id, None)

    async def _send(self, msg) -> None:
        """Sends to the scheduler, with a deadline (the socket blocks when the scheduler stops reading)."""
        try:
            await asyncio.wait_for(self.send_sock.send(encode(msg)), SEND_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise ServiceUnavailable(f"the scheduler did not take a message within {SEND_TIMEOUT_S:g} s") from None

    def _check_alive(self) -> None:
        if self.dead_reason is not None:
            raise ServiceUnavailable(f"the runtime is unavailable: {self.dead_reason}")

    # ------------------------------------------------------------------ API
    async def flush_cache(self) -> FlushCacheReqOutput:
        return await self._control(FlushCacheReq())

    async def get_internal_state(self) -> Dict[str, Any]:
        return (await self._control(GetInternalStateReq())).state

    async def abort(self, rid: str = "", abort_all: bool = False) -> None:
        if self.dead_reason is None:
            await self._send(AbortReq(rid, abort_all))

    def build(self, obj: Dict[str, Any]) -> tuple:
        """Validates a native GenerateReqInput dict (every SGLang field is known: see
        managers/sglang_fields.py); returns (messages, batched)."""
        if not isinstance(obj, dict):
            raise ValueError("the request body must be a JSON object (SGLang's GenerateReqInput)")
        check_generate_fields(obj)
        return self.builder.build(text=obj.get("text"), input_ids=obj.get("input_ids"),
                                  sampling_params=obj.get("sampling_params"), rid=obj.get("rid"),
                                  return_logprob=bool(obj.get("return_logprob", False)),
                                  top_logprobs_num=obj.get("top_logprobs_num") or 0,
                                  logprob_start_len=obj.get("logprob_start_len", -1)
                                  if obj.get("logprob_start_len") is not None else -1,
                                  stream=bool(obj.get("stream", False)), extra_key=obj.get("extra_key"),
                                  cache_salt=obj.get("cache_salt"), priority=obj.get("priority"),
                                  bootstrap_host=obj.get("bootstrap_host"), bootstrap_port=obj.get("bootstrap_port"),
                                  bootstrap_room=obj.get("bootstrap_room"),
                                  lora_path=obj.get("lora_path"))

    async def submit(self, msgs: List[TokenizedGenerateReqInput]) -> List[ReqState]:
        self._check_alive()
        limit = self.args.max_queued_requests
        if limit is not None:
            cap = self.args.resolved_max_running_requests + limit
            if len(self.states) + len(msgs) > cap:
                raise ServiceUnavailable(f"The server is overloaded: more than {cap} requests in flight "
                                         f"(--max-queued-requests {limit}). Retry later.",
                                         retry_after=SHED_RETRY_AFTER_S)
        for m in msgs:
            if m.rid in self.states:
                raise ValueError(f"rid: a request with id {m.rid!r} is already running")
        states = [ReqState(m) for m in msgs]
        for st in states:
            self.states[st.msg.rid] = st
        self.num_requests_total += len(msgs)
        for m in msgs:
            await self._send(m)
        return states

    async def wait_all(self, states: List[ReqState]) -> None:
        try:
            for st in states:
                while not st.finished:
                    st.event.clear()
                    if st.finished:
                        break
                    await st.event.wait()
                if st.error is not None:
                    raise st.error
        finally:
            await self.release(states)

    async def stream(self, states: List[ReqState]) -> AsyncIterator[tuple]:
        """Yields (index, state) each time a request has new output, until all finish."""
        pending = dict(enumerate(states))
        sent = {i: 0 for i in pending}  # tokens already reported, for --stream-interval
        # a request's own sampling_params.stream_interval overrides the server's
        intervals = {i: st.msg.sampling_params.stream_interval or self.args.stream_interval
                     for i, st in pending.items()}
        try:
            while pending:
                progressed = False
                for i, st in list(pending.items()):
                    if st.error is not None:
                        raise st.error
                    if st.event.is_set():
                        st.event.clear()
                        progressed = True
                        # decided before the yield: a finish that arrives while the consumer holds
                        # this item sets the event again and is yielded next time, not dropped
                        done = st.finished
                        if done or len(st.output_ids) - sent[i] >= intervals[i]:
                            sent[i] = len(st.output_ids)
                            yield i, st
                        if done:
                            del pending[i]
                if not progressed:
                    waits = [asyncio.ensure_future(st.event.wait()) for st in pending.values()]
                    try:
                        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        for w in waits:
                            w.cancel()
        finally:
            await self.release(states)

    async def release(self, states: List[ReqState]) -> None:
        """Forgets the requests; aborts the ones that are still running (client went away)."""
        for st in states:
            self.states.pop(st.msg.rid, None)
            if not st.finished:
                await self.abort(st.msg.rid)

    def decode_one(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id]) if self.tokenizer is not None else ""
