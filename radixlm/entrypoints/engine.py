"""Engine: the offline, in-process entry point.

    eng = radixlm.Engine(model_path="dir")
    eng.generate(prompt=["Hello"], sampling_params={"temperature": 0, "max_new_tokens": 32})

Owns the tokenizer, the scheduler (with its model runner) and one background thread that runs
the scheduler loop, so that several callers (threads, asyncio tasks, streams) share one
continuously batched engine. Input is validated here, before anything is scheduled: a bad request
raises ValueError naming the field and never disturbs requests already in flight.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Dict, Iterator, List, Optional, Union


from radixlm.core import Req, ReqOutput
from radixlm.managers.detokenizer import IncrementalDetokenizer
from radixlm.managers.io_struct import to_req
from radixlm.managers.request_builder import RequestBuilder
from radixlm.managers.tokenizer import get_tokenizer
from radixlm.managers.scheduler_process import create_scheduler, scheduler_state
from radixlm.sched.scheduler import Scheduler
from radixlm.server_args import ServerArgs

logger = logging.getLogger(__name__)

Sink = Callable[[Union[ReqOutput, BaseException]], None]


@dataclass
class _Pending:
    """Client-side state of one request: where its outputs go and how its text is built."""

    req: Req
    detok: Optional[IncrementalDetokenizer]
    created: float = field(default_factory=time.perf_counter)
    output_ids: List[int] = field(default_factory=list)
    text: str = ""
    logprobs: List[Any] = field(default_factory=list)
    top_logprobs: List[Any] = field(default_factory=list)
    input_logprobs: Optional[List[Any]] = None
    input_top_logprobs: Optional[List[Any]] = None
    last: Optional[ReqOutput] = None


class EngineLoop:
    """The scheduler's thread: takes new requests and aborts from an inbox, steps the scheduler
    while there is work, and hands each ReqOutput to the sink registered for its request."""

    def __init__(self, scheduler: Scheduler):
        self.scheduler = scheduler
        self.inbox: "queue.Queue[tuple]" = queue.Queue()
        self.sinks: Dict[str, Sink] = {}
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="radixlm-scheduler", daemon=True)
        self.thread.start()

    def submit(self, reqs: List[Req], sink: Sink) -> None:
        self.inbox.put(("add", reqs, sink))

    def abort(self, rid: str) -> None:
        self.inbox.put(("abort", rid, None))

    def call(self, fn: Callable[[Scheduler], Any]) -> Any:
        """Runs fn(scheduler) on the scheduler thread between steps and returns its result."""
        done: "queue.Queue" = queue.Queue()
        self.inbox.put(("call", fn, done.put))
        result = done.get()
        if isinstance(result, BaseException):
            raise result
        return result

    def stop(self) -> None:
        self._stop.set()
        self.inbox.put(("stop", None, None))
        self.thread.join(timeout=30)

    def _handle(self, msg: tuple) -> None:
        kind, payload, sink = msg
        if kind == "add":
            for req in payload:
                try:
                    self.scheduler.add_request(req)
                    self.sinks[req.rid] = sink
                except ValueError as e:
                    sink(e)
        elif kind == "abort":
            for out in self.scheduler.abort_request(payload):
                self._deliver(out)
        elif kind == "call":
            try:
                sink(payload(self.scheduler))
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                sink(e)

    def _deliver(self, out: ReqOutput) -> None:
        sink = self.sinks.get(out.rid)
        if out.finished_reason is not None:
            self.sinks.pop(out.rid, None)
        if sink is None:
            return
        try:
            sink(out)
        except Exception:  # noqa: BLE001 - the caller is gone (e.g. its event loop closed): free its request
            self.sinks.pop(out.rid, None)
            if out.finished_reason is None:
                for other in self.scheduler.abort_request(out.rid):  # a step in flight completes first
                    self._deliver(other)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                block = not self.scheduler.has_work()
                while True:
                    msg = self.inbox.get(block=block)
                    if msg[0] == "stop":
                        return
                    try:
                        self._handle(msg)
                    except Exception:  # noqa: BLE001 - one bad message must not stop the engine
                        logger.exception("engine loop failed to handle %s", msg[0])
                    block = False
            except queue.Empty:
                pass
            if not self.scheduler.has_work():
                continue
            try:
                for out in self.scheduler.step():
                    self._deliver(out)
            except Exception as e:  # noqa: BLE001 - last resort: step() fails only its own batch
                logger.exception("scheduler step failed outside a batch")
                for out in self.scheduler.recover(f"internal error in the scheduler: {type(e).__name__}: {e}"):
                    self._deliver(out)


class Engine:
    def __init__(self, model_path: Optional[str] = None, **kwargs):
        self.server_args = ServerArgs(model_path=model_path, **kwargs)
        args = self.server_args
        logging.getLogger("radixlm").setLevel(args.log_level.upper())
        self.tokenizer = None if args.skip_tokenizer_init else get_tokenizer(args.resolved_tokenizer_path,
                                                                             args.trust_remote_code)
        self.scheduler = create_scheduler(args, self.tokenizer)
        self.model_config = self.scheduler.runner.model_config
        self.builder = RequestBuilder.from_server_args(args, self.tokenizer, self.model_config.vocab_size,
                                                       self.model_config.context_len)
        self.loop = EngineLoop(self.scheduler)
        logger.info("Engine ready: %s, %d KV tokens, device %s, attention %s", self.model_config.architecture,
                    self.scheduler.max_total_num_tokens, args.resolved_device, args.attention_backend)

    # ------------------------------------------------------------------ request building
    def _prepare(self, prompt, sampling_params, input_ids, return_logprob, top_logprobs_num, rid,
                 logprob_start_len=-1):
        msgs, batched = self.builder.build(text=prompt, input_ids=input_ids, sampling_params=sampling_params,
                                           rid=rid, return_logprob=return_logprob,
                                           top_logprobs_num=top_logprobs_num, logprob_start_len=logprob_start_len)
        return [to_req(m) for m in msgs], batched

    def _pending(self, req: Req) -> _Pending:
        detok = IncrementalDetokenizer(self.tokenizer, req.sampling_params) if self.tokenizer is not None else None
        return _Pending(req, detok)

    def _absorb(self, p: _Pending, out: ReqOutput) -> str:
        """Folds one ReqOutput into the request's client state; returns the new text."""
        p.output_ids.extend(out.new_token_ids)
        p.last = out
        if out.input_token_logprobs is not None:
            p.input_logprobs, p.input_top_logprobs = out.input_token_logprobs, out.input_top_logprobs
        if out.new_logprobs:
            p.logprobs.extend(zip(out.new_logprobs, out.new_token_ids))
            p.top_logprobs.extend(out.new_top_logprobs or [])
        delta = p.detok.add(out.new_token_ids, out.finished_reason) if p.detok is not None else ""
        p.text += delta
        return delta

    def _result(self, p: _Pending, text: Optional[str] = None) -> Dict[str, Any]:
        out = p.last
        meta: Dict[str, Any] = {
            "id": p.req.rid,
            "prompt_tokens": len(p.req.origin_input_ids),
            "completion_tokens": len(p.output_ids),
            "cached_tokens": out.cached_tokens if out else 0,
            "finish_reason": out.finished_reason.to_json() if out and out.finished_reason else None,
            "e2e_latency": time.perf_counter() - p.created,
        }
        if out is not None and out.num_retractions:
            meta["num_retractions"] = out.num_retractions
        if p.req.return_logprob:
            meta["output_token_logprobs"] = [(lp, tid, None) for lp, tid in p.logprobs]
            meta["output_top_logprobs"] = [[(v, t, None) for v, t in tops] for tops in p.top_logprobs]
            meta["input_token_logprobs"] = [(lp, tid, None) for lp, tid in p.input_logprobs or []]
            if p.req.top_logprobs_num > 0:
                meta["input_top_logprobs"] = [None if tops is None else [(v, t, None) for v, t in tops]
                                              for tops in p.input_top_logprobs or []]
        return {"text": p.text if text is None else text, "output_ids": list(p.output_ids), "meta_info": meta}

    # ------------------------------------------------------------------ public API
    def generate(self, prompt=None, sampling_params=None, input_ids=None, return_logprob: bool = False,
                 top_logprobs_num: int = 0, stream: bool = False, rid=None, logprob_start_len: int = -1):
        """Generates for one prompt (returns a dict) or a batch (a list, n outputs per prompt).

        With stream=True returns an iterator of increments: dicts whose "text" and "output_ids"
        hold only what is new, with "index" saying which output they belong to."""
        call = self._start(prompt, sampling_params, input_ids, return_logprob, top_logprobs_num, rid,
                           logprob_start_len)
        q: "queue.Queue" = queue.Queue()
        self.loop.submit(call.reqs, q.put)
        if stream:
            return self._stream(call, q.get)
        while call.left:
            call.feed(q.get())
        return call.results()

    def _stream(self, call: "_Call", get) -> Iterator[Dict[str, Any]]:
        try:
            while call.left:
                yield call.feed(get())
        finally:
            call.abort_rest()

    async def async_generate(self, prompt=None, sampling_params=None, input_ids=None,
                             return_logprob: bool = False, top_logprobs_num: int = 0, stream: bool = False,
                             rid=None, logprob_start_len: int = -1):
        """asyncio variant of generate: awaitable result, or an async iterator with stream=True."""
        call = self._start(prompt, sampling_params, input_ids, return_logprob, top_logprobs_num, rid,
                           logprob_start_len)
        aloop = asyncio.get_running_loop()
        aq: "asyncio.Queue" = asyncio.Queue()
        self.loop.submit(call.reqs, lambda item: aloop.call_soon_threadsafe(aq.put_nowait, item))
        if stream:
            return self._astream(call, aq)
        try:
            while call.left:
                call.feed(await aq.get())
        finally:  # cancelled (timeout, client gone): free what the requests hold
            call.abort_rest()
        return call.results()

    async def _astream(self, call: "_Call", aq: "asyncio.Queue") -> AsyncIterator[Dict[str, Any]]:
        try:
            while call.left:
                yield call.feed(await aq.get())
        finally:
            call.abort_rest()

    def _start(self, prompt, sampling_params, input_ids, return_logprob, top_logprobs_num, rid,
               logprob_start_len) -> "_Call":
        reqs, batched = self._prepare(prompt, sampling_params, input_ids, return_logprob, top_logprobs_num, rid,
                                      logprob_start_len)
        return _Call(self, reqs, batched)

    def abort_request(self, rid: str) -> None:
        self.loop.abort(rid)

    def flush_cache(self) -> bool:
        return self.loop.call(lambda s: s.flush_cache())

    def get_server_info(self) -> Dict[str, Any]:
        return self.loop.call(scheduler_state)

    def check_integrity(self) -> None:
        self.loop.call(lambda s: s.check_integrity())

    def shutdown(self) -> None:
        if self.loop.thread.is_alive():
            self.loop.stop()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


class _Call:
    """One generate call's requests on the client side: folds outputs in, knows when it is done,
    and frees what is left when the caller stops early or a request fails."""

    def __init__(self, engine: Engine, reqs: List[Req], batched: bool):
        self.engine, self.reqs, self.batched = engine, reqs, batched
        self.pend = {r.rid: engine._pending(r) for r in reqs}
        self.index = {r.rid: i for i, r in enumerate(reqs)}
        self.left = len(reqs)

    def feed(self, item) -> Dict[str, Any]:
        """Absorbs one output; returns the increment (text delta, new ids, index)."""
        if isinstance(item, BaseException):  # fail the whole call; free the rest
            self.abort_rest()
            raise item
        p = self.pend[item.rid]
        delta = self.engine._absorb(p, item)
        self.left -= item.finished_reason is not None
        chunk = self.engine._result(p, text=delta)
        chunk["output_ids"] = list(item.new_token_ids)
        chunk["index"] = self.index[item.rid]
        return chunk

    def abort_rest(self) -> None:
        if self.left:
            for r in self.reqs:
                self.engine.loop.abort(r.rid)

    def results(self):
        out = [self.engine._result(self.pend[r.rid]) for r in self.reqs]
        return out if self.batched or len(out) > 1 else out[0]
