"""OpenAI-compatible routes (placeholder until the OpenAI layer lands)."""


def register_openai_routes(app, tm) -> None:
    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": tm.served_model_name, "object": "model", "owned_by": "radixlm",
                                            "max_model_len": tm.model_config.context_len}]}
