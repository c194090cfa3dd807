"""Shared machinery of the OpenAI-compatible routes: request -> sampling params, waiting with
abort-on-disconnect, the SSE loop over cumulative request states, usage and finish reasons.

Both serving modules hand this module a list of `ReqState`s (one per choice, prompt-major, as the
RequestBuilder orders them) and callbacks that shape their own JSON.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any, AsyncIterator, Callable, Dict, List, Optional, Union

from fastapi import Request
from fastapi.responses import Response

from radixlm.entrypoints.http_server import error_json, sse
from radixlm.entrypoints.openai.protocol import SamplingFields
from radixlm.managers.tokenizer_manager import ReqState, ServiceUnavailable, TokenizerManager

DISCONNECT_POLL_S = 0.5


class BadRequest(ValueError):
    """A 400 that names the offending field."""

    def __init__(self, message: str, param: Optional[str] = None):
        super().__init__(message)
        self.param = param


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def constraint(req: SamplingFields) -> Dict[str, Any]:
    """response_format / regex / json_schema / ebnf -> the sampling params' constraint (the grammar
    backend compiles it; --grammar-backend none makes the builder refuse it with a 400)."""
    out: Dict[str, Any] = {k: getattr(req, k) for k in ("regex", "json_schema", "ebnf") if getattr(req, k) is not None}
    rf = req.response_format
    if rf is None or rf.type == "text":
        return out
    if out:
        raise BadRequest(f"response_format cannot be combined with {', '.join(out)}", "response_format")
    if rf.type == "json_object":
        return {"json_schema": {"type": "object"}}
    if rf.type == "json_schema":
        schema = (rf.json_schema or {}).get("schema", (rf.model_extra or {}).get("schema"))
        if schema is None:
            raise BadRequest("response_format.json_schema.schema is required", "response_format")
        return {"json_schema": schema}
    raise BadRequest(f"response_format {rf.type} is not supported (use text, json_object or json_schema)",
                     "response_format")


def sampling_params(req: SamplingFields, max_new_tokens: Optional[int], vocab_size: int) -> Dict[str, Any]:
    bad = next((t for t in req.stop_token_ids or [] if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise BadRequest(f"stop_token_ids: token id {bad} is outside the vocabulary [0, {vocab_size})",
                         "stop_token_ids")
    sp = {
        "max_new_tokens": max_new_tokens, "min_new_tokens": req.min_tokens, "temperature": req.temperature,
        "top_p": req.top_p, "top_k": req.top_k, "min_p": req.min_p, "n": req.n, "sampling_seed": req.seed,
        "frequency_penalty": req.frequency_penalty, "presence_penalty": req.presence_penalty,
        "repetition_penalty": req.repetition_penalty, "stop": req.stop or None,
        "stop_token_ids": req.stop_token_ids, "logit_bias": req.logit_bias, "ignore_eos": req.ignore_eos,
        "skip_special_tokens": req.skip_special_tokens, "no_stop_trim": req.no_stop_trim,
    }
    sp.update(constraint(req))
    return {k: v for k, v in sp.items() if v is not None}


def finish_reason(st: ReqState) -> Optional[str]:
    return st.finished_reason.type if st.finished_reason is not None else None


def matched_stop(st: ReqState) -> Any:
    fr = st.finished_reason
    return fr.matched if fr is not None and fr.type == "stop" else None


def logprob_end(st: ReqState) -> int:
    """How many of the state's logprob entries belong to the text: a matched stop token (EOS or
    stop_token_ids) is not part of the text, so its entry is left out."""
    n = len(st.logprobs)
    fr = st.finished_reason
    if n and fr is not None and fr.type == "stop" and isinstance(fr.matched, int) \
            and not st.msg.sampling_params.get("no_stop_trim") and st.logprobs[-1][1] == fr.matched:
        return n - 1
    return n


def usage(states: List[ReqState]) -> Dict[str, Any]:
    """Each prompt counts once even with n > 1 (seed_offset 0 marks a prompt's first sample)."""
    prompt = sum(len(st.msg.input_ids) for st in states if st.msg.seed_offset == 0)
    completion = sum(len(st.output_ids) for st in states)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": sum(st.cached_tokens for st in states)}}


def abort_error(states: List[ReqState]) -> Optional[Response]:
    for st in states:
        fr = st.finished_reason
        if fr is not None and fr.type == "abort":
            return error_json(fr.message or "The request was aborted", 400)
    return None


async def wait_or_abort(request: Request, tm: TokenizerManager, states: List[ReqState]) -> Optional[Response]:
    """Waits for every state to finish. Returns None on success, else the error response: 499 when
    the client went away (its requests are aborted), 400 when a request was aborted."""
    task = asyncio.ensure_future(tm.wait_all(states))
    gone = False
    try:
        while not task.done():
            await asyncio.wait([task], timeout=DISCONNECT_POLL_S)
            if not task.done() and await request.is_disconnected():
                gone = True
                break
    finally:
        if not task.done():  # client gone, or the handler itself was cancelled
            task.cancel()
            await tm.release(states)
    if gone:
        return Response(status_code=499)
    task.result()
    return abort_error(states)


ChunkFn = Callable[[int, ReqState, str, int, int, Optional[str]], Union[None, Dict[str, Any], List[Dict[str, Any]]]]


async def stream_states(tm: TokenizerManager, states: List[ReqState], make_chunk: ChunkFn,
                        head: List[Dict[str, Any]], usage_chunk: Callable[[Dict[str, Any]], Dict[str, Any]],
                        include_usage: bool, continuous_usage: bool) -> AsyncIterator[bytes]:
    """SSE loop. `make_chunk(index, state, text_delta, lp_from, lp_to, finish_reason)` shapes one
    choice's chunk (None: nothing to send; a list: several chunks, in order). Text deltas come from
    the cumulative `state.text`. When the client disconnects the generator is closed and the
    `finally` aborts the unfinished requests."""
    sent_text = [0] * len(states)
    sent_lp = [0] * len(states)
    try:
        for chunk in head:
            yield sse(chunk)
        async for i, st in tm.stream(states):
            text = st.text
            delta = text[sent_text[i]:] if len(text) > sent_text[i] else ""
            sent_text[i] = max(sent_text[i], len(text))
            lp_from, lp_to = sent_lp[i], max(sent_lp[i], logprob_end(st))
            sent_lp[i] = lp_to
            made = make_chunk(i, st, delta, lp_from, lp_to, finish_reason(st) if st.finished else None)
            for chunk in (made if isinstance(made, list) else [made] if made is not None else []):
                if continuous_usage:
                    chunk["usage"] = usage(states)
                yield sse(chunk)
        if include_usage:
            yield sse(usage_chunk(usage(states)))
    except ServiceUnavailable as e:
        yield sse({"object": "error", "message": str(e), "type": "ServiceUnavailableError", "param": None,
                   "code": 503, "error": {"message": str(e), "type": "ServiceUnavailableError", "code": 503}})
    finally:
        await tm.release(states)
    yield b"data: [DONE]\n\n"
