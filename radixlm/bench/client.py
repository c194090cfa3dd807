"""Streaming HTTP clients for bench_serving: radixlm's native /generate and OpenAI /v1/completions.

Both send token ids (native: `input_ids`; OpenAI: `prompt` as a list of ids, which OpenAI-compatible
servers accept), greedy, `ignore_eos`, so prompt and output lengths are token-exact. With `as_text`
(a detokenizer) they send the prompt as text instead (native `text`, OpenAI `prompt` string): what a
router that routes on text (sglang-router's cache_aware) needs; the server's count of prompt tokens
is then read back from the response.
TTFT = time to the first chunk carrying output; ITL = gaps between chunks, spread evenly over the
tokens a chunk brings (native backend; OpenAI chunks count as one token each).
"""

from __future__ import annotations

import json
import time
from typing import Callable, Dict, List, Optional

import httpx

from radixlm.bench.metrics import RequestResult


def _sse_payloads(line: str):
    if not line.startswith("data:"):
        return None
    data = line[5:].strip()
    if not data or data == "[DONE]":
        return None
    return json.loads(data)


CLOSE = {"Connection": "close"}


async def _events(client: httpx.AsyncClient, url: str, payload: dict, res: RequestResult,
                  headers: Optional[dict] = None):
    """Yields (arrival time, event) for each SSE event; an HTTP or in-stream error ends the stream
    with `res.error` set."""
    async with client.stream("POST", url, json=payload, headers=headers) as resp:
        if resp.status_code != 200:
            res.error = f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"
            return
        async for line in resp.aiter_lines():
            d = _sse_payloads(line)
            if d is None:
                continue
            if "error" in d:
                res.error = str(d["error"])
                return
            yield time.perf_counter(), d


def _finish(res: RequestResult, st: float, output_len: int) -> RequestResult:
    res.latency = time.perf_counter() - st
    res.success = res.output_len > 0 or output_len == 0
    if not res.success:
        res.error = "no output"
    return res


def _start(payload: dict, extra: Optional[dict], prompt_ids: List[int], t_origin: float):
    """Merges the caller's extra body fields; returns the result record and the send time."""
    if extra:
        payload.update(extra)
    st = time.perf_counter()
    return RequestResult(prompt_len=len(prompt_ids), start_time=st - t_origin), st


async def request_native(client: httpx.AsyncClient, base_url: str, prompt_ids: List[int], output_len: int,
                         t_origin: float, extra: Optional[dict] = None,
                         as_text: Optional[Callable[[List[int]], str]] = None) -> RequestResult:
    prompt = {"input_ids": prompt_ids} if as_text is None else {"text": as_text(prompt_ids)}
    payload = {**prompt, "stream": True,
               "sampling_params": {"temperature": 0, "max_new_tokens": output_len, "ignore_eos": True}}
    res, st = _start(payload, extra, prompt_ids, t_origin)
    last = st
    n_seen = 0
    try:
        async for now, d in _events(client, base_url + "/generate", payload, res):
            ids = d.get("output_ids") or []
            k = len(ids) - n_seen
            if k > 0:
                if n_seen == 0:
                    res.ttft = now - st
                else:
                    res.itl.extend([(now - last) / k] * k)
                last = now
                n_seen = len(ids)
            meta = d.get("meta_info", {})
            res.output_ids = ids
            res.output_len = meta.get("completion_tokens", len(ids))
            res.prompt_len = meta.get("prompt_tokens", res.prompt_len)
            res.cached_tokens = meta.get("cached_tokens", 0)
            if "e2e_latency" in meta:
                res.server_e2e = meta["e2e_latency"]
        if not res.error:
            _finish(res, st, output_len)
    except Exception as e:  # noqa: BLE001 - a failed request is a result, not a crash
        res.error = f"{type(e).__name__}: {e}"
    return res


async def request_openai(client: httpx.AsyncClient, base_url: str, prompt_ids: List[int], output_len: int,
                         t_origin: float, model: str, tokenize: Optional[Callable] = None,
                         extra: Optional[dict] = None,
                         as_text: Optional[Callable[[List[int]], str]] = None) -> RequestResult:
    prompt = prompt_ids if as_text is None else as_text(prompt_ids)
    payload = {"model": model, "prompt": prompt, "max_tokens": output_len, "temperature": 0,
               "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    res, st = _start(payload, extra, prompt_ids, t_origin)
    last = st
    chunks = 0
    text = []
    usage = None
    try:
        async for now, d in _events(client, base_url + "/v1/completions", payload, res):
            if d.get("usage"):
                usage = d["usage"]
            piece = "".join(c.get("text") or "" for c in d.get("choices") or [])
            if piece:
                if chunks == 0:
                    res.ttft = now - st
                else:
                    res.itl.append(now - last)
                last = now
                chunks += 1
                text.append(piece)
        if res.error:
            return res
        res.output_len = usage["completion_tokens"] if usage else chunks
        if usage:
            res.prompt_len = usage.get("prompt_tokens", res.prompt_len)
            res.cached_tokens = ((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
        if tokenize is not None:
            res.output_ids = tokenize("".join(text))
        _finish(res, st, output_len)
    except Exception as e:  # noqa: BLE001
        res.error = f"{type(e).__name__}: {e}"
    return res


def llama_cpp_payload(prompt_ids: List[int], output_len: int) -> dict:
    """The body of llama.cpp `llama-server`'s native POST /completion for a token-id prompt: a token
    array is taken as is (no BOS added); greedy (temperature 0); `ignore_eos` (the server biases
    every end-of-generation token to -inf, as HF's min_new_tokens does); `cache_prompt` (reuse the
    slot's KV for the common prefix); streamed, with the token ids of every chunk."""
    return {"prompt": list(prompt_ids), "n_predict": output_len, "temperature": 0.0, "ignore_eos": True,
            "cache_prompt": True, "stream": True, "return_tokens": True}


class LlamaSlotPinner:
    """Sticky llama-server slots for multi-turn sessions (what a llama.cpp deployment does with `id_slot`): a
    prompt that extends the whole cached sequence (prompt + answer) of an idle slot goes to that slot; any other
    prompt goes to a slot never used yet while there is one, else the server chooses. llama-server's own choice
    (the idle slot sharing the longest prefix) sends a new session to another session's slot, which shares only
    the system prompt, and overwrites that session's history there (interleaved sessions then reuse only the
    system prompt)."""

    def __init__(self, n_slots: int):
        self.n_slots = n_slots
        self.held: Dict[int, List[int]] = {}  # slot -> the token sequence its cache holds
        self.busy: set = set()

    def pick(self, prompt_ids: List[int]) -> int:
        best, best_len = -1, 0
        for slot, seq in self.held.items():
            if slot not in self.busy and len(seq) > best_len and prompt_ids[:len(seq)] == seq:
                best, best_len = slot, len(seq)
        if best < 0:
            best = next((i for i in range(self.n_slots) if i not in self.held and i not in self.busy), -1)
        if best >= 0:
            self.busy.add(best)
        return best

    def done(self, slot: int, seq: Optional[List[int]]) -> None:
        if slot < 0:
            return
        self.busy.discard(slot)
        if seq is None:
            self.held.pop(slot, None)
        else:
            self.held[slot] = seq


async def request_llama_cpp(client: httpx.AsyncClient, base_url: str, prompt_ids: List[int], output_len: int,
                            t_origin: float, extra: Optional[dict] = None, exact_ids: bool = False,
                            slots: Optional[LlamaSlotPinner] = None) -> RequestResult:
    """One streamed /completion on llama-server. TTFT = first chunk with output; ITL = gaps between chunks,
    spread over the tokens each brings (the chunk's `tokens_predicted` minus the last count); prompt and
    reused-prefix counts from the final chunk (`tokens_evaluated`; `timings.cache_n`: `tokens_cached` is the
    slot's whole cache, not the reuse).

    llama-server streams a token only once its text is complete UTF-8, and then sends only that token's id: the
    ids of tokens that ended mid-character are missing from the stream (their count is not). With `exact_ids`,
    a stream that lost ids is followed, after the timings are taken, by the same request unstreamed (its prompt
    is cached: only the decode is repeated) whose `tokens` are the exact ids: what a multi-turn workload needs to
    send the model's own answer back as history. `slots`: pin the request to a slot (LlamaSlotPinner).
    Each request closes its connection: llama-server drops kept-alive connections after a stream."""
    payload = llama_cpp_payload(prompt_ids, output_len)
    slot = slots.pick(prompt_ids) if slots is not None else -1
    if slot >= 0:
        payload["id_slot"] = slot
    res, st = _start(payload, extra, prompt_ids, t_origin)
    last = st
    ids: List[int] = []
    n_seen = 0
    try:
        async for now, d in _events(client, base_url + "/completion", payload, res, CLOSE):
            n = d.get("tokens_predicted", n_seen + len(d.get("tokens") or []))
            k = n - n_seen
            if k > 0 and (d.get("tokens") or d.get("content") or not d.get("stop")):
                if n_seen == 0:
                    res.ttft = now - st
                else:
                    res.itl.extend([(now - last) / k] * k)
                last = now
                n_seen = n
            ids.extend(d.get("tokens") or [])
            if d.get("stop"):
                n_seen = max(n_seen, n)
                res.prompt_len = d.get("tokens_evaluated", res.prompt_len)
                timings = d.get("timings") or {}
                res.cached_tokens = timings.get("cache_n") or 0
                if "prompt_ms" in timings and "predicted_ms" in timings:
                    res.server_e2e = (timings["prompt_ms"] + timings["predicted_ms"]) / 1000
        if res.error:
            return res
        res.output_len = n_seen
        res.output_ids = ids
        _finish(res, st, output_len)
        if exact_ids and len(ids) != n_seen:
            r = await client.post(base_url + "/completion", json={**payload, "stream": False}, headers=CLOSE)
            r.raise_for_status()
            res.output_ids = list(r.json()["tokens"])
    except Exception as e:  # noqa: BLE001
        res.error = f"{type(e).__name__}: {e}"
        res.success = False
    if slots is not None:
        exact = res.success and len(res.output_ids) == res.output_len
        slots.done(slot, list(prompt_ids) + res.output_ids if exact else None)
    return res
