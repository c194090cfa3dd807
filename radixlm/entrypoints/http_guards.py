"""The HTTP surface's guards, installed on the app by `install_guards`: the body size limit (413),
the API key (401, compared in constant time), CORS (off unless `--cors-allow-origins`), and the
error handlers that give every failure OpenAI's error shape (400 for a ValueError or a validation
error, 503 when the runtime is unavailable, 404/405 for unknown routes and methods)."""

from __future__ import annotations

import hmac
from typing import List

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from starlette.exceptions import HTTPException as StarletteHTTPException

from radixlm.entrypoints.http_responses import error_json
from radixlm.managers.tokenizer_manager import ServiceUnavailable
from radixlm.server_args import ServerArgs


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


def install_guards(app: FastAPI, args: ServerArgs) -> None:
    # the last added runs first: CORS (so that 401/413 carry its headers), API key, body size
    app.add_middleware(BodySizeLimit, limit=args.max_request_body_bytes)
    if args.api_key:
        app.add_middleware(ApiKeyAuth, api_key=args.api_key)
    origins = cors_origins(args.cors_allow_origins)
    if origins:  # off unless asked for
        app.add_middleware(CORSMiddleware, allow_origins=origins, allow_credentials="*" not in origins,
                           allow_methods=["*"], allow_headers=["*"])
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(ValueError, _value_error)
    app.add_exception_handler(ServiceUnavailable, _unavailable)
    app.add_exception_handler(StarletteHTTPException, _http_error)


async def _validation_error(_req: Request, exc: RequestValidationError):
    errs = exc.errors()
    where = ".".join(str(x) for x in errs[0]["loc"] if x != "body") if errs else ""
    msg = f"{where}: {errs[0]['msg']}" if errs else str(exc)
    return error_json(msg, 400, param=where or None)


async def _value_error(_req: Request, exc: ValueError):
    return error_json(str(exc), 400)


async def _unavailable(_req: Request, exc: ServiceUnavailable):
    resp = error_json(str(exc), 503, "ServiceUnavailableError")
    if exc.retry_after is not None:  # load shedding: transient, say when to come back
        resp.headers["Retry-After"] = str(exc.retry_after)
    return resp


async def _http_error(_req: Request, exc: StarletteHTTPException):
    kinds = {404: "NotFoundError", 405: "MethodNotAllowedError"}
    resp = error_json(str(exc.detail), exc.status_code, kinds.get(exc.status_code, "HTTPError"))
    resp.headers.update(exc.headers or {})  # 405 names the allowed methods
    return resp
