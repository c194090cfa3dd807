"""Shared machinery of the OpenAI-compatible routes: request -> sampling params, waiting with
abort-on-disconnect, the SSE loop over cumulative request states, usage and finish reasons.

Also the request limits in OpenAI's field names (`check_limits`, `check_unicode`) and OpenAI's
finish reasons: "stop" / "length" only; an aborted request is an error (400 JSON, or an error event
that ends the stream), never finish_reason "abort".

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

from radixlm.entrypoints.http_responses import error_json, sse
from radixlm.entrypoints.openai.protocol import SamplingFields
from radixlm.managers import sglang_fields
from radixlm.managers.request_builder import check_text, grammar_size
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
    if rf.type == "structural_tag":  # SGLang's: the whole response_format is the tag (xgrammar checks it)
        tag = rf.model_dump(exclude_none=True)
        if "format" not in tag and "structures" not in tag:
            raise BadRequest("response_format: a structural_tag needs 'format' (or the legacy 'structures' and "
                             "'triggers')", "response_format")
        return {"structural_tag": tag}
    raise BadRequest(f"response_format {rf.type} is not supported (use text, json_object, json_schema or "
                     "structural_tag)", "response_format")


UNSUPPORTED_EXTENSIONS = ("session_params", "return_hidden_states", "routed_dp_rank", "data_parallel_rank")


def sglang_extras(req: SamplingFields) -> Dict[str, Any]:
    """The SGLang request extensions the RequestBuilder takes (extra_key, cache_salt, priority, the PD
    bootstrap fields);
    a feature radixlm lacks set to a non-default value is a 400 naming it (as on /generate)."""
    for name in UNSUPPORTED_EXTENSIONS:
        try:
            sglang_fields.check_generate_fields({name: getattr(req, name)})
        except ValueError as e:
            raise BadRequest(str(e), name) from None
    return {"extra_key": req.extra_key, "cache_salt": req.cache_salt, "priority": req.priority,
            "bootstrap_host": req.bootstrap_host, "bootstrap_port": req.bootstrap_port,
            "bootstrap_room": req.bootstrap_room,
            "lora_path": lora_of(req)}


def lora_of(req: SamplingFields) -> Any:
    """The LoRA adapter of an OpenAI request: its `lora_path`, else SGLang's `model: "base:adapter"`."""
    if req.lora_path is not None:
        return req.lora_path
    model = getattr(req, "model", None) or ""
    return model.split(":", 1)[1] or None if ":" in model else None


def check_limits(req: SamplingFields, limits, top_field: str, top: Optional[int]) -> None:
    """The server's request limits (RequestLimits, from the --max-* flags) in OpenAI's field names,
    checked before anything is tokenized or compiled."""
    n = req.n or 1
    if n > limits.max_n:
        raise BadRequest(f"n: {n} choices per prompt; at most {limits.max_n} (--max-n)", "n")
    if top is not None and top > limits.max_top_logprobs_num:
        raise BadRequest(f"{top_field}: {top} is more than the {limits.max_top_logprobs_num} allowed "
                         "(--max-top-logprobs-num)", top_field)
    regexes = [req.stop_regex] if isinstance(req.stop_regex, str) else list(req.stop_regex or [])
    if len(regexes) > limits.max_stop_strings:
        raise BadRequest(f"stop_regex: {len(regexes)} patterns; at most {limits.max_stop_strings} "
                         "(--max-stop-strings)", "stop_regex")
    long = next((s for s in regexes if len(s) > limits.max_stop_string_len), None)
    if long is not None:
        raise BadRequest(f"stop_regex: a pattern of {len(long)} characters; at most {limits.max_stop_string_len} "
                         "(--max-stop-string-len)", "stop_regex")
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stops) > limits.max_stop_strings:
        raise BadRequest(f"stop: {len(stops)} stop strings; at most {limits.max_stop_strings} (--max-stop-strings)",
                         "stop")
    long = next((s for s in stops if len(s) > limits.max_stop_string_len), None)
    if long is not None:
        raise BadRequest(f"stop: a stop string of {len(long)} characters; at most {limits.max_stop_string_len} "
                         "(--max-stop-string-len)", "stop")
    grammars = {k: getattr(req, k) for k in ("regex", "json_schema", "ebnf")}
    if req.response_format is not None and req.response_format.type == "json_schema":
        grammars["response_format"] = req.response_format.model_dump()
    for name, v in grammars.items():
        if v is None:
            continue
        size = len(v.encode("utf-8", "replace")) if isinstance(v, str) else grammar_size(v)
        if size > limits.max_grammar_bytes:
            raise BadRequest(f"{name}: {size} bytes; at most {limits.max_grammar_bytes} (--max-grammar-bytes)", name)


def check_unicode(body: Any, path: str = "") -> None:
    """Every string of the request is valid Unicode (a lone UTF-16 surrogate, legal in JSON's \\u
    escapes, can be neither tokenized nor sent back): else a 400 naming the field."""
    if isinstance(body, str):
        try:
            check_text(body, path or "body")
        except ValueError as e:
            raise BadRequest(str(e), path or None) from None
    elif isinstance(body, dict):
        for k, v in body.items():
            if isinstance(k, str):
                check_unicode(k, path or "body")
            check_unicode(v, f"{path}.{k}" if path else str(k))
    elif isinstance(body, (list, tuple)):
        for i, v in enumerate(body):
            check_unicode(v, f"{path}.{i}" if path else str(i))


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
        "stop_regex": req.stop_regex or None, "custom_params": req.custom_params,
    }
    sp.update(constraint(req))
    return {k: v for k, v in sp.items() if v is not None}


OPENAI_FINISH_REASONS = ("stop", "length")  # (+ "tool_calls", set by the chat route)


def finish_reason(st: ReqState) -> Optional[str]:
    """OpenAI's value: "stop" or "length". An aborted request never gets here: it is reported as an
    error (abort_error, or an error event in a stream)."""
    fr = st.finished_reason
    if fr is None:
        return None
    if fr.type not in OPENAI_FINISH_REASONS:
        raise AssertionError(f"finish reason {fr.type!r} reached the OpenAI layer")
    return fr.type


def is_aborted(st: ReqState) -> bool:
    return st.finished_reason is not None and st.finished_reason.type not in OPENAI_FINISH_REASONS


def error_event(message: str, status: int, err_type: str) -> Dict[str, Any]:
    """An SSE error chunk in OpenAI's error shape."""
    return {"object": "error", "message": message, "type": err_type, "param": None, "code": status,
            "error": {"message": message, "type": err_type, "param": None, "code": status}}


def matched_stop(st: ReqState) -> Any:
    fr = st.finished_reason
    return fr.matched if fr is not None and fr.type == "stop" else None


def logprob_end(st: ReqState) -> int:
    """How many of the state's logprob entries belong to the text: a matched stop token (EOS or
    stop_token_ids) is not part of the text, so its entry is left out."""
    n = len(st.logprobs)
    fr = st.finished_reason
    if n and fr is not None and fr.type == "stop" and isinstance(fr.matched, int) \
            and not st.msg.sampling_params.no_stop_trim and st.logprobs[-1][1] == fr.matched:
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
        if is_aborted(st):
            return error_json(st.finished_reason.message or "The request was aborted",
                              st.finished_reason.status_code or 400)
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
                        include_usage: bool, continuous_usage: bool,
                        usage_fn: Callable[[List[ReqState]], Dict[str, Any]] = usage) -> AsyncIterator[bytes]:
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
            if is_aborted(st):  # OpenAI has no "abort" finish_reason: an error event ends the stream
                yield sse(error_event(st.finished_reason.message or "The request was aborted",
                                      st.finished_reason.status_code or 400,
                                      "BadRequestError"))
                include_usage = False
                break
            text = st.text
            delta = text[sent_text[i]:] if len(text) > sent_text[i] else ""
            sent_text[i] = max(sent_text[i], len(text))
            lp_from, lp_to = sent_lp[i], max(sent_lp[i], logprob_end(st))
            sent_lp[i] = lp_to
            made = make_chunk(i, st, delta, lp_from, lp_to, finish_reason(st) if st.finished else None)
            for chunk in (made if isinstance(made, list) else [made] if made is not None else []):
                if continuous_usage:
                    chunk["usage"] = usage_fn(states)
                yield sse(chunk)
        if include_usage:
            yield sse(usage_chunk(await asyncio.to_thread(usage_fn, states)))
    except ServiceUnavailable as e:
        yield sse(error_event(str(e), 503, "ServiceUnavailableError"))
    finally:
        await tm.release(states)
    yield b"data: [DONE]\n\n"
