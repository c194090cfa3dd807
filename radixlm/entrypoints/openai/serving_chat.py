"""POST /v1/chat/completions: messages -> the tokenizer's chat template -> token ids -> generate.

The template output already holds the special tokens, so it is encoded with add_special_tokens=False.
Streaming sends, per choice, a first chunk `delta: {role: assistant, content: ""}`, then content
deltas; the last chunk of a choice carries its finish_reason. response_format json_object /
json_schema constrain decoding through the grammar backend.

Tools (tools.py, tool_parser.py): the tools are rendered into the prompt by the chat template; with
tool_choice auto / required / named the output is parsed for calls: non-stream -> message.tool_calls
[{id: "call_<hex>", type: "function", function: {name, arguments: JSON string}}], content = the
normal text (null when there is none) and finish_reason "tool_calls" (when the model stopped by
itself); streaming -> content deltas for normal text, then per call a delta `tool_calls: [{index, id,
type, function: {name, arguments: ""}}]` followed by deltas carrying `arguments` fragments.
Assistant messages' tool_calls whose arguments are a JSON string reach the template as objects
(Llama-3.1's template and others expect a mapping).

Reasoning (--reasoning-parser, reasoning_parser.py), unless the request sets separate_reasoning false:
the think block goes to message.reasoning_content (null when there is none) and the answer to
content; streaming sends delta.reasoning_content chunks, then the answer's deltas. Tool calls are
parsed from the answer only. chat_template_kwargs reach the template and say whether a qwen3 output
starts inside the block (enable_thinking); OpenAI's reasoning_effort sets it ("none": off) unless the
request sets it itself. usage.reasoning_tokens counts the think blocks' tokens. A forced tool call
(tool_choice required / named) is not split: its grammar makes the whole output calls.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, Dict, List, Optional, Tuple

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from radixlm.entrypoints.openai import common
from radixlm.entrypoints.openai.common import BadRequest
from radixlm.entrypoints.openai.logprobs import chat_logprobs
from radixlm.entrypoints.openai.protocol import ChatCompletionRequest
from radixlm.entrypoints.openai.reasoning_parser import (
    ReasoningParser,
    reasoning_format,
    reasoning_token_count,
    separate_reasoning,
    starts_in_reasoning,
    thinking_template_kwargs,
)
from radixlm.entrypoints.openai.tool_parser import ToolCallParser, parse_tool_calls, tool_call_deltas
from radixlm.entrypoints.openai.tools import ToolSetup, prepare_tools
from radixlm.managers.tokenizer_manager import ReqState, TokenizerManager

_RESERVED_TEMPLATE_KWARGS = {"conversation", "messages", "tokenize", "add_generation_prompt", "tools"}


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
        for key in ("name", "tool_call_id", "reasoning_content"):
            if getattr(m, key) is not None:
                d[key] = getattr(m, key)
        if m.tool_calls is not None:
            d["tool_calls"] = _template_tool_calls(m.tool_calls, i)
        out.append(d)
    return out


def _template_tool_calls(calls: List[Dict[str, Any]], i: int) -> List[Dict[str, Any]]:
    out = []
    for j, call in enumerate(calls):
        fn = call.get("function")
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise BadRequest(f"messages[{i}].tool_calls[{j}] needs function.name", f"messages.{i}.tool_calls")
        args = fn.get("arguments", {})
        if isinstance(args, str):
            try:
                parsed = json.loads(args) if args.strip() else {}
            except ValueError:
                parsed = None
            if isinstance(parsed, dict):
                args = parsed
        out.append({**call, "function": {**fn, "arguments": args}})
    return out


def render_prompt(tm: TokenizerManager, req: ChatCompletionRequest) -> List[int]:
    tok = tm.tokenizer
    if tok is None or not getattr(tok, "chat_template", None):
        raise BadRequest("chat completions need a tokenizer with a chat template; use /v1/completions")
    kwargs = {k: v for k, v in _template_kwargs(tm, req).items() if k not in _RESERVED_TEMPLATE_KWARGS}
    if req.tools:  # the model sees the tools whatever tool_choice says (as SGLang and vLLM do)
        kwargs["tools"] = req.tools
    try:
        text = tok.apply_chat_template(_messages(req), tokenize=False, add_generation_prompt=True, **kwargs)
    except BadRequest:
        raise
    except Exception as e:  # noqa: BLE001 - jinja errors, raise_exception in the template
        raise BadRequest(f"messages: the chat template could not render them: {e}", "messages") from None
    return tm.builder.encode(text, "messages", add_special_tokens=False)


def _build(tm: TokenizerManager, req: ChatCompletionRequest) -> Tuple[list, Optional[ToolSetup]]:
    """Validation, tools' grammar, template, tokens: blocking work, run off the event loop."""
    common.check_limits(req, tm.builder.limits, "top_logprobs", req.top_logprobs if req.logprobs else None)
    setup = prepare_tools(req, tm.args, getattr(tm.tokenizer, "chat_template", None), bool(common.constraint(req)))
    if req.top_logprobs and not req.logprobs:
        raise BadRequest("top_logprobs requires logprobs to be true", "top_logprobs")
    ids = render_prompt(tm, req)
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    if max_tokens is None:  # bounded only by the context
        max_tokens = max(tm.model_config.context_len - len(ids), 0)
    sp = common.sampling_params(req, max_tokens, tm.model_config.vocab_size)
    if setup is not None and setup.ebnf is not None:  # a forced call: prepare_tools refused other constraints
        sp["ebnf"] = setup.ebnf
    msgs, _ = tm.builder.build(input_ids=ids, sampling_params=sp, rid=req.rid, return_logprob=req.logprobs,
                               top_logprobs_num=(req.top_logprobs or 0) if req.logprobs else 0, stream=req.stream,
                               **common.sglang_extras(req))
    return msgs, setup


def _template_kwargs(tm: TokenizerManager, req: ChatCompletionRequest) -> Dict[str, Any]:
    """chat_template_kwargs with reasoning_effort applied (reasoning_parser.thinking_template_kwargs)."""
    try:
        return thinking_template_kwargs(getattr(tm.args, "reasoning_parser", None), req.reasoning_effort,
                                        req.chat_template_kwargs)
    except ValueError as e:
        raise BadRequest(str(e), "reasoning_effort") from None


def _reasoning(tm: TokenizerManager, req: ChatCompletionRequest,
               setup: Optional[ToolSetup]) -> Optional[Tuple[str, bool]]:
    """(parser name, whether the output starts inside the think block), or None: no split."""
    name = getattr(tm.args, "reasoning_parser", None)
    if name is None or not req.separate_reasoning or (setup is not None and setup.ebnf is not None):
        return None
    return name, starts_in_reasoning(name, _template_kwargs(tm, req))


def _usage(tm: TokenizerManager, states: List[ReqState], reasoning: Optional[Tuple[str, bool]]) -> Dict[str, Any]:
    """OpenAI usage plus SGLang's `reasoning_tokens`: the output tokens of the think blocks (0 when
    the output is not split)."""
    out = common.usage(states)
    n = 0
    if reasoning is not None and tm.tokenizer is not None:
        end_ids = tm.tokenizer.encode(reasoning_format(reasoning[0]).end, add_special_tokens=False)
        end_id = end_ids[0] if len(end_ids) == 1 else None
        n = sum(reasoning_token_count(st.output_ids, tm.tokenizer.decode, *reasoning, end_token_id=end_id)
                for st in states)
    out["reasoning_tokens"] = n
    return out


def _finish(st: ReqState, has_calls: bool) -> Optional[str]:
    reason = common.finish_reason(st)
    return "tool_calls" if has_calls and reason == "stop" else reason


async def create_chat_completion(request: Request, tm: TokenizerManager, req: ChatCompletionRequest):
    msgs, setup = await asyncio.to_thread(_build, tm, req)
    states = await tm.submit(msgs)
    rid, created = common.new_id("chatcmpl"), common.now()
    model = req.model or tm.served_model_name
    if req.stream:
        return StreamingResponse(_stream(tm, req, setup, states, rid, created, model), media_type="text/event-stream")
    err = await common.wait_or_abort(request, tm, states)
    if err is not None:
        return err
    choices = []
    reasoning = _reasoning(tm, req, setup)
    for i, st in enumerate(states):
        lp = chat_logprobs(tm, st, 0, common.logprob_end(st)) if req.logprobs else None
        text = st.text
        message: Dict[str, Any] = {"role": "assistant", "content": text}
        if reasoning is not None:
            message["reasoning_content"], text = separate_reasoning(text, *reasoning)
            message["content"] = text
        if setup is not None:  # calls are parsed from the answer only
            message["content"], calls = parse_tool_calls(text, setup.fmt, setup.names, setup.parallel)
            if calls:
                message["tool_calls"] = calls
        choices.append({"index": i, "message": message, "logprobs": lp,
                        "finish_reason": _finish(st, "tool_calls" in message),
                        "matched_stop": common.matched_stop(st)})
    usage = await asyncio.to_thread(_usage, tm, states, reasoning)  # decodes: off the event loop
    return JSONResponse({"id": rid, "object": "chat.completion", "created": created, "model": model,
                         "choices": choices, "usage": usage})


def _stream(tm: TokenizerManager, req: ChatCompletionRequest, setup: Optional[ToolSetup], states: List[ReqState],
            rid: str, created: int, model: str):
    parsers = [ToolCallParser(setup.fmt, setup.names, setup.parallel) if setup is not None else None
               for _ in states]
    reasoning = _reasoning(tm, req, setup)
    rparsers = [ReasoningParser(*reasoning, stream_reasoning=req.stream_reasoning) if reasoning is not None
                else None for _ in states]

    def chunk(choices: list) -> Dict[str, Any]:
        return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": choices}

    def deltas(i: int, text: str, finished: bool) -> List[Dict[str, Any]]:
        out: List[Dict[str, Any]] = []
        rp = rparsers[i]
        if rp is not None:  # the think block -> reasoning deltas; the answer goes on
            thought, text = rp.feed(text)
            if finished:
                more_thought, more_text = rp.finish()
                thought, text = thought + more_thought, text + more_text
            if thought:
                out.append({"reasoning_content": thought})
        p = parsers[i]
        if p is None:
            return out + ([{"content": text}] if text else [])
        return out + tool_call_deltas(p.feed(text) + (p.finish() if finished else []))

    def make_chunk(i: int, st: ReqState, delta: str, lp_from: int, lp_to: int, finish: Optional[str]):
        ds = deltas(i, delta, finish is not None)
        if not ds and lp_to == lp_from and finish is None:
            return None
        if finish is not None:
            finish = _finish(st, parsers[i] is not None and parsers[i].num_calls > 0)
        out = []
        for k, d in enumerate(ds or [{}]):
            c: Dict[str, Any] = {"index": i, "delta": d,
                                 "logprobs": chat_logprobs(tm, st, lp_from, lp_to) if req.logprobs and k == 0
                                 else None,
                                 "finish_reason": finish if k == len(ds or [{}]) - 1 else None}
            if c["finish_reason"] is not None:
                c["matched_stop"] = common.matched_stop(st)
            out.append(chunk([c]))
        return out

    head = [chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                    "finish_reason": None}]) for i in range(len(states))]
    opts = req.stream_options
    return common.stream_states(tm, states, make_chunk, head, lambda u: {**chunk([]), "usage": u},
                                bool(opts and opts.include_usage), bool(opts and opts.continuous_usage_stats),
                                usage_fn=lambda sts: _usage(tm, sts, reasoning))
