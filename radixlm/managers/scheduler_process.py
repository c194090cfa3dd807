"""The scheduler's home: building it from ServerArgs, and the child process that runs it.

`create_scheduler(args)` wires model config, tokenizer tail-decoder, model runner and scheduler;
the offline Engine calls it in-process. `run_scheduler_process` is the child-process main: it
takes requests and control messages from the tokenizer manager over ZeroMQ, steps the scheduler
while there is work, and pushes each step's tokens to the detokenizer. It exits when its parent
dies.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Dict, List

from radixlm.core import FinishReason, ReqOutput
from radixlm.managers.io_struct import (
    AbortReq,
    BatchTokenIDOut,
    DetokenizeParams,
    FlushCacheReq,
    FlushCacheReqOutput,
    GetInternalStateReq,
    GetInternalStateReqOutput,
    LoRAAdapterReq,
    SchedulerReady,
    TokenizedGenerateReqInput,
    decode_or_drop,
    detok_params_of,
    encode,
    to_req,
)
from radixlm.server_args import ServerArgs, derive_config

logger = logging.getLogger(__name__)


def rank_device(args: ServerArgs, tp_rank: int) -> str:
    """The device of a tensor-parallel rank: its node-local index on CUDA ("cuda" -> cuda:i,
    "cuda:N" -> cuda:N+i), the CPU otherwise."""
    device = args.resolved_device
    if args.tp_size == 1 or not device.startswith("cuda"):
        return device
    local = tp_rank % (args.tp_size // args.nnodes)
    base = int(device.split(":")[1]) if ":" in device else 0
    return f"cuda:{base + local}"


def create_model_runner(args: ServerArgs, tp_rank: int = 0, peers_alive=None):
    """The model runner of one rank (with tp_size > 1 it joins the group: the other ranks must start;
    `peers_alive`, see ModelRunner)."""
    from radixlm.engine.model_runner import ModelRunner, RunnerConfig
    from radixlm.models.model_config import ModelConfig

    model_config = ModelConfig.from_path(args.model_path, args.dtype, args.context_length,
                                         device=rank_device(args, tp_rank), quantization=args.quantization)
    return ModelRunner(model_config, derive_config(
        RunnerConfig, args, device=rank_device(args, tp_rank), max_running_requests=args.resolved_max_running_requests,
        tp_rank=tp_rank, lora=lora_config(args)), peers_alive=peers_alive)


def lora_config(args: ServerArgs):
    """The LoRA manager's config with --enable-lora, else None."""
    if not args.enable_lora:
        return None
    from radixlm.lora.manager import LoRAConfig, parse_lora_paths

    return LoRAConfig(parse_lora_paths(args.lora_paths), args.max_loras_per_batch, args.max_lora_rank,
                      list(args.lora_target_modules) if args.lora_target_modules else None, args.lora_backend)


def create_scheduler(args: ServerArgs, tokenizer=None, peers_alive=None):
    from radixlm.constrained import create_grammar_backend
    from radixlm.sched.scheduler import Scheduler, SchedulerConfig

    runner = create_model_runner(args, peers_alive=peers_alive)
    model_config = runner.model_config
    decode_tail = encode_text = grammar_factory = None
    if tokenizer is not None:
        def decode_tail(ids):
            return tokenizer.decode(ids)

        def encode_text(text):
            return tokenizer.encode(text, add_special_tokens=False)

        if args.grammar_backend != "none":
            def grammar_factory():
                return create_grammar_backend(
                    args.grammar_backend, tokenizer, model_config.vocab_size, model_config.eos_token_ids,
                    any_whitespace=not args.constrained_json_disable_any_whitespace,
                    max_whitespace_cnt=args.constrained_json_max_whitespace,
                    compile_timeout=args.grammar_compile_timeout, cache_size=args.grammar_cache_size)
    from radixlm.disaggregation import create_disaggregation

    pd = create_disaggregation(args, runner, runner.allocator.page_size)
    draft_runner = None
    if args.speculative_algorithm == "STANDALONE":
        from radixlm.speculative.standalone import create_draft_runner

        draft_runner = create_draft_runner(args, runner)
    return Scheduler(runner, derive_config(
        SchedulerConfig, args, max_running_requests=args.resolved_max_running_requests,
        enable_jump_forward=not args.disable_jump_forward, enable_overlap=args.resolved_enable_overlap,
        chunked_prefill_size=args.resolved_chunked_prefill_size, enable_mixed_chunk=args.resolved_enable_mixed_chunk,
        debug_integrity_check=args.enable_debug_integrity_check,
        lora_slots=args.max_loras_per_batch if args.enable_lora else None),
        model_config.context_len, decode_tail, encode_text, grammar_factory, pd=pd, draft_runner=draft_runner)


def scheduler_state(s) -> Dict:
    return {
        "max_total_num_tokens": s.max_total_num_tokens,
        "num_running_reqs": len(s.running) + (1 if s.chunked_req else 0) + len(s.q.transfer),
        "num_queue_reqs": len(s.waiting) + (len(s.pd.pending_reqs()) if s.pd is not None else 0),
        "num_pd_transfer_reqs": len(s.q.transfer),  # PD: holding KV for a transfer (counted as running)
        "token_usage": s.token_usage(),
        "cache_hit_rate": s.stats.cache_hit_rate,
        "last_prefill_hit_rate": s.stats.last_hit_rate,
        "prefill_cached_tokens": s.stats.prefill_cached_tokens,
        "prefill_new_tokens": s.stats.prefill_new_tokens,
        "num_retractions": s.stats.num_retractions,
        "generated_tokens": s.stats.generated_tokens,
        "free_kv_tokens": s.allocator.available_size(),
        "evictable_kv_tokens": s.tree_cache.evictable_size(),
        "protected_kv_tokens": s.tree_cache.protected_size(),
        "last_gen_throughput": s.stats.last_gen_throughput,
        "jump_forward_tokens": s.stats.jump_forward_tokens,
        "num_integrity_violations": s.stats.num_integrity_violations,
        "spec_verify_ct": s.stats.spec_verify_ct,
        "avg_spec_accept_length": s.stats.spec_accept_length,
        "spec_accept_rate": s.stats.spec_accept_rate,
    }


def process_start_time(pid: int = 0) -> float:
    """When process `pid` (0: this one) started, on the time.time() clock (Linux /proc; elsewhere:
    now). The start-up timeline (`startup_timeline`) counts from the server process's start."""
    try:
        with open(f"/proc/{pid or os.getpid()}/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return time.time() - (uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return time.time()


def startup_timeline(marks: Dict[str, float], t0: float) -> str:
    """`name=seconds` since t0 for each mark, in time order (logged once the server serves;
    `python -m radixlm.bench.startup` reads it)."""
    return " ".join(f"{k}={v - t0:.2f}" for k, v in sorted(marks.items(), key=lambda kv: kv[1]))


def exit_with_parent(parent_pid: int) -> None:
    """Children never outlive the server: poll the parent and leave when it is gone."""
    try:  # Linux: the kernel sends SIGKILL when the parent dies
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - other platforms: the polling thread below suffices
        pass

    def watch():
        while True:
            if os.getppid() != parent_pid:
                os._exit(1)
            time.sleep(0.5)

    threading.Thread(target=watch, daemon=True, name="parent-watch").start()


def _exit_on_tp_failure(e: BaseException) -> None:
    """A failed collective leaves the ranks out of step: rank 0 exits, and the tokenizer manager's
    watchdog answers 503 and stops the server."""
    logger.error("tensor-parallel group failed (%s: %s); the scheduler exits", type(e).__name__, e)
    logging.shutdown()
    os._exit(1)


@dataclass
class IPCNames:
    scheduler_input: str  # tokenizer manager -> scheduler
    detokenizer_input: str  # scheduler -> detokenizer
    tokenizer_input: str  # detokenizer and scheduler -> tokenizer manager


def run_scheduler_process(args: ServerArgs, ipc: IPCNames, parent_pid: int) -> None:
    marks = {"scheduler.imported": time.time()}  # spawned, and this module (torch) imported
    import zmq

    exit_with_parent(parent_pid)
    logging.basicConfig(level=args.log_level.upper(), format="[%(asctime)s scheduler] %(message)s",
                        force=True)  # forked: not the parent's handlers
    ctx = zmq.Context()
    recv = ctx.socket(zmq.PULL)
    recv.bind(ipc.scheduler_input)
    to_detok = ctx.socket(zmq.PUSH)
    to_detok.connect(ipc.detokenizer_input)
    to_tokenizer = ctx.socket(zmq.PUSH)
    to_tokenizer.connect(ipc.tokenizer_input)
    try:
        from radixlm.managers.tokenizer import get_tokenizer

        tokenizer = None if args.skip_tokenizer_init else get_tokenizer(args.resolved_tokenizer_path,
                                                                        args.trust_remote_code)
        marks["scheduler.tokenizer"] = time.time()
        scheduler = create_scheduler(args, tokenizer)
        marks["scheduler.model"] = time.time()
        scheduler.runner.on_tp_failure = _exit_on_tp_failure
    except Exception as e:  # noqa: BLE001 - reported to the launcher, which exits with it
        to_tokenizer.send(encode(SchedulerReady(False, error=f"{type(e).__name__}: {e}\n{traceback.format_exc()}")))
        time.sleep(0.5)
        return
    to_tokenizer.send(encode(SchedulerReady(True, info={
        "max_total_num_tokens": scheduler.max_total_num_tokens,
        "context_len": scheduler.context_len,
        "vocab_size": scheduler.runner.model_config.vocab_size,
        "startup": marks,
    })))
    SchedulerLoop(scheduler, recv, to_detok, to_tokenizer).run()


class SchedulerLoop:
    def __init__(self, scheduler, recv, to_detok, to_tokenizer):
        self.scheduler = scheduler
        self.recv, self.to_detok, self.to_tokenizer = recv, to_detok, to_tokenizer
        self.detok_params: Dict[str, DetokenizeParams] = {}

    def run(self) -> None:
        import zmq

        while True:
            block = not self.scheduler.has_work()
            while True:
                try:
                    data = self.recv.recv(flags=0 if block else zmq.NOBLOCK)
                except zmq.Again:
                    break
                msg = decode_or_drop(data, "scheduler", logger)
                if msg is not None:
                    self.handle(msg)
                block = False
            if self.scheduler.has_work():
                try:
                    self.emit(self.scheduler.step())
                except Exception as e:  # noqa: BLE001 - last resort: step() fails only its own batch
                    logger.exception("scheduler step failed outside a batch")
                    self.emit(self.scheduler.recover(f"internal error in the scheduler: {type(e).__name__}: {e}"))
            else:
                self.scheduler.idle_check()

    def handle(self, msg) -> None:
        """One message from the tokenizer manager. Never raises: a message of an unexpected type, or
        one whose handling fails, is logged and dropped (a failed flush is still answered)."""
        s = self.scheduler
        try:
            if isinstance(msg, TokenizedGenerateReqInput):
                try:
                    req = to_req(msg)
                    self.detok_params[req.rid] = detok_params_of(req.sampling_params)
                    s.add_request(req)
                except Exception as e:  # noqa: BLE001 - a bad request fails alone
                    self.emit([ReqOutput(msg.rid, [], FinishReason("abort", message=str(e)), len(msg.input_ids),
                                         0, 0)])
            elif isinstance(msg, AbortReq):
                rids = [r.rid for r in s.live_reqs() + list(s.waiting)] if msg.abort_all else [msg.rid]
                for rid in rids:
                    self.emit(s.abort_request(rid))
            elif isinstance(msg, FlushCacheReq):
                ok = s.flush_cache()
                self.to_tokenizer.send(encode(FlushCacheReqOutput(
                    ok, "Cache flushed." if ok else "Cache not flushed: requests are running or waiting.",
                    msg.req_id)))
            elif isinstance(msg, LoRAAdapterReq):
                from radixlm.lora.server import handle_lora_request

                self.to_tokenizer.send(encode(handle_lora_request(s, msg)))
            elif isinstance(msg, GetInternalStateReq):
                self.to_tokenizer.send(encode(GetInternalStateReqOutput(scheduler_state(s), msg.req_id)))
            else:
                logger.error("scheduler dropped an unexpected message %s", type(msg).__name__)
        except Exception as e:  # noqa: BLE001 - a malformed message must not take the scheduler down
            logger.exception("scheduler dropped a %s: handling it failed", type(msg).__name__)
            if isinstance(msg, FlushCacheReq):
                self.to_tokenizer.send(encode(FlushCacheReqOutput(
                    False, f"Cache not flushed: {type(e).__name__}: {e}", getattr(msg, "req_id", 0))))

    def emit(self, outputs: List[ReqOutput]) -> None:
        if not outputs:
            return
        params = [self.detok_params.get(o.rid, DetokenizeParams()) for o in outputs]
        for o in outputs:
            if o.finished_reason is not None:
                self.detok_params.pop(o.rid, None)
        self.to_detok.send(encode(BatchTokenIDOut(outputs, params)))
