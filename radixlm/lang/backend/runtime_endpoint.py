"""`RuntimeEndpoint`: a radixlm (or SGLang) server driven over its native HTTP API.

Traffic (the calls SGLang's frontend makes): GET /get_model_info once at start; POST /generate for
gen (stream: SSE with cumulative text, ending at `data: [DONE]`), select and prefix caching (see
native.py); POST /flush_cache; GET /get_server_info. Any status other than 200 raises BackendError
with the server's message; an unreachable server raises BackendConnectionError (a ConnectionError).
"""

from __future__ import annotations

import json
import logging
import os
import threading
from typing import Any, Dict, Iterator, Optional

from radixlm.lang.backend.base import BackendConnectionError, BackendError
from radixlm.lang.backend.native import NativeBackend
from radixlm.lang.chat_template import CHATML, ChatTemplate, from_tokenizer

logger = logging.getLogger(__name__)


class RuntimeEndpoint(NativeBackend):
    def __init__(self, base_url: str, api_key: Optional[str] = None, verify: Any = None,
                 chat_template_name: Optional[str] = None, timeout: Optional[float] = None,
                 connect_timeout: float = 10.0):
        import requests  # noqa: F401 - fail early when the client library is missing

        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.verify = verify
        self.timeout = (connect_timeout, timeout)
        self._local = threading.local()
        r = self._request("GET", "/get_model_info")
        self.model_info = r.json()
        self.chat_template = self._load_chat_template(chat_template_name)

    # ------------------------------------------------------------------ transport
    def _session(self):
        import requests

        sess = getattr(self._local, "session", None)
        if sess is None:
            sess = self._local.session = requests.Session()
        return sess

    def _headers(self) -> Dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def _request(self, method: str, path: str, body: Any = None, stream: bool = False):
        import requests

        url = self.base_url + path
        kw: Dict[str, Any] = {"headers": self._headers(), "timeout": self.timeout, "stream": stream}
        if self.verify is not None:
            kw["verify"] = self.verify
        if body is not None:
            kw["json"] = body
        try:
            r = self._session().request(method, url, **kw)
        except (requests.ConnectionError, requests.Timeout) as e:
            raise BackendConnectionError(
                f"cannot reach the radixlm server at {self.base_url} ({type(e).__name__}); "
                "is it running?") from e
        if r.status_code != 200:
            text = r.text
            r.close()
            raise BackendError(f"{method} {path} failed with HTTP {r.status_code}: {text}")
        return r

    def _generate(self, body: Dict[str, Any]) -> Any:
        return self._request("POST", "/generate", body).json()

    def _generate_stream(self, body: Dict[str, Any]) -> Iterator[Dict[str, Any]]:
        import requests

        r = self._request("POST", "/generate", body, stream=True)
        try:
            for line in r.iter_lines(chunk_size=None, decode_unicode=False):
                if not line:
                    continue
                line = line.decode("utf-8") if isinstance(line, bytes) else line
                if not line.startswith("data:"):
                    continue
                payload = line[5:].strip()
                if payload == "[DONE]":
                    return
                yield json.loads(payload)
        except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError) as e:
            raise BackendConnectionError(f"the radixlm server at {self.base_url} closed the stream: {e}") from e
        finally:
            r.close()
        raise BackendConnectionError(f"the stream from {self.base_url} ended without [DONE]")

    # ------------------------------------------------------------------ chat template
    def _load_chat_template(self, name: Optional[str]) -> ChatTemplate:
        if name is not None and name.lower() in ("chatml", "default"):
            return CHATML
        path = self.model_info.get("tokenizer_path") or self.model_info.get("model_path")
        if path and os.path.isdir(path):
            try:
                from transformers import AutoTokenizer

                self.tokenizer = AutoTokenizer.from_pretrained(path)
                return from_tokenizer(self.tokenizer, name)
            except Exception as e:  # noqa: BLE001 - a tokenizer we cannot load: ChatML
                logger.warning("could not load the tokenizer at %s (%s); using ChatML roles", path, e)
                self.tokenizer = None
        return CHATML

    def get_chat_template(self) -> ChatTemplate:
        return self.chat_template

    # ------------------------------------------------------------------ admin
    def flush_cache(self) -> str:
        return self._request("POST", "/flush_cache", {"empty_cache": True}).text

    def get_server_info(self) -> Dict[str, Any]:
        return self._request("GET", "/get_server_info").json()

    def get_model_info(self) -> Dict[str, Any]:
        return dict(self.model_info)

    def __repr__(self) -> str:
        return f"RuntimeEndpoint({self.base_url!r})"
