"""Pydantic request models of the OpenAI-compatible API (SGLang's field names and defaults).

Unknown fields are ignored, as OpenAI does; a field of the wrong type or out of range fails FastAPI's
body validation, which the app answers with a 400 in OpenAI's error shape (param = the field path).
Checks that need the model (context length, vocabulary) happen later, in the RequestBuilder.
"""

from __future__ import annotations

from typing import Any, Dict, List, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", protected_namespaces=())


class StreamOptions(_Model):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class ResponseFormat(_Model):
    """{"type": "text" | "json_object" | "json_schema", "json_schema": {"name", "schema", "strict"}};
    SGLang also takes the schema at the top level ({"type": "json_schema", "schema": {...}})."""

    model_config = ConfigDict(extra="allow")
    type: str = "text"
    json_schema: Optional[Dict[str, Any]] = None


class SamplingFields(_Model):
    """Fields shared by /v1/completions and /v1/chat/completions (None = the default)."""

    model: Optional[str] = None
    temperature: Optional[float] = Field(None, ge=0)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    top_k: Optional[int] = None
    min_p: Optional[float] = Field(None, ge=0, le=1)
    n: Optional[int] = Field(None, ge=1)  # at most --max-n (common.check_limits)
    seed: Optional[int] = Field(None, ge=-(2 ** 63), le=2 ** 63 - 1)  # int64, as OpenAI
    stop: Optional[Union[str, List[str]]] = None
    stop_token_ids: Optional[List[int]] = None
    frequency_penalty: Optional[float] = Field(None, ge=-2, le=2)
    presence_penalty: Optional[float] = Field(None, ge=-2, le=2)
    repetition_penalty: Optional[float] = Field(None, gt=0, le=2)
    logit_bias: Optional[Dict[str, float]] = None
    min_tokens: Optional[int] = Field(None, ge=0)
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    no_stop_trim: bool = False
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None
    rid: Optional[str] = None
    response_format: Optional[ResponseFormat] = None
    # constrained decoding (SGLang extensions), at most one of them or response_format
    regex: Optional[str] = None
    json_schema: Optional[Any] = None
    ebnf: Optional[str] = None
    # SGLang's request extensions (reference section 4), treated as on /generate (managers/sglang_fields.py)
    stop_regex: Optional[Union[str, List[str]]] = None
    custom_params: Optional[Dict[str, Any]] = None
    extra_key: Optional[str] = None  # with cache_salt: a separate radix-cache namespace
    cache_salt: Optional[str] = None
    priority: Optional[int] = None  # --enable-priority-scheduling
    # features radixlm lacks: accepted at their default (null / false / empty), else a 400 naming them
    lora_path: Optional[Any] = None
    session_params: Optional[Any] = None
    return_hidden_states: Optional[Any] = None
    bootstrap_host: Optional[Any] = None
    bootstrap_port: Optional[Any] = None
    bootstrap_room: Optional[Any] = None
    routed_dp_rank: Optional[Any] = None
    data_parallel_rank: Optional[Any] = None


class CompletionRequest(SamplingFields):
    prompt: Any  # str | [str] | [int] | [[int]], checked below for a clear message
    max_tokens: Optional[int] = Field(16, ge=0)
    logprobs: Optional[int] = Field(None, ge=0, le=20)
    echo: bool = False
    suffix: Optional[str] = None
    best_of: Optional[int] = Field(None, ge=1)

    @field_validator("prompt")
    @classmethod
    def _prompt_form(cls, v: Any) -> Any:
        def ints(x: Any) -> bool:
            return isinstance(x, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)

        if isinstance(v, str) or (isinstance(v, list) and v and (
                all(isinstance(p, str) for p in v) or ints(v) or all(ints(p) for p in v))):
            return v
        if isinstance(v, list) and not v:
            raise ValueError("the prompt list is empty")
        raise ValueError("must be a string, a list of strings, a list of token ids or a list of such lists")


class ContentPart(_Model):
    type: str
    text: Optional[str] = None


class ChatMessage(_Model):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Optional[Union[str, List[ContentPart]]] = None
    name: Optional[str] = None
    tool_calls: Optional[List[Dict[str, Any]]] = None
    tool_call_id: Optional[str] = None
    reasoning_content: Optional[str] = None  # an assistant turn's thinking (templates such as Qwen3's read it)


class ChatCompletionRequest(SamplingFields):
    messages: List[ChatMessage] = Field(..., min_length=1)
    max_tokens: Optional[int] = Field(None, ge=0)  # deprecated by OpenAI; max_completion_tokens wins
    max_completion_tokens: Optional[int] = Field(None, ge=0)
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=20)
    tools: Optional[List[Dict[str, Any]]] = None
    tool_choice: Optional[Union[str, Dict[str, Any]]] = None
    parallel_tool_calls: Optional[bool] = None  # None = true (OpenAI's default)
    functions: Optional[List[Dict[str, Any]]] = None
    function_call: Optional[Union[str, Dict[str, Any]]] = None
    chat_template_kwargs: Optional[Dict[str, Any]] = None
    # with --reasoning-parser: the think block goes to reasoning_content (false: the text is left as is),
    # streamed as it comes (stream_reasoning false: in one delta when the block closes)
    separate_reasoning: bool = True
    stream_reasoning: bool = True
    # OpenAI's: "none" turns a qwen3-style model's thinking off, other levels on (reasoning_parser.py)
    reasoning_effort: Optional[Literal["none", "minimal", "low", "medium", "high"]] = None
