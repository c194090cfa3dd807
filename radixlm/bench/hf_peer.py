"""The same workloads through HF transformers `generate`, written the way an HF user would.

* random / generated-shared-prefix / sharegpt: all requests arrive at once; they are run in
  left-padded batches of `batch_size` (default: all of them in one batch), greedy,
  `min_new_tokens = max_new_tokens` (the server runs with `ignore_eos`). A request's TTFT is the
  time from the start of the run to its batch's first generated token (earlier batches count:
  the request was waiting), its E2E the time to the end of its batch.
* sequential (`run_sequential`): one request at a time, each timed from its own `generate` call; optionally
  with the prompts' common prefix prefilled once and its KV cache copied into every call (reuse by hand).
* agent-multiturn: one `generate` call per turn (batch of 1, no padding), the conversation history
  = previous prompt + HF's own answer, exactly as the server workload. Two ways to time it:
  - `served` (default): the sessions are concurrent clients of one HF worker that runs one call at
    a time, first come first served: the same arrival process as the server run (all sessions
    start together, or at the client's Poisson offsets; at most `max_concurrency` requests sent at
    once; a session sends its next turn when the previous answer is complete). Every call is a real
    `generate`; a request's TTFT runs from the moment its client sent it, so it includes waiting for
    the worker, as a server request's TTFT does.
  - `per-call`: sessions one after another, TTFT from calling `generate` to its first token (a
    streamer's second `put`), leaving out any waiting: a lower bound that favours HF.

Every token is a real generated token; no KV or prefix is reused across calls (transformers has no
cross-request cache unless the user builds one).
"""

from __future__ import annotations

import heapq
import time
from typing import Iterator, List, Optional, Sequence, Tuple

from radixlm.bench.datasets import AgentSession, BenchRequest
from radixlm.bench.metrics import RequestResult


class _TimingStreamer:
    """Records the time of every `put` after the prompt (one per generated step)."""

    def __init__(self):
        self.times: List[float] = []
        self._prompt_seen = False

    def put(self, value) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def load_model(model_path: str):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()


def _cache_kw() -> str:
    """generate()'s name for a caller's KV cache: `cache` where transformers deprecates `past_key_values`."""
    import inspect

    from transformers import GenerationMixin

    try:
        return "cache" if 'deprecate_kwarg("past_key_values"' in inspect.getsource(GenerationMixin.generate) \
            else "past_key_values"
    except (OSError, TypeError):  # pragma: no cover - no source available
        return "past_key_values"


def _generate(model, ids_rows: List[List[int]], max_new: int, streamer=None, past_key_values=None):
    import torch

    width = max(len(p) for p in ids_rows)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in ids_rows])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in ids_rows])
    kw = {} if past_key_values is None else {_cache_kw(): past_key_values}
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new, min_new_tokens=max_new,
                             do_sample=False, pad_token_id=0, streamer=streamer, **kw)
    return out[:, width:].tolist()


def _as_streamer(s):
    try:  # transformers checks isinstance(streamer, BaseStreamer) in some versions
        from transformers.generation.streamers import BaseStreamer

        class S(_TimingStreamer, BaseStreamer):
            pass

        return S()
    except ImportError:  # pragma: no cover
        return s


def warmup(model) -> None:
    _generate(model, [[5, 6, 7, 8]], 2)


def run_batched(model_path: str, reqs: List[BenchRequest], batch_size: Optional[int] = None,
                model=None, progress=None) -> Tuple[List[RequestResult], float]:
    model = model or load_model(model_path)
    warmup(model)
    bs = batch_size or len(reqs)
    results: List[RequestResult] = []
    t0 = time.perf_counter()
    for i in range(0, len(reqs), bs):
        chunk = reqs[i:i + bs]
        s = _as_streamer(_TimingStreamer())
        outs = _generate(model, [r.prompt_ids for r in chunk], max(r.output_len for r in chunk), s)
        end = time.perf_counter()
        first = s.times[0] if s.times else end
        gaps = [b - a for a, b in zip(s.times, s.times[1:])]
        for r, o in zip(chunk, outs):
            n = r.output_len
            results.append(RequestResult(success=True, prompt_len=len(r.prompt_ids), output_len=n,
                                         ttft=first - t0, itl=gaps[:n - 1], latency=end - t0, start_time=0.0,
                                         output_ids=o[:n]))
        if progress is not None:
            progress.update(len(chunk))
    return results, time.perf_counter() - t0


def common_prefix_len(rows: Sequence[Sequence[int]]) -> int:
    n = min(len(r) for r in rows)
    for i in range(n):
        if any(r[i] != rows[0][i] for r in rows[1:]):
            return i
    return n


def prefill_prefix(model, prefix: List[int]):
    """The KV cache of `prefix` (a transformers Cache), computed once: what an HF user who reuses a shared
    prompt prefix by hand passes (a copy of) to every generate call."""
    import torch

    with torch.inference_mode():
        out = model(input_ids=torch.tensor([prefix]), use_cache=True)
    return out["cache"] if "cache" in out else out.past_key_values


def run_sequential(model_path: str, reqs: List[BenchRequest], model=None, progress=None,
                   reuse_prefix: bool = False) -> Tuple[List[RequestResult], float]:
    """One request at a time (batch 1), each timed from its own `generate` call (no waiting): the HF side of a
    sequential workload. `reuse_prefix`: the prompts' common prefix is prefilled once, before the clock starts,
    and a deep copy of its KV cache is passed to every call (prefix reuse by hand; the copy is timed)."""
    import copy

    model = model or load_model(model_path)
    warmup(model)
    prefix_kv, n = None, 0
    if reuse_prefix and len(reqs) > 1:
        n = min(common_prefix_len([r.prompt_ids for r in reqs]), min(len(r.prompt_ids) for r in reqs) - 1)
        if n > 0:
            prefix_kv = prefill_prefix(model, reqs[0].prompt_ids[:n])
    results: List[RequestResult] = []
    t0 = time.perf_counter()
    for r in reqs:
        st = time.perf_counter()
        kv = copy.deepcopy(prefix_kv) if prefix_kv is not None else None
        out, first, end, itl = _timed_call(model, r.prompt_ids, r.output_len, kv)
        results.append(RequestResult(success=True, prompt_len=len(r.prompt_ids), output_len=len(out),
                                     ttft=first - st, itl=itl, latency=end - st, start_time=st - t0,
                                     output_ids=out, cached_tokens=n if prefix_kv is not None else 0))
        if progress is not None:
            progress.update(1)
    return results, time.perf_counter() - t0


def _session_calls(sess: AgentSession) -> Iterator[Tuple[List[int], int, bool]]:
    """Yields (prompt, depth, is_retry) for every call of a session; send() it the call's output ids."""
    history = list(sess.system_ids)
    for depth, turn in enumerate(sess.turns, 1):
        msgs = [(turn.new_ids, False)] + ([(turn.retry_ids, True)] if turn.retry_ids is not None else [])
        last = None
        for new_ids, is_retry in msgs:
            prompt = history + new_ids
            out = yield prompt, depth, is_retry
            last = prompt + out
        history = last


def _timed_call(model, prompt: List[int], max_new: int, past_key_values=None
                ) -> Tuple[List[int], float, float, List[float]]:
    """(output ids, first-token time, end time, inter-token gaps), times from perf_counter."""
    s = _as_streamer(_TimingStreamer())
    out = _generate(model, [prompt], max_new, s, past_key_values)[0]
    end = time.perf_counter()
    return out, (s.times[0] if s.times else end), end, [b - a for a, b in zip(s.times, s.times[1:])]


def run_agent(model_path: str, sessions: List[AgentSession], model=None, progress=None, mode: str = "served",
              max_concurrency: Optional[int] = None, start_offsets: Optional[Sequence[float]] = None
              ) -> Tuple[List[RequestResult], float]:
    """Runs the agent sessions (see the module docstring for `mode`). `start_offsets`: when each
    session's client starts, in seconds from the start of the run (served mode)."""
    if mode not in ("served", "per-call"):
        raise ValueError(f"mode must be 'served' or 'per-call', got {mode!r}")
    model = model or load_model(model_path)
    warmup(model)
    if mode == "per-call":
        return _run_agent_per_call(model, sessions, progress)
    results: List[RequestResult] = []
    calls = [_session_calls(s) for s in sessions]
    offsets = list(start_offsets) if start_offsets is not None else [0.0] * len(sessions)
    # (time the request is ready to send, session): a session's next call is ready when its answer is
    ready = [(offsets[i], i, next(calls[i])) for i in range(len(sessions))]
    heapq.heapify(ready)
    # send slots (max_concurrency requests in flight): the time each slot became free
    free_slots = [0.0] * (max_concurrency or len(sessions))
    sent: list = []  # (send time, session, call): the worker's FIFO
    t0 = time.perf_counter()
    while ready or sent:
        while ready and free_slots:
            ready_at, i, call = heapq.heappop(ready)
            heapq.heappush(sent, (max(ready_at, heapq.heappop(free_slots)), i, call))
        send_at, i, (prompt, depth, is_retry) = heapq.heappop(sent)
        wait = send_at - (time.perf_counter() - t0)
        if wait > 0:  # a session that has not started yet (Poisson start offsets)
            time.sleep(wait)
        out, first, end, itl = _timed_call(model, prompt, sessions[i].output_len)
        results.append(RequestResult(
            success=True, prompt_len=len(prompt), output_len=len(out), ttft=first - t0 - send_at, itl=itl,
            latency=end - t0 - send_at, start_time=send_at, output_ids=out, session=sessions[i].session_id,
            turn=depth, is_retry=is_retry))
        if progress is not None:
            progress.update(1)
        heapq.heappush(free_slots, end - t0)
        try:
            heapq.heappush(ready, (end - t0, i, calls[i].send(out)))
        except StopIteration:
            pass
    return results, time.perf_counter() - t0


def _run_agent_per_call(model, sessions: List[AgentSession], progress) -> Tuple[List[RequestResult], float]:
    results: List[RequestResult] = []
    t0 = time.perf_counter()
    for sess in sessions:
        gen = _session_calls(sess)
        call = next(gen)
        while True:
            prompt, depth, is_retry = call
            st = time.perf_counter()
            out, first, end, itl = _timed_call(model, prompt, sess.output_len)
            results.append(RequestResult(
                success=True, prompt_len=len(prompt), output_len=len(out), ttft=first - st, itl=itl,
                latency=end - st, start_time=st - t0, output_ids=out, session=sess.session_id, turn=depth,
                is_retry=is_retry))
            if progress is not None:
                progress.update(1)
            try:
                call = gen.send(out)
            except StopIteration:
                break
    return results, time.perf_counter() - t0
