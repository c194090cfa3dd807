"""HTTP server: SGLang's native routes plus the OpenAI-compatible ones (entrypoints/openai/).

Owns the FastAPI app, its error shapes, the optional API key, and the launch sequence
(`launch_server`): start the runtime processes, then uvicorn. Request path:
route -> TokenizerManager.build (validation, 400 on error) -> submit -> wait/stream -> JSON/SSE.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any, AsyncIterator, Dict, List

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from radixlm import __version__
from radixlm.managers.tokenizer_manager import ReqState, ServiceUnavailable, TokenizerManager
from radixlm.server_args import ServerArgs

logger = logging.getLogger(__name__)

HEALTH_TIMEOUT_S = 20.0
GRACEFUL_SHUTDOWN_S = 5  # open streams get this long after Ctrl-C / SIGTERM, then the server exits


def error_json(message: str, status: int, err_type: str = "BadRequestError", param=None) -> JSONResponse:
    """OpenAI's error shape (used by every route)."""
    return JSONResponse(status_code=status, content={
        "object": "error", "message": message, "type": err_type, "param": param, "code": status,
        "error": {"message": message, "type": err_type, "param": param, "code": status}})


def sse(data: Any) -> bytes:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


def create_app(tm: TokenizerManager) -> FastAPI:
    args = tm.args
    app = FastAPI(title="radixlm", version=__version__)
    app.state.tm = tm
    app.add_middleware(CORSMiddleware, allow_origins=["*"], allow_credentials=True, allow_methods=["*"],
                       allow_headers=["*"])

    @app.exception_handler(RequestValidationError)
    async def _validation(_req: Request, exc: RequestValidationError):
        errs = exc.errors()
        where = ".".join(str(x) for x in errs[0]["loc"] if x != "body") if errs else ""
        msg = f"{where}: {errs[0]['msg']}" if errs else str(exc)
        return error_json(msg, 400, param=where or None)

    @app.exception_handler(ValueError)
    async def _value_error(_req: Request, exc: ValueError):
        return error_json(str(exc), 400)

    @app.exception_handler(ServiceUnavailable)
    async def _unavailable(_req: Request, exc: ServiceUnavailable):
        return error_json(str(exc), 503, "ServiceUnavailableError")

    if args.api_key:
        @app.middleware("http")
        async def _auth(request: Request, call_next):
            if request.url.path not in ("/health", "/health_generate", "/metrics") and \
                    request.headers.get("authorization") != f"Bearer {args.api_key}":
                return error_json("Unauthorized: a valid API key is required", 401, "AuthenticationError")
            return await call_next(request)

    @app.on_event("startup")
    async def _startup():
        tm.connect()

    # ------------------------------------------------------------------ native generate
    async def _json_body(request: Request) -> Dict[str, Any]:
        try:
            body = await request.json()
        except Exception:  # noqa: BLE001
            raise ValueError("The request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise ValueError("The request body must be a JSON object")
        return body

    @app.api_route("/generate", methods=["POST", "PUT"])
    async def generate(request: Request):
        obj = await _json_body(request)
        msgs, batched = tm.build(obj)
        text_lp = bool(obj.get("return_text_in_logprobs"))
        states = await tm.submit(msgs)
        if args.log_requests:
            logger.info("generate rids=%s", [m.rid for m in msgs])
        if obj.get("stream"):
            return StreamingResponse(_stream_native(request, states, text_lp, batched),
                                     media_type="text/event-stream")
        task = asyncio.ensure_future(tm.wait_all(states))
        while not task.done():  # abort when the client goes away
            await asyncio.wait([task], timeout=0.5)
            if not task.done() and await request.is_disconnected():
                task.cancel()
                await tm.release(states)
                return Response(status_code=499)
        task.result()
        outs = [st.to_dict(text_lp, tm.decode_one) for st in states]
        for o in outs:
            fr = o["meta_info"]["finish_reason"]
            if fr and fr["type"] == "abort" and len(outs) == 1:
                return error_json(fr.get("message") or "aborted", 400)
        return JSONResponse(outs if batched or len(outs) > 1 else outs[0])

    async def _stream_native(request: Request, states: List[ReqState], text_lp: bool, batched: bool
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

    # ------------------------------------------------------------------ health and info
    async def _health_generate() -> Response:
        if tm.dead_reason is not None:
            return Response(status_code=503)
        msgs, _ = tm.builder.build(input_ids=[0], sampling_params={"max_new_tokens": 1, "temperature": 0},
                                   rid=f"HEALTH_CHECK_{time.time()}")
        states = await tm.submit(msgs)
        try:
            await asyncio.wait_for(tm.wait_all(states), HEALTH_TIMEOUT_S)
        except (asyncio.TimeoutError, ServiceUnavailable):
            return Response(status_code=503)
        return Response(status_code=200)

    app.add_api_route("/health", _health_generate, methods=["GET"])
    app.add_api_route("/health_generate", _health_generate, methods=["GET"])

    async def model_info():
        return {"model_path": args.model_path, "tokenizer_path": args.resolved_tokenizer_path,
                "is_generation": True, "preferred_sampling_params": None, "weight_version": "default",
                "served_model_name": tm.served_model_name, "max_context_length": tm.model_config.context_len,
                "architecture": tm.model_config.architecture}

    app.add_api_route("/get_model_info", model_info, methods=["GET"])
    app.add_api_route("/model_info", model_info, methods=["GET"])

    async def server_info():
        state = await tm.get_internal_state()
        info = {k: v for k, v in vars(args).items()}
        info.update(state)  # SGLang merges scheduler_info into the top level
        info.update({"scheduler_info": state, "internal_states": [state], "version": __version__,
                     "max_req_input_len": tm.model_config.context_len - 1,
                     "num_in_flight_requests": len(tm.states)})
        return info

    app.add_api_route("/get_server_info", server_info, methods=["GET"])
    app.add_api_route("/server_info", server_info, methods=["GET"])

    @app.api_route("/flush_cache", methods=["GET", "POST"])
    async def flush_cache():
        out = await tm.flush_cache()
        return PlainTextResponse(out.message, status_code=200 if out.success else 400)

    @app.post("/abort_request")
    async def abort_request(request: Request):
        body = await _json_body(request)
        await tm.abort(str(body.get("rid", "")), bool(body.get("abort_all", False)))
        return Response(status_code=200)

    @app.get("/metrics")
    async def metrics():
        if not args.enable_metrics:
            return error_json("metrics are disabled; start the server with --enable-metrics", 404, "NotFoundError")
        state = await tm.get_internal_state()
        return PlainTextResponse(render_metrics(state, tm), media_type="text/plain; version=0.0.4")

    from radixlm.entrypoints.openai.routes import register_openai_routes

    register_openai_routes(app, tm)
    return app


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
    counters = {
        "sglang:prompt_tokens_total": state["prefill_new_tokens"] + state["prefill_cached_tokens"],
        "sglang:cached_tokens_total": state["prefill_cached_tokens"],
        "sglang:generation_tokens_total": state["generated_tokens"],
        "sglang:num_requests_total": tm.num_requests_total,
        "sglang:num_retractions_total": state["num_retractions"],
    }
    lines = []
    for k, v in gauges.items():
        lines += [f"# TYPE {k} gauge", f'{k}{{model_name="{name}"}} {float(v)}']
    for k, v in counters.items():
        lines += [f"# TYPE {k} counter", f'{k}{{model_name="{name}"}} {float(v)}']
    return "\n".join(lines) + "\n"


def launch_server(args: ServerArgs) -> None:
    import uvicorn

    logging.basicConfig(level=args.log_level.upper(), format="[%(asctime)s] %(message)s")
    tm = TokenizerManager(args)
    tm.launch()
    app = create_app(tm)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level.lower(),
                            timeout_keep_alive=5, timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)
    server = uvicorn.Server(config)

    @app.on_event("startup")
    async def _ready():
        logger.info("The server is fired up and ready to roll! http://%s:%d (model %s, %d KV tokens)",
                    args.host, args.port, tm.served_model_name, tm.server_info.get("max_total_num_tokens", 0))

    try:
        server.run()
    finally:
        tm.shutdown()
