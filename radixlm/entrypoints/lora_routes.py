"""HTTP routes of multi-LoRA serving: `/load_lora_adapter` {lora_name, lora_path} and
`/unload_lora_adapter` {lora_name}, with SGLang's answer {success, error_message, loaded_adapters};
a bad adapter, an unknown name or an adapter in use is a 400 naming the problem (radixlm/lora/server.py
does the work).
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from radixlm.entrypoints.http_responses import json_body
from radixlm.lora.server import load_lora_adapter, unload_lora_adapter


async def _run(request: Request, fn):
    tm = request.app.state.tm
    try:
        out = await fn(tm, await json_body(request))
    except ValueError as e:  # LoRAError, or a body that is not a JSON object
        return JSONResponse({"success": False, "error_message": str(e), "loaded_adapters": tm.lora.adapters},
                            status_code=400)
    return JSONResponse({"success": out.success, "error_message": out.error_message,
                         "loaded_adapters": tm.lora.adapters}, status_code=200 if out.success else 400)


async def load(request: Request):
    return await _run(request, load_lora_adapter)


async def unload(request: Request):
    return await _run(request, unload_lora_adapter)


def register_lora_routes(app: FastAPI) -> None:
    app.add_api_route("/load_lora_adapter", load, methods=["POST"])
    app.add_api_route("/unload_lora_adapter", unload, methods=["POST"])
