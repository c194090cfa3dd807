"""POST /v1/completions: OpenAI's legacy text completions on top of the TokenizerManager.

prompt (str | [str] | [int] | [[int]]) -> RequestBuilder (validation, n samples per prompt) -> submit
-> one JSON response, or SSE chunks `text_completion` with text deltas. Choices are prompt-major:
choice index = prompt_index * n + sample_index. echo prepends the prompt's text; with logprobs it
also prepends the prompt tokens' logprobs (logprob_start_len 0; the first token's is null).
"""

from __future__ import annotations

import asyncio
from typing import Any, Dict, List, Optional

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from radixlm.entrypoints.openai import common
from radixlm.entrypoints.openai.common import BadRequest
from radixlm.entrypoints.openai.logprobs import completion_logprobs
from radixlm.entrypoints.openai.protocol import CompletionRequest
from radixlm.managers.tokenizer_manager import ReqState, TokenizerManager


def _split_prompt(prompt: Any) -> Dict[str, Any]:
    """Builder arguments for OpenAI's four prompt forms."""
    if isinstance(prompt, str):
        return {"text": prompt}
    if not prompt:
        raise BadRequest("prompt: the prompt list is empty", "prompt")
    if isinstance(prompt[0], str):
        return {"text": list(prompt)}
    return {"input_ids": [list(p) for p in prompt] if isinstance(prompt[0], list) else list(prompt)}


def _build(tm: TokenizerManager, req: CompletionRequest):
    """Validation and tokens: blocking work, run off the event loop."""
    common.check_limits(req, tm.builder.limits, "logprobs", req.logprobs)
    n_prompts = len(req.prompt) if isinstance(req.prompt, list) and req.prompt and \
        not isinstance(req.prompt[0], int) else 1
    if n_prompts > tm.builder.limits.max_batch_prompts:
        raise BadRequest(f"prompt: {n_prompts} prompts in one request; at most "
                         f"{tm.builder.limits.max_batch_prompts} (--max-batch-prompts)", "prompt")
    if req.suffix:
        raise BadRequest("suffix is not supported", "suffix")
    if req.best_of is not None and req.best_of != (req.n or 1):
        raise BadRequest("best_of is not supported (it must equal n)", "best_of")
    max_tokens = 16 if req.max_tokens is None else req.max_tokens
    sp = common.sampling_params(req, max_tokens, tm.model_config.vocab_size)
    msgs, _ = tm.builder.build(**_split_prompt(req.prompt), sampling_params=sp, rid=req.rid,
                               return_logprob=req.logprobs is not None, top_logprobs_num=req.logprobs or 0,
                               logprob_start_len=0 if req.echo and req.logprobs is not None else -1,
                               stream=req.stream, **common.sglang_extras(req))
    return msgs


def _echo_texts(tm: TokenizerManager, req: CompletionRequest, states: List[ReqState]) -> List[str]:
    if not req.echo:
        return [""] * len(states)
    prompts = req.prompt if isinstance(req.prompt, list) and req.prompt and not isinstance(req.prompt[0], int) \
        else [req.prompt]
    n = len(states) // len(prompts)
    texts = [p if isinstance(p, str) else tm.tokenizer.decode(p) if tm.tokenizer is not None else ""
             for p in prompts]
    return [texts[i // n] for i in range(len(states))]


async def create_completion(request: Request, tm: TokenizerManager, req: CompletionRequest):
    msgs = await asyncio.to_thread(_build, tm, req)
    states = await tm.submit(msgs)
    rid, created = common.new_id("cmpl"), common.now()
    model = req.model or tm.served_model_name
    echo = _echo_texts(tm, req, states)
    if req.stream:
        return StreamingResponse(_stream(tm, req, states, rid, created, model, echo), media_type="text/event-stream")
    err = await common.wait_or_abort(request, tm, states)
    if err is not None:
        return err
    choices = []
    for i, st in enumerate(states):
        lp = None
        if req.logprobs is not None:
            lp = completion_logprobs(tm, st, 0, common.logprob_end(st), 0, prompt=req.echo)
        choices.append({"index": i, "text": echo[i] + st.text, "logprobs": lp,
                        "finish_reason": common.finish_reason(st), "matched_stop": common.matched_stop(st)})
    return JSONResponse({"id": rid, "object": "text_completion", "created": created, "model": model,
                         "choices": choices, "usage": common.usage(states)})


def _stream(tm: TokenizerManager, req: CompletionRequest, states: List[ReqState], rid: str, created: int,
            model: str, echo: List[str]):
    offsets = [0] * len(states)
    echoed = [False] * len(states)

    def chunk(choices: list) -> Dict[str, Any]:
        return {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": choices}

    def make_chunk(i: int, st: ReqState, delta: str, lp_from: int, lp_to: int, finish: Optional[str]):
        first = not echoed[i]
        if first:
            delta, echoed[i] = echo[i] + delta, True
        if not delta and lp_to == lp_from and finish is None and not (first and req.echo):
            return None
        lp = None
        if req.logprobs is not None:
            lp = completion_logprobs(tm, st, lp_from, lp_to, offsets[i], prompt=first and req.echo)
            offsets[i] += sum(len(t) for t in lp["tokens"])
        c = {"index": i, "text": delta, "logprobs": lp, "finish_reason": finish}
        if finish is not None:
            c["matched_stop"] = common.matched_stop(st)
        return chunk([c])

    def usage_chunk(u: Dict[str, Any]) -> Dict[str, Any]:
        return {**chunk([]), "usage": u}

    opts = req.stream_options
    return common.stream_states(tm, states, make_chunk, [], usage_chunk,
                                bool(opts and opts.include_usage), bool(opts and opts.continuous_usage_stats))
