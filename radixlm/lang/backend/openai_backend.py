"""`OpenAI`: programs on an OpenAI-compatible endpoint (OpenAI itself, or radixlm's /v1).

Chat models (the default): a gen must start an assistant turn (`rl.assistant(rl.gen(...))` or
after `rl.assistant_begin()`); the closed turns (`s.messages()`) are sent to /chat/completions and
the reply is the gen's text. With `is_chat_model=False`, /completions gets the raw text instead.

`regex` and other non-OpenAI sampling fields (top_k, min_p, ignore_eos) go in the request body's
extra fields, which radixlm and SGLang servers understand; `json_schema` becomes a standard
`response_format` of type json_schema.

select: the API cannot score arbitrary continuations, so select is constrained generation: one
greedy request whose `regex` is the alternation of the (escaped) choices. When the endpoint
rejects the `regex` field (HTTP 400/422: e.g. api.openai.com), it is remembered and select falls
back to an unconstrained greedy reply mapped to the closest choice (exact match, then prefix or
containment, then difflib similarity). Meta info says which path decided (`method`) and holds the
raw reply; there are no per-choice log-probability scores on this backend.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
from typing import Any, Dict, Iterator, List, Optional, Tuple

from radixlm.lang.backend.base import BackendConnectionError, BackendError, BaseBackend
from radixlm.lang.chat_template import CHATML, ChatTemplate
from radixlm.lang.choices import ChoicesDecision

logger = logging.getLogger(__name__)

_REGEX_META = set(r"\.^$|?*+()[]{}/-")


def regex_escape(text: str) -> str:
    return "".join("\\" + ch if ch in _REGEX_META else ch for ch in text)


def closest_choice(text: str, choices: List[str]) -> Tuple[int, List[float]]:
    t = text.strip()
    sims = [difflib.SequenceMatcher(None, t.lower(), c.lower()).ratio() for c in choices]
    for i, c in enumerate(choices):
        if t == c:
            return i, sims
    for i, c in enumerate(choices):
        if t and (t.startswith(c) or c.startswith(t)):
            return i, sims
    for i, c in enumerate(choices):
        if c in t:
            return i, sims
    return max(range(len(choices)), key=lambda i: sims[i]), sims


class OpenAI(BaseBackend):
    def __init__(self, model_name: str = "gpt-4o-mini", base_url: Optional[str] = None,
                 api_key: Optional[str] = None, is_chat_model: bool = True,
                 chat_template: Optional[ChatTemplate] = None, **client_kwargs: Any):
        try:
            import openai
        except ImportError as e:  # pragma: no cover - the test extra installs it
            raise ImportError("the OpenAI backend needs the openai package (pip install openai)") from e
        self._openai = openai
        self.model_name = model_name
        self.is_chat_model = is_chat_model
        self.client = openai.OpenAI(base_url=base_url, api_key=api_key or os.environ.get("OPENAI_API_KEY", "EMPTY"),
                                    **client_kwargs)
        self.chat_template = chat_template or CHATML
        self.regex_supported: Optional[bool] = None  # learned on the first select

    def get_chat_template(self) -> ChatTemplate:
        return self.chat_template

    # ------------------------------------------------------------------ requests
    def _messages(self, s) -> List[Dict[str, Any]]:
        if s.cur_role != "assistant" or s.text_[s.cur_role_begin_pos:]:
            raise ValueError("OpenAI chat backend: a gen must start an assistant turn "
                             "(rl.assistant(rl.gen(...))); use is_chat_model=False for raw completions")
        if not s.messages_:
            raise ValueError("OpenAI chat backend: no messages before the assistant turn")
        return [dict(m) for m in s.messages_]

    def _params(self, sampling, stream: bool) -> Dict[str, Any]:
        p: Dict[str, Any] = {"model": self.model_name, "max_tokens": sampling.max_new_tokens,
                             "temperature": sampling.temperature, "top_p": sampling.top_p, "stream": stream}
        if sampling.frequency_penalty:
            p["frequency_penalty"] = sampling.frequency_penalty
        if sampling.presence_penalty:
            p["presence_penalty"] = sampling.presence_penalty
        stops = [x for x in (sampling.stop or []) if x not in self.chat_template.stop_str]
        if stops:
            p["stop"] = stops[:4]
        extra: Dict[str, Any] = {}
        if sampling.top_k not in (None, -1):
            extra["top_k"] = sampling.top_k
        if sampling.min_p:
            extra["min_p"] = sampling.min_p
        if sampling.ignore_eos:
            extra["ignore_eos"] = True
        if sampling.regex is not None:
            extra["regex"] = sampling.regex
        if sampling.json_schema is not None:
            p["response_format"] = {"type": "json_schema",
                                    "json_schema": {"name": "output", "schema": json.loads(sampling.json_schema)}}
        if extra:
            p["extra_body"] = extra
        return p

    def _call(self, s, params: Dict[str, Any]):
        try:
            if self.is_chat_model:
                return self.client.chat.completions.create(messages=self._messages(s), **params)
            return self.client.completions.create(prompt=s.text_, **params)
        except self._openai.APIConnectionError as e:
            raise BackendConnectionError(f"cannot reach the OpenAI-compatible endpoint {self.client.base_url}: {e}"
                                         ) from e
        except self._openai.APIStatusError as e:
            raise BackendError(f"HTTP {e.status_code}: {e.message}") from e

    @staticmethod
    def _meta(resp, choice) -> Dict[str, Any]:
        usage = getattr(resp, "usage", None)
        details = getattr(usage, "prompt_tokens_details", None) if usage else None
        return {"id": getattr(resp, "id", None),
                "finish_reason": getattr(choice, "finish_reason", None),
                "prompt_tokens": getattr(usage, "prompt_tokens", None),
                "completion_tokens": getattr(usage, "completion_tokens", None),
                "cached_tokens": getattr(details, "cached_tokens", None) if details else None}

    def generate(self, s, sampling) -> Tuple[str, Dict[str, Any]]:
        resp = self._call(s, self._params(sampling, stream=False))
        choice = resp.choices[0]
        text = choice.message.content if self.is_chat_model else choice.text
        return text or "", self._meta(resp, choice)

    def generate_stream(self, s, sampling) -> Iterator[Tuple[str, Dict[str, Any]]]:
        params = self._params(sampling, stream=True)
        stream = self._call(s, params)
        meta: Dict[str, Any] = {}
        for chunk in stream:
            if not chunk.choices:
                continue
            c = chunk.choices[0]
            delta = (c.delta.content if self.is_chat_model else c.text) or ""
            meta = {"id": chunk.id, "finish_reason": c.finish_reason}
            yield delta, meta

    def select(self, s, choices: List[str], temperature: float, choices_method: Any) -> ChoicesDecision:
        from radixlm.lang.ir import SamplingDefaults

        budget = max(len(c) for c in choices) + 8  # a token covers at least one character
        sampling = SamplingDefaults(max_new_tokens=budget, temperature=0.0, stop=[])
        method = "generate_closest"
        if self.regex_supported is not False:
            sampling.regex = "(" + "|".join(regex_escape(c) for c in choices) + ")"
            try:
                text, meta = self.generate(s, sampling)
                method = "regex"
                self.regex_supported = True
            except BackendError as e:
                cause = e.__cause__
                if getattr(cause, "status_code", None) not in (400, 422):
                    raise
                logger.info("the endpoint rejects `regex` (%s); select falls back to the closest choice", e)
                self.regex_supported = False
                sampling.regex = None
        if sampling.regex is None:
            text, meta = self.generate(s, sampling)
        if text in choices:
            i, sims = choices.index(text), None
        else:
            i, sims = closest_choice(text, choices)
            method = "generate_closest"
        meta = dict(meta)
        meta.update({"method": method, "raw_text": text, "choices": list(choices), "decision_index": i})
        if sims is not None:
            meta["similarities"] = sims
        return ChoicesDecision(choices[i], meta)

    def __repr__(self) -> str:
        return f"OpenAI({self.model_name!r}, base_url={str(self.client.base_url)!r})"
