"""OpenAI-compatible routes: /v1/models, /v1/completions, /v1/chat/completions.

Request bodies are validated by the pydantic models in protocol.py (a wrong type or range -> the
app's 400 handler). A `BadRequest` or the RequestBuilder's ValueError -> 400 in OpenAI's error
shape with `param` when known; ServiceUnavailable -> the app's 503 handler. The `model` field is
accepted whatever its value, as SGLang does (one model per server); responses echo it back.
"""

from __future__ import annotations

from fastapi import FastAPI, Request

from radixlm.entrypoints.http_responses import error_json
from radixlm.entrypoints.openai import common
from radixlm.entrypoints.openai.protocol import ChatCompletionRequest, CompletionRequest
from radixlm.entrypoints.openai.serving_chat import create_chat_completion
from radixlm.entrypoints.openai.serving_completions import create_completion


def register_openai_routes(app: FastAPI, tm) -> None:
    import time

    created = int(time.time())

    def card():
        return {"id": tm.served_model_name, "object": "model", "created": created, "owned_by": "sglang",
                "root": tm.served_model_name, "parent": None, "max_model_len": tm.model_config.context_len}

    def cards():
        adapters = [dict(card(), id=f"{tm.served_model_name}:{n}", root=path, parent=tm.served_model_name)
                    for n, path in sorted(tm.lora.adapters.items())]  # SGLang's "base:adapter" names
        return [card()] + adapters

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": cards()}

    @app.get("/v1/models/{model:path}")
    async def retrieve_model(model: str):
        for c in cards():
            if c["id"] == model:
                return c
        return error_json(f"The model `{model}` does not exist.", 404, "NotFoundError", param="model")

    async def answer(create, request: Request, body):
        """A bad field found while serving (ValueError naming it) becomes OpenAI's 400."""
        try:
            common.check_unicode(body.model_dump())
            return await create(request, tm, body)
        except ValueError as e:
            return error_json(str(e), 400, param=getattr(e, "param", None))

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await answer(create_completion, request, body)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        return await answer(create_chat_completion, request, body)
