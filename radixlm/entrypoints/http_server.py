"""HTTP server: SGLang's native routes plus the OpenAI-compatible ones (entrypoints/openai/).

Owns the FastAPI app, its error shapes, the HTTP surface's guards and the launch sequence
(`launch_server`): start the runtime processes, then uvicorn. Request path:
[CORS] -> API key -> body size limit -> route -> TokenizerManager.build (validation, 400 on error)
-> submit -> wait/stream -> JSON/SSE.

Guards: the API key (`--api-key`) is compared in constant time and never echoed (/get_server_info
redacts it); CORS headers only with `--cors-allow-origins`; every request body is capped at
`--max-request-body-bytes` (413, from Content-Length or while a chunked body streams in, before any
JSON parsing). `/health` is cheap (runtime alive: 200, else 503) and never queues a generation;
`/health_generate` runs the one-token check. Prometheus counters never go backwards (the
scheduler keeps its counters across a cache flush; tested).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from typing import Any, AsyncIterator, Dict, List, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

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


class BodySizeLimit:
    """ASGI middleware: a request body over `limit` bytes gets 413 before any route reads it.

    Checked from Content-Length (nothing is read) and while the body streams in (chunked bodies
    have no Content-Length): the body is buffered up to the limit, then replayed to the app."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.strip().isdigit() and int(declared) > self.limit:
            return await self._too_large(scope, receive, send)
        buffered, size = [], 0
        while True:
            msg = await receive()
            buffered.append(msg)
            if msg["type"] != "http.request":
                break  # the client went away; the app will see it
            size += len(msg.get("body", b""))
            if size > self.limit:
                return await self._too_large(scope, receive, send)
            if not msg.get("more_body", False):
                break

        async def replay():
            return buffered.pop(0) if buffered else await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, scope, receive, send):
        resp = error_json(f"Request body too large: the limit is {self.limit} bytes (max_request_body_bytes, "
                          f"--max-request-body-bytes)", 413, "RequestEntityTooLargeError", "max_request_body_bytes")
        resp.headers["connection"] = "close"  # the rest of the body is never read
        await resp(scope, receive, send)


class ApiKeyAuth:
    """ASGI middleware: 'Authorization: Bearer KEY' on every route but the health checks and
    /metrics, compared in constant time."""

    OPEN_PATHS = ("/health", "/health_generate", "/metrics")

    def __init__(self, app, api_key: str):
        self.app, self.expected = app, f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] not in self.OPEN_PATHS:
            got = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(got, self.expected):
                resp = error_json("Unauthorized: a valid API key is required", 401, "AuthenticationError")
                return await resp(scope, receive, send)
        await self.app(scope, receive, send)


def cors_origins(value) -> List[str]:
    """--cors-allow-origins: comma-separated origins, or '*'."""
    return [o.strip() for o in (value or "").split(",") if o.strip()]


def create_app(tm: TokenizerManager) -> FastAPI:
    args = tm.args
    app = FastAPI(title="radixlm", version=__version__)
    app.state.tm = tm
    # the last added runs first: CORS (so that 401/413 carry its headers), API key, body size
    app.add_middleware(BodySizeLimit, limit=args.max_request_body_bytes)
    if args.api_key:
        app.add_middleware(ApiKeyAuth, api_key=args.api_key)
    origins = cors_origins(args.cors_allow_origins)
    if origins:  # off unless asked for
        app.add_middleware(CORSMiddleware, allow_origins=origins, allow_credentials="*" not in origins,
                           allow_methods=["*"], allow_headers=["*"])

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

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_req: Request, exc: StarletteHTTPException):
        kinds = {404: "NotFoundError", 405: "MethodNotAllowedError"}
        resp = error_json(str(exc.detail), exc.status_code, kinds.get(exc.status_code, "HTTPError"))
        resp.headers.update(exc.headers or {})  # 405 names the allowed methods
        return resp

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
        msgs, batched = await asyncio.to_thread(tm.build, obj)  # tokenizing, grammar check: off the loop
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
    def _unhealthy() -> Optional[str]:
        server = getattr(app.state, "uvicorn_server", None)
        if server is not None and server.should_exit:
            return "the server is shutting down"
        return tm.unhealthy_reason()

    async def health() -> Response:
        """Liveness without touching the scheduler's queue: a busy server is still healthy."""
        return Response(status_code=503 if _unhealthy() is not None else 200)

    async def health_generate() -> Response:
        """SGLang's one-token generation check (20 s deadline)."""
        if _unhealthy() is not None:
            return Response(status_code=503)
        msgs, _ = tm.builder.build(input_ids=[0], sampling_params={"max_new_tokens": 1, "temperature": 0},
                                   rid=f"HEALTH_CHECK_{time.time()}")
        states = await tm.submit(msgs)
        try:
            await asyncio.wait_for(tm.wait_all(states), HEALTH_TIMEOUT_S)
        except (asyncio.TimeoutError, ServiceUnavailable):
            return Response(status_code=503)
        return Response(status_code=200)

    app.add_api_route("/health", health, methods=["GET"])
    app.add_api_route("/health_generate", health_generate, methods=["GET"])

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
        if info.get("api_key") is not None:
            info["api_key"] = "<redacted>"  # never echo the secret
        info.update(state)  # SGLang merges scheduler_info into the top level
        info.update({"scheduler_info": state, "internal_states": [state], "version": __version__,
                     "max_req_input_len": tm.model_config.context_len - 1,
                     "num_in_flight_requests": len(tm.states)})
        return info

    app.add_api_route("/get_server_info", server_info, methods=["GET"])
    app.add_api_route("/server_info", server_info, methods=["GET"])

    @app.post("/flush_cache")  # POST only: a GET (a crawler, a prefetch) must not change state
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
    counters = {  # the scheduler's counters only grow (a cache flush keeps them)
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
    app.state.uvicorn_server = server  # /health answers 503 once it is shutting down

    @app.on_event("startup")
    async def _ready():
        logger.info("The server is fired up and ready to roll! http://%s:%d (model %s, %d KV tokens)",
                    args.host, args.port, tm.served_model_name, tm.server_info.get("max_total_num_tokens", 0))

    try:
        server.run()
    finally:
        tm.shutdown()
