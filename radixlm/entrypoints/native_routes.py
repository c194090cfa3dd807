"""SGLang's native routes: /generate, the health checks, model and server info, /get_load (what
sglang-router polls), /flush_cache, /abort_request, /separate_reasoning and /metrics. Each handler finds the
TokenizerManager in `request.app.state.tm`.

A request's path: JSON body -> `tm.build` on a worker thread (tokenizing and grammar checks never
run on the event loop; a bad field is a ValueError, hence 400) -> `tm.submit` -> wait (abandoned,
and the request aborted, when the client goes away) or stream SSE chunks -> JSON.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, AsyncIterator, Dict, List, Optional

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from radixlm import __version__
from radixlm.entrypoints.http_responses import error_json, json_body, sse
from radixlm.entrypoints.openai.reasoning_parser import separate_reasoning, starts_in_reasoning
from radixlm.managers.tokenizer_manager import ReqState, ServiceUnavailable, TokenizerManager

logger = logging.getLogger("radixlm.entrypoints.http_server")

HEALTH_TIMEOUT_S = 20.0  # SGLang's health-check deadline
DISCONNECT_POLL_S = 0.5  # how often a waiting non-streaming request checks that its client is still there


def _tm(request: Request) -> TokenizerManager:
    return request.app.state.tm


# ---------------------------------------------------------------------- generate
async def generate(request: Request):
    tm = _tm(request)
    obj = await json_body(request)
    msgs, batched = await asyncio.to_thread(tm.build, obj)  # tokenizing, grammar check: off the loop
    text_lp = bool(obj.get("return_text_in_logprobs"))
    states = await tm.submit(msgs)
    if tm.args.log_requests:
        logger.info("generate rids=%s", [m.rid for m in msgs])
    if obj.get("stream"):
        return StreamingResponse(_stream(tm, states, text_lp, batched), media_type="text/event-stream")
    task = asyncio.ensure_future(tm.wait_all(states))
    while not task.done():  # abort when the client goes away
        await asyncio.wait([task], timeout=DISCONNECT_POLL_S)
        if not task.done() and await request.is_disconnected():
            task.cancel()
            await tm.release(states)
            return Response(status_code=499)
    task.result()
    outs = [st.to_dict(text_lp, tm.decode_one) for st in states]
    for o in outs:
        fr = o["meta_info"]["finish_reason"]
        if fr and fr["type"] == "abort" and len(outs) == 1:
            return error_json(fr.get("message") or "aborted", fr.get("status_code") or 400)
    return JSONResponse(outs if batched or len(outs) > 1 else outs[0])


async def _stream(tm: TokenizerManager, states: List[ReqState], text_lp: bool, batched: bool
                  ) -> AsyncIterator[bytes]:
    try:
        async for i, st in tm.stream(states):
            d = st.to_dict(text_lp, tm.decode_one)
            if batched or len(states) > 1:
                d["index"] = i
            yield sse(d)
    except ServiceUnavailable as e:
        yield sse({"error": {"message": str(e), "code": 503}})
    yield b"data: [DONE]\n\n"


# ---------------------------------------------------------------------- health
def _unhealthy(request: Request) -> Optional[str]:
    server = getattr(request.app.state, "uvicorn_server", None)
    if server is not None and server.should_exit:
        return "the server is shutting down"
    return _tm(request).unhealthy_reason()


async def health(request: Request) -> Response:
    """Liveness without touching the scheduler's queue: a busy server is still healthy."""
    return Response(status_code=503 if _unhealthy(request) is not None else 200)


async def health_generate(request: Request) -> Response:
    """SGLang's one-token generation check (20 s deadline)."""
    if _unhealthy(request) is not None:
        return Response(status_code=503)
    tm = _tm(request)
    msgs, _ = tm.builder.build(input_ids=[0], sampling_params={"max_new_tokens": 1, "temperature": 0},
                               rid=f"HEALTH_CHECK_{time.time()}")
    states = await tm.submit(msgs)
    try:
        await asyncio.wait_for(tm.wait_all(states), HEALTH_TIMEOUT_S)
    except (asyncio.TimeoutError, ServiceUnavailable):
        return Response(status_code=503)
    return Response(status_code=200)


# ---------------------------------------------------------------------- info and control
async def model_info(request: Request):
    tm = _tm(request)
    model_path = tm.args.hub_model_id or tm.args.model_path  # the hub id the user gave, not its cache dir
    return {"model_path": model_path, "tokenizer_path": tm.args.tokenizer_path or model_path,
            "is_generation": True, "preferred_sampling_params": tm.builder.sampling_defaults or None,
            "weight_version": "default",
            "served_model_name": tm.served_model_name, "max_context_length": tm.model_config.context_len,
            "architecture": tm.model_config.architecture}


async def server_info(request: Request):
    tm = _tm(request)
    state = await tm.get_internal_state()
    info = dict(vars(tm.args))
    if info.get("api_key") is not None:
        info["api_key"] = "<redacted>"  # never echo the secret
    info.update(state)  # SGLang merges scheduler_info into the top level
    info.update({"scheduler_info": state, "internal_states": [state], "version": __version__,
                 "max_req_input_len": tm.model_config.context_len - 1,
                 "num_in_flight_requests": len(tm.states)})
    return info


async def get_load(request: Request):
    """SGLang's `GetLoadReqOutput` list, one entry per DP rank (radixlm: one), as sglang-router's load
    monitor reads it (it sums `num_tokens`; power_of_two and cache_aware's balancing use it).
    num_tokens = KV tokens held by requests (pool - free - evictable cache) + the prompt tokens of
    in-flight requests that have not produced a token yet (queued or prefilling)."""
    tm = _tm(request)
    state = await tm.get_internal_state()
    held = state["max_total_num_tokens"] - state["free_kv_tokens"] - state["evictable_kv_tokens"]
    waiting = sum(len(st.msg.input_ids) for st in list(tm.states.values()) if not st.output_ids)
    return [{"dp_rank": 0, "num_reqs": state["num_running_reqs"] + state["num_queue_reqs"],
             "num_waiting_reqs": state["num_queue_reqs"], "num_tokens": max(0, held) + waiting}]


async def flush_cache(request: Request):
    out = await _tm(request).flush_cache()
    return PlainTextResponse(out.message, status_code=200 if out.success else 400)


async def abort_request(request: Request):
    body = await json_body(request)
    await _tm(request).abort(str(body.get("rid", "")), bool(body.get("abort_all", False)))
    return Response(status_code=200)


async def separate_reasoning_route(request: Request):
    """SGLang's /separate_reasoning: {text, reasoning_parser} -> {text, reasoning_text}; the parser
    defaults to the server's --reasoning-parser. The split is the chat route's (reasoning_parser.py),
    starting inside the block where that parser's model does by default."""
    body = await json_body(request)
    text, name = body.get("text"), body.get("reasoning_parser") or _tm(request).args.reasoning_parser
    if not isinstance(text, str):
        return error_json("text: a string is required", 400)
    if name is None:
        return error_json("reasoning_parser: none given and the server has no --reasoning-parser", 400)
    try:
        in_reasoning = starts_in_reasoning(str(name), None)
    except ValueError as e:
        return error_json(f"reasoning_parser: {e}", 400)
    reasoning, answer = await asyncio.to_thread(separate_reasoning, text, str(name), in_reasoning)
    return {"text": answer, "reasoning_text": reasoning or ""}


async def metrics(request: Request):
    tm = _tm(request)
    if not tm.args.enable_metrics:
        return error_json("metrics are disabled; start the server with --enable-metrics", 404, "NotFoundError")
    state = await tm.get_internal_state()
    return PlainTextResponse(render_metrics(state, tm), media_type="text/plain; version=0.0.4")


def render_metrics(state: Dict[str, Any], tm: TokenizerManager) -> str:
    """Prometheus text format with SGLang's metric names."""
    name = tm.served_model_name
    gauges = {
        "sglang:num_running_reqs": state["num_running_reqs"],
        "sglang:num_queue_reqs": state["num_queue_reqs"],
        "sglang:token_usage": state["token_usage"],
        "sglang:cache_hit_rate": state["last_prefill_hit_rate"],
        "sglang:gen_throughput": state["last_gen_throughput"],
        "radixlm:cache_hit_rate_total": state["cache_hit_rate"],
        "radixlm:max_total_num_tokens": state["max_total_num_tokens"],
    }
    if tm.args.speculative_algorithm:  # averages over every verify step so far
        gauges["sglang:spec_accept_length"] = state["avg_spec_accept_length"]
        gauges["sglang:spec_accept_rate"] = state["spec_accept_rate"]
    counters = {  # the scheduler's counters only grow (a cache flush keeps them)
        "sglang:prompt_tokens_total": state["prefill_new_tokens"] + state["prefill_cached_tokens"],
        "sglang:cached_tokens_total": state["prefill_cached_tokens"],
        "sglang:generation_tokens_total": state["generated_tokens"],
        "sglang:num_requests_total": tm.num_requests_total,
        "sglang:num_retractions_total": state["num_retractions"],
    }
    if tm.args.speculative_algorithm:
        counters["radixlm:spec_verify_ct_total"] = state["spec_verify_ct"]
    lines = []
    for k, v in gauges.items():
        lines += [f"# TYPE {k} gauge", f'{k}{{model_name="{name}"}} {float(v)}']
    for k, v in counters.items():
        lines += [f"# TYPE {k} counter", f'{k}{{model_name="{name}"}} {float(v)}']
    return "\n".join(lines) + "\n"


ROUTES = [  # (path, handler, methods)
    ("/generate", generate, ["POST", "PUT"]),
    ("/health", health, ["GET"]),
    ("/health_generate", health_generate, ["GET"]),
    ("/get_model_info", model_info, ["GET"]),
    ("/model_info", model_info, ["GET"]),
    ("/get_server_info", server_info, ["GET"]),
    ("/server_info", server_info, ["GET"]),
    ("/get_load", get_load, ["GET"]),
    ("/flush_cache", flush_cache, ["POST"]),  # POST only: a GET (a crawler, a prefetch) must not change state
    ("/abort_request", abort_request, ["POST"]),
    ("/metrics", metrics, ["GET"]),
    ("/separate_reasoning", separate_reasoning_route, ["POST"]),
]


def register_native_routes(app: FastAPI) -> None:
    for path, handler, methods in ROUTES:
        app.add_api_route(path, handler, methods=methods)
