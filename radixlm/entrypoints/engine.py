"""Engine: the offline, in-process entry point.

    eng = radixlm.Engine(model_path="dir")
    eng.generate(prompt=["Hello"], sampling_params={"temperature": 0, "max_new_tokens": 32})

Owns the tokenizer, the request builder and the scheduler, which runs on one background thread
(`eng.loop`, a SchedulerThread) so that several callers (threads, asyncio tasks, streams) share one
continuously batched engine. Requests take the server's path without its processes: RequestBuilder
-> TokenizedGenerateReqInput -> `to_req` -> scheduler -> DetokenizerManager -> ReqState -> result
dict. Input is validated before anything is scheduled: a bad request raises ValueError naming the
field and never disturbs requests already in flight.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
from typing import Any, AsyncIterator, Callable, Dict, Iterator, List, Optional

from radixlm.managers.detokenizer_manager import DetokenizerManager
from radixlm.managers.io_struct import TokenizedGenerateReqInput, detok_params_of, to_req
from radixlm.managers.req_state import ReqState
from radixlm.managers.request_builder import RequestBuilder
from radixlm.managers.scheduler_process import create_scheduler, scheduler_state
from radixlm.managers.scheduler_thread import SchedulerThread
from radixlm.managers.tokenizer import get_tokenizer
from radixlm.managers.tp_launch import first_dead, prepare_tp_args, start_tp_followers, stop_processes
from radixlm.server_args import ServerArgs

logger = logging.getLogger(__name__)


class Engine:
    def __init__(self, model_path=None, **kwargs):
        from radixlm.models.hub import prepare_args

        self.server_args = args = prepare_tp_args(prepare_args(ServerArgs(model_path=model_path, **kwargs)))
        if args.dp_size > 1:
            raise ValueError("dp_size: the offline Engine is one replica; data parallelism is "
                             "`python -m radixlm.launch_server --dp-size N` (replicas behind sglang-router)")
        logging.getLogger("radixlm").setLevel(args.log_level.upper())
        self.tokenizer = None if args.skip_tokenizer_init else get_tokenizer(args.resolved_tokenizer_path,
                                                                             args.trust_remote_code,
                                                                             args.chat_template)
        # tp_size > 1: this process is rank 0, the other ranks are child processes (radixlm/managers/tp_launch.py)
        self._tp_procs = start_tp_followers(args, os.getpid()) if args.tp_size > 1 else []
        try:
            self.scheduler = create_scheduler(args, self.tokenizer, peers_alive=lambda: first_dead(self._tp_procs))
        except BaseException:
            stop_processes(self._tp_procs, timeout=0)
            raise
        self.model_config = self.scheduler.runner.model_config
        self.builder = RequestBuilder.from_server_args(args, self.tokenizer, self.model_config.vocab_size,
                                                       self.model_config.context_len)
        lora = self.scheduler.runner.lora_manager
        if lora is not None:
            self.builder.lora_names = lora.names
        self.loop = SchedulerThread(self.scheduler)
        logger.info("Engine ready: %s, %d KV tokens, device %s, attention %s", self.model_config.architecture,
                    self.scheduler.max_total_num_tokens, args.resolved_device, args.attention_backend)

    def generate(self, prompt=None, sampling_params=None, input_ids=None, return_logprob: bool = False,
                 top_logprobs_num: int = 0, stream: bool = False, rid=None, logprob_start_len: int = -1,
                 extra_key=None, cache_salt=None, priority: Optional[int] = None, lora_path=None):
        """Generates for one prompt (returns a dict) or a batch (a list, n outputs per prompt).

        With stream=True returns an iterator of increments: dicts whose "text" and "output_ids"
        hold only what is new, with "index" saying which output they belong to. `extra_key` /
        `cache_salt` give prompts a radix-cache namespace of their own; `priority` orders the queue
        (with enable_priority_scheduling); `lora_path` picks a LoRA adapter by name (one per prompt in a
        list; None: the base model)."""
        call = self._start(text=prompt, sampling_params=sampling_params, input_ids=input_ids,
                           return_logprob=return_logprob, top_logprobs_num=top_logprobs_num, rid=rid,
                           logprob_start_len=logprob_start_len, extra_key=extra_key, cache_salt=cache_salt,
                           priority=priority, lora_path=lora_path)
        q: "queue.Queue" = queue.Queue()
        self.loop.submit(call.reqs, q.put)
        if stream:
            return _stream(call, q.get)
        while call.left:
            call.feed(q.get())
        return call.results()

    async def async_generate(self, prompt=None, sampling_params=None, input_ids=None,
                             return_logprob: bool = False, top_logprobs_num: int = 0, stream: bool = False,
                             rid=None, logprob_start_len: int = -1, extra_key=None, cache_salt=None,
                             priority: Optional[int] = None, lora_path=None):
        """asyncio variant of generate: awaitable result, or an async iterator with stream=True."""
        call = self._start(text=prompt, sampling_params=sampling_params, input_ids=input_ids,
                           return_logprob=return_logprob, top_logprobs_num=top_logprobs_num, rid=rid,
                           logprob_start_len=logprob_start_len, extra_key=extra_key, cache_salt=cache_salt,
                           priority=priority, lora_path=lora_path)
        aloop = asyncio.get_running_loop()
        aq: "asyncio.Queue" = asyncio.Queue()
        self.loop.submit(call.reqs, lambda item: aloop.call_soon_threadsafe(aq.put_nowait, item))
        if stream:
            return _astream(call, aq)
        try:
            while call.left:
                call.feed(await aq.get())
        finally:  # cancelled (timeout, client gone): free what the requests hold
            call.abort_rest()
        return call.results()

    def _start(self, **fields) -> "_Call":
        msgs, batched = self.builder.build(**fields)
        return _Call(msgs, batched, DetokenizerManager(self.tokenizer), self.loop.abort)

    def load_lora_adapter(self, lora_name: str, lora_path: str) -> List[str]:
        """Loads a PEFT adapter at run time; returns the loaded names (LoRAError: a ValueError)."""
        from radixlm.lora.server import load_adapter_in_scheduler

        return self.loop.call(lambda s: load_adapter_in_scheduler(s, lora_name, lora_path))

    def unload_lora_adapter(self, lora_name: str) -> List[str]:
        """Unloads an adapter; refused (ValueError) while requests use it. Returns the loaded names."""
        from radixlm.lora.server import unload_adapter_in_scheduler

        return self.loop.call(lambda s: unload_adapter_in_scheduler(s, lora_name))

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
        if self._tp_procs:  # no forward runs now: the followers are told to stop, then joined
            self.scheduler.shutdown()
            self.scheduler.runner.shutdown()
            stop_processes(self._tp_procs)
            self._tp_procs = []

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


class _Call:
    """One generate call on the client side: a ReqState per request, fed from the scheduler's
    outputs through this call's own detokenizer; knows when it is done, and aborts what is left
    when the caller stops early or a request fails."""

    def __init__(self, msgs: List[TokenizedGenerateReqInput], batched: bool, detok: DetokenizerManager,
                 abort: Callable[[str], None]):
        self.reqs = [to_req(m) for m in msgs]
        self.batched, self.detok, self.abort = batched, detok, abort
        self.states = {m.rid: ReqState(m) for m in msgs}
        self.params = {m.rid: detok_params_of(m.sampling_params) for m in msgs}
        self.index = {m.rid: i for i, m in enumerate(msgs)}
        self.left = len(msgs)

    def feed(self, item) -> Dict[str, Any]:
        """Absorbs one output; returns the increment (text delta, new ids, index)."""
        if isinstance(item, BaseException):  # fail the whole call; free the rest
            self.abort_rest()
            raise item
        piece = self.detok.detokenize(item, self.params[item.rid])
        st = self.states[item.rid]
        st.absorb(piece)
        self.left -= item.finished_reason is not None
        chunk = st.to_dict()
        chunk.update(text=piece.text_delta, output_ids=list(item.new_token_ids), index=self.index[item.rid])
        return chunk

    def abort_rest(self) -> None:
        if self.left:
            for rid in self.states:
                self.abort(rid)

    def results(self):
        out = [st.to_dict() for st in self.states.values()]
        return out if self.batched or len(out) > 1 else out[0]


def _stream(call: _Call, get) -> Iterator[Dict[str, Any]]:
    try:
        while call.left:
            yield call.feed(get())
    finally:
        call.abort_rest()


async def _astream(call: _Call, aq: "asyncio.Queue") -> AsyncIterator[Dict[str, Any]]:
    try:
        while call.left:
            yield call.feed(await aq.get())
    finally:
        call.abort_rest()
