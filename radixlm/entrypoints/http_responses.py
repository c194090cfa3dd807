"""HTTP response helpers shared by the native and OpenAI routes: OpenAI's error shape, server-sent
events, and reading a JSON-object body (a ValueError, hence a 400, when it is not one)."""

from __future__ import annotations

import json
from typing import Any, Dict

from fastapi import Request
from fastapi.responses import JSONResponse


def error_json(message: str, status: int, err_type: str = "BadRequestError", param=None) -> JSONResponse:
    """OpenAI's error shape (used by every route)."""
    if status == 503 and err_type == "BadRequestError":
        err_type = "ServiceUnavailableError"
    return JSONResponse(status_code=status, content={
        "object": "error", "message": message, "type": err_type, "param": param, "code": status,
        "error": {"message": message, "type": err_type, "param": param, "code": status}})


def sse(data: Any) -> bytes:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


async def json_body(request: Request) -> Dict[str, Any]:
    try:
        body = await request.json()
    except Exception:  # noqa: BLE001
        raise ValueError("The request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise ValueError("The request body must be a JSON object")
    return body
