"""Reasoning output (`--reasoning-parser`): a reasoning model's `<think>...</think>` block is split off
its answer, to `reasoning_content` in chat completions (`delta.reasoning_content` when streaming).

One incremental machine (`ReasoningParser`) serves both paths, so a stream's reassembled deltas equal
the non-stream split by construction, wherever the text is cut (a tag split across chunks is held
back until the next piece decides it; tags never reach the client).

Where the output starts (SGLang's `force_reasoning`):
  * deepseek-r1: the chat template opens the think block, so the output starts inside it: the text
    before `</think>` is reasoning even without an opening tag (an opening `<think>` is dropped);
  * qwen3: inside the block while thinking is on (`chat_template_kwargs.enable_thinking`, default
    true: the model opens the block itself, or a thinking template opened it); with
    enable_thinking=false the template closes an empty block in the prompt, so the output is the
    answer unless it starts with `<think>` itself.
The output is the answer unchanged when it neither starts inside a block nor opens one at its start.
With a block, whitespace around the reasoning and around the answer is trimmed (as SGLang's
non-stream parser does); a block never closed (max_tokens) is all reasoning, the answer "".
`stream_reasoning=False` holds the reasoning back and sends it in one delta when the block closes.

No web-framework imports: server_args validates `--reasoning-parser` against `REASONING_PARSERS`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

__all__ = ["REASONING_PARSERS", "ReasoningParser", "reasoning_format", "starts_in_reasoning",
           "separate_reasoning", "thinking_template_kwargs", "reasoning_token_count"]

WS = " \t\r\n"


@dataclass(frozen=True)
class ReasoningFormat:
    name: str
    start: str
    end: str
    always_in_reasoning: bool  # the template always opens the block (deepseek-r1)
    thinking_kwarg: Optional[str]  # the chat_template_kwargs key that turns thinking off (qwen3)


_FORMATS = {f.name: f for f in (
    ReasoningFormat("deepseek-r1", "<think>", "</think>", True, None),
    ReasoningFormat("qwen3", "<think>", "</think>", False, "enable_thinking"),
)}
REASONING_PARSERS = tuple(sorted(_FORMATS))


def reasoning_format(name: str) -> ReasoningFormat:
    fmt = _FORMATS.get(name)
    if fmt is None:
        raise ValueError(f"unknown reasoning parser {name!r}; valid: {', '.join(REASONING_PARSERS)}")
    return fmt


def starts_in_reasoning(name: str, chat_template_kwargs: Optional[Dict[str, Any]]) -> bool:
    """Whether the model's output starts inside the think block (see the module docstring)."""
    fmt = reasoning_format(name)
    if fmt.always_in_reasoning:
        return True
    return (chat_template_kwargs or {}).get(fmt.thinking_kwarg, True) is not False


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest proper prefix of `tag` that `text` ends with."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


class _Trimmed:
    """A section's text with its leading and trailing whitespace trimmed, incrementally: the
    trailing whitespace is held until more text (it was inner) or the end (it is dropped)."""

    def __init__(self):
        self.held = ""
        self.started = False

    def add(self, s: str) -> str:
        combined = self.held + s
        if not self.started:
            combined = combined.lstrip(WS)
        body = combined.rstrip(WS)
        self.held = combined[len(body):]
        if body:
            self.started = True
        return body


class ReasoningParser:
    """Incremental split of one choice's output: `feed(text_delta)` then `finish()`, each returning
    (reasoning_delta, answer_delta)."""

    def __init__(self, name: str, in_reasoning: bool, stream_reasoning: bool = True):
        self.format = reasoning_format(name)
        self.stream_reasoning = stream_reasoning
        # start: not decided yet (whitespace, or a possible opening tag) | reasoning | answer | plain
        self.mode = "start"
        self.forced = in_reasoning
        self.pending = ""
        self.reasoning = _Trimmed()
        self.answer = _Trimmed()
        self.held_reasoning = ""  # stream_reasoning=False: the reasoning not sent yet

    def feed(self, text: str) -> Tuple[str, str]:
        self.pending += text
        return self._run(final=False)

    def finish(self) -> Tuple[str, str]:
        return self._run(final=True)

    def _run(self, final: bool) -> Tuple[str, str]:
        r, a = [], []
        if self.mode == "start":
            self._start_step(final)
        if self.mode == "reasoning":
            r.append(self._reasoning_step(final))
        if self.mode == "answer":
            a.append(self.answer.add(self.pending))
            self.pending = ""
        elif self.mode == "plain":
            a.append(self.pending)
            self.pending = ""
        return "".join(r), "".join(a)

    def _start_step(self, final: bool) -> None:
        p = self.pending
        s = p.lstrip(WS)
        start = self.format.start
        if s.startswith(start):
            self.pending, self.mode = s[len(start):], "reasoning"
        elif not final and (not s or start.startswith(s)):
            return  # whitespace only, or a possible opening tag: wait
        elif self.forced:
            self.mode = "reasoning"
        else:
            self.mode = "plain"

    def _reasoning_step(self, final: bool) -> str:
        p, end = self.pending, self.format.end
        k = p.find(end)
        if k >= 0:
            out = self.reasoning.add(p[:k])
            self.pending, self.mode = p[k + len(end):], "answer"
        else:
            keep = 0 if final else _partial_suffix(p, end)
            out = self.reasoning.add(p[:len(p) - keep])
            self.pending = p[len(p) - keep:]
            if not self.stream_reasoning and not final:
                self.held_reasoning += out
                return ""
        out, self.held_reasoning = self.held_reasoning + out, ""
        return out


def separate_reasoning(text: str, name: str, in_reasoning: bool) -> Tuple[Optional[str], str]:
    """Non-stream split: (reasoning_content, answer). reasoning_content is None when the output has
    no (or an empty) think block."""
    p = ReasoningParser(name, in_reasoning)
    r1, a1 = p.feed(text)
    r2, a2 = p.finish()
    return (r1 + r2) or None, a1 + a2


def thinking_template_kwargs(name: Optional[str], effort: Optional[str],
                             chat_template_kwargs: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """The chat template's kwargs with OpenAI's `reasoning_effort` applied: the template sees
    `reasoning_effort` (templates such as gpt-oss's read it), and for a parser whose thinking can be
    turned off (qwen3's `enable_thinking`) "none" turns it off and any other level on. A kwarg the
    request sets itself wins. A parser whose model always reasons (deepseek-r1) refuses "none"
    (ValueError) rather than ignoring it."""
    kwargs = dict(chat_template_kwargs or {})
    if effort is None:
        return kwargs
    kwargs.setdefault("reasoning_effort", effort)
    if name is not None:
        fmt = reasoning_format(name)
        if fmt.thinking_kwarg is not None:
            kwargs.setdefault(fmt.thinking_kwarg, effort != "none")
        elif effort == "none" and fmt.always_in_reasoning:
            raise ValueError(f"reasoning_effort 'none': the model always reasons (--reasoning-parser {name})")
    return kwargs


def reasoning_token_count(output_ids: Sequence[int], decode: Callable[[Sequence[int]], str], name: str,
                          in_reasoning: bool, end_token_id: Optional[int] = None) -> int:
    """How many of the output tokens belong to the think block (its closing tag included), for
    usage.reasoning_tokens. With the closing tag a single token (`end_token_id`: Qwen3's and
    DeepSeek-R1's `</think>`) it is the tag's position; otherwise the shortest prefix whose text
    holds the tag, found by bisection over decoded prefixes (a prefix that holds it stays holding it)."""
    ids = list(output_ids)
    fmt = reasoning_format(name)
    text = decode(ids)
    if not ids or not (in_reasoning or text.lstrip(WS).startswith(fmt.start)):
        return 0  # the output is the answer as it is
    end = fmt.end
    if end_token_id is not None:
        return ids.index(end_token_id) + 1 if end_token_id in ids else len(ids)
    if end not in text:
        return len(ids)  # never closed (max_tokens): all of it is reasoning
    lo, hi = 1, len(ids)
    while lo < hi:
        mid = (lo + hi) // 2
        if end in decode(ids[:mid]):
            hi = mid
        else:
            lo = mid + 1
    return lo
