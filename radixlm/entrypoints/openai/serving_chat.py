"""POST /v1/chat/completions: messages -> the tokenizer's chat template -> token ids -> generate.

The template output already holds the special tokens, so it is encoded with add_special_tokens=False.
Streaming sends, per choice, a first chunk `delta: {role: assistant, content: ""}`, then content
deltas; the last chunk of a choice carries its finish_reason. response_format json_object /
json_schema constrain decoding through the grammar backend; tools are refused with a 400 (no
tool-call parser yet) rather than silently ignored.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from radixlm.entrypoints.openai import common
from radixlm.entrypoints.openai.common import BadRequest
from radixlm.entrypoints.openai.logprobs import chat_logprobs
from radixlm.entrypoints.openai.protocol import ChatCompletionRequest
from radixlm.managers.tokenizer_manager import ReqState, TokenizerManager

_RESERVED_TEMPLATE_KWARGS = {"conversation", "messages", "tokenize", "add_generation_prompt", "tools"}


def _check_tools(req: ChatCompletionRequest) -> None:
    if req.functions or req.function_call not in (None, "none"):
        raise BadRequest("functions / function_call are not supported", "functions")
    choice = req.tool_choice
    if req.tools and choice != "none":
        raise BadRequest("tools are not supported yet (no tool-call parser); omit tools or set "
                         "tool_choice to \"none\"", "tools")
    if choice not in (None, "none", "auto") and not req.tools:
        raise BadRequest("tool_choice is only allowed when tools are specified", "tool_choice")


def _messages(req: ChatCompletionRequest) -> List[Dict[str, Any]]:
    out = []
    for i, m in enumerate(req.messages):
        content = m.content
        if isinstance(content, list):
            texts = []
            for part in content:
                if part.type != "text" or part.text is None:
                    raise BadRequest(f"messages[{i}].content: only text parts are supported (got {part.type!r})",
                                     f"messages.{i}.content")
                texts.append(part.text)
            content = "\n".join(texts)
        if content is None and not (m.role == "assistant" and m.tool_calls):
            raise BadRequest(f"messages[{i}].content is required for role {m.role!r}", f"messages.{i}.content")
        d: Dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": content}
        for key in ("name", "tool_calls", "tool_call_id"):
            if getattr(m, key) is not None:
                d[key] = getattr(m, key)
        out.append(d)
    return out


def render_prompt(tm: TokenizerManager, req: ChatCompletionRequest) -> List[int]:
    tok = tm.tokenizer
    if tok is None or not getattr(tok, "chat_template", None):
        raise BadRequest("chat completions need a tokenizer with a chat template; use /v1/completions")
    kwargs = {k: v for k, v in (req.chat_template_kwargs or {}).items() if k not in _RESERVED_TEMPLATE_KWARGS}
    if req.tools:  # only reached with tool_choice "none": the model sees the tools but no call is parsed
        kwargs["tools"] = req.tools
    try:
        text = tok.apply_chat_template(_messages(req), tokenize=False, add_generation_prompt=True, **kwargs)
    except BadRequest:
        raise
    except Exception as e:  # noqa: BLE001 - jinja errors, raise_exception in the template
        raise BadRequest(f"messages: the chat template could not render them: {e}", "messages") from None
    return tok.encode(text, add_special_tokens=False)


def _build(tm: TokenizerManager, req: ChatCompletionRequest):
    _check_tools(req)
    if req.top_logprobs and not req.logprobs:
        raise BadRequest("top_logprobs requires logprobs to be true", "top_logprobs")
    ids = render_prompt(tm, req)
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    if max_tokens is None:  # bounded only by the context
        max_tokens = max(tm.model_config.context_len - len(ids), 0)
    sp = common.sampling_params(req, max_tokens, tm.model_config.vocab_size)
    msgs, _ = tm.builder.build(input_ids=ids, sampling_params=sp, rid=req.rid, return_logprob=req.logprobs,
                               top_logprobs_num=(req.top_logprobs or 0) if req.logprobs else 0, stream=req.stream)
    return msgs


async def create_chat_completion(request: Request, tm: TokenizerManager, req: ChatCompletionRequest):
    msgs = _build(tm, req)
    states = await tm.submit(msgs)
    rid, created = common.new_id("chatcmpl"), common.now()
    model = req.model or tm.served_model_name
    if req.stream:
        return StreamingResponse(_stream(tm, req, states, rid, created, model), media_type="text/event-stream")
    early = await common.wait_or_abort(request, tm, states)
    if early is not None:
        return early
    err = common.abort_error(states)
    if err is not None:
        return err
    choices = []
    for i, st in enumerate(states):
        lp = chat_logprobs(tm, st, 0, common.logprob_end(st)) if req.logprobs else None
        choices.append({"index": i, "message": {"role": "assistant", "content": st.text}, "logprobs": lp,
                        "finish_reason": common.finish_reason(st), "matched_stop": common.matched_stop(st)})
    return JSONResponse({"id": rid, "object": "chat.completion", "created": created, "model": model,
                         "choices": choices, "usage": common.usage(states)})


def _stream(tm: TokenizerManager, req: ChatCompletionRequest, states: List[ReqState], rid: str, created: int,
            model: str):
    def chunk(choices: list) -> Dict[str, Any]:
        return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": choices}

    def make_chunk(i: int, st: ReqState, delta: str, lp_from: int, lp_to: int, finish: Optional[str]):
        if not delta and lp_to == lp_from and finish is None:
            return None
        c: Dict[str, Any] = {"index": i, "delta": {"content": delta} if delta else {},
                             "logprobs": chat_logprobs(tm, st, lp_from, lp_to) if req.logprobs else None,
                             "finish_reason": finish}
        if finish is not None:
            c["matched_stop"] = common.matched_stop(st)
        return chunk([c])

    head = [chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                    "finish_reason": None}]) for i in range(len(states))]
    opts = req.stream_options
    return common.stream_states(tm, states, make_chunk, head, lambda u: {**chunk([]), "usage": u},
                                bool(opts and opts.include_usage), bool(opts and opts.continuous_usage_stats))
