"""`EngineBackend`: programs on an in-process `radixlm.Engine`, with the same requests (and so
the same prefix caching and select scoring) as `RuntimeEndpoint` sends over HTTP."""

from __future__ import annotations

from typing import Any, Dict, Iterator, Optional

from radixlm.lang.backend.base import BackendError
from radixlm.lang.backend.native import NativeBackend
from radixlm.lang.chat_template import CHATML, ChatTemplate, from_tokenizer


class EngineBackend(NativeBackend):
    def __init__(self, engine=None, chat_template_name: Optional[str] = None, **engine_kwargs):
        """`engine`: a radixlm.Engine; without one, an Engine is built from engine_kwargs
        (model_path=..., ...) and shut down by `shutdown()`."""
        self._owns_engine = engine is None
        if engine is None:
            from radixlm.entrypoints.engine import Engine

            engine = Engine(**engine_kwargs)
        self.engine = engine
        self.tokenizer = engine.tokenizer
        if chat_template_name is not None and chat_template_name.lower() in ("chatml", "default"):
            self.chat_template = CHATML
        else:
            self.chat_template = from_tokenizer(self.tokenizer, chat_template_name)
        self._text_cache: Dict[int, str] = {}

    # ------------------------------------------------------------------ transport
    def _kwargs(self, body: Dict[str, Any]) -> Dict[str, Any]:
        start = body.get("logprob_start_len")
        return {"prompt": body.get("text"), "input_ids": body.get("input_ids"),
                "sampling_params": body.get("sampling_params"),
                "return_logprob": bool(body.get("return_logprob")),
                "top_logprobs_num": body.get("top_logprobs_num") or 0,
                "logprob_start_len": -1 if start is None else start}

    def _token_text(self, tid: int) -> Optional[str]:
        if self.tokenizer is None:
            return None
        t = self._text_cache.get(tid)
        if t is None:
            t = self._text_cache[tid] = self.tokenizer.decode([tid])
        return t

    def _fix(self, out: Dict[str, Any], with_text: bool) -> Dict[str, Any]:
        """The engine's dict in the HTTP response's shape: [lp, id, text] lists."""
        meta = out["meta_info"]

        def row(e):
            return [e[0], e[1], self._token_text(e[1]) if with_text else None]

        for key in ("input_token_logprobs", "output_token_logprobs"):
            if key in meta:
                meta[key] = [row(e) for e in meta[key]]
        for key in ("input_top_logprobs", "output_top_logprobs"):
            if key in meta:
                meta[key] = [None if tops is None else [row(e) for e in tops] for tops in meta[key]]
        return out

    def _generate(self, body: Dict[str, Any]) -> Any:
        try:
            out = self.engine.generate(**self._kwargs(body))
        except ValueError as e:
            raise BackendError(str(e)) from e
        with_text = bool(body.get("return_text_in_logprobs"))
        if isinstance(out, list):
            return [self._fix(o, with_text) for o in out]
        return self._fix(out, with_text)

    def _generate_stream(self, body: Dict[str, Any]) -> Iterator[Dict[str, Any]]:
        """The engine streams increments; the HTTP API (and this method) gives cumulative text."""
        try:
            it = self.engine.generate(stream=True, **self._kwargs(body))
        except ValueError as e:
            raise BackendError(str(e)) from e
        text, ids = "", []
        for chunk in it:
            text += chunk["text"]
            ids.extend(chunk["output_ids"])
            yield {"text": text, "output_ids": list(ids), "meta_info": chunk["meta_info"]}

    # ------------------------------------------------------------------ rest
    def get_chat_template(self) -> ChatTemplate:
        return self.chat_template

    def flush_cache(self) -> bool:
        return self.engine.flush_cache()

    def get_server_info(self) -> Dict[str, Any]:
        return self.engine.get_server_info()

    def shutdown(self) -> None:
        if self._owns_engine:
            self.engine.shutdown()

    def __repr__(self) -> str:
        return f"EngineBackend({self.engine.server_args.model_path!r})"
