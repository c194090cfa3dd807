"""SchedulerThread: the scheduler run in-process on one background thread (the offline Engine's
counterpart of the scheduler process).

Owns the thread, its inbox (new requests, aborts, calls to run between steps) and one sink per
in-flight request. It steps the scheduler while there is work and hands each ReqOutput to its
request's sink, on this thread; a sink that raises (its caller is gone) has its request aborted.
A bad message or a failed step never stops the thread: the step's batch fails, not the engine.
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import Any, Callable, Dict, List, Union

from radixlm.core import Req, ReqOutput
from radixlm.sched.scheduler import Scheduler

logger = logging.getLogger(__name__)

Sink = Callable[[Union[ReqOutput, BaseException]], None]


class SchedulerThread:
    def __init__(self, scheduler: Scheduler):
        self.scheduler = scheduler
        self.inbox: "queue.Queue[tuple]" = queue.Queue()
        self.sinks: Dict[str, Sink] = {}
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="radixlm-scheduler", daemon=True)
        self.thread.start()

    def submit(self, reqs: List[Req], sink: Sink) -> None:
        """Schedules the requests; their outputs (or the ValueError that refused one) go to sink."""
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
