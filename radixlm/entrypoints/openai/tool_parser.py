"""Tool-call parsers: find function calls in the model's text, incrementally (streaming) or at once.

Formats (`--tool-call-parser`, SGLang's values):
  hermes / qwen25 / qwen  `<tool_call>\\n{"name": "f", "arguments": {...}}\\n</tool_call>` blocks, any number,
                          anywhere in the text (Qwen2.5, Hermes, the tiny test models' template);
  llama3                  Llama-3.1 JSON calls `{"name": "f", "parameters": {...}}`, either after
                          `<|python_tag|>` or at the very start of the output, several joined by ";".
Both formats accept "arguments" or "parameters" as the arguments key. Without the flag the format is
chosen per request from the chat template: hermes when it contains "<tool_call>", else llama3.

One incremental machine (`ToolCallParser`) serves both paths, so a stream's reassembled deltas equal
the non-stream answer by construction:
  * text outside call blocks is normal content; whitespace right before an opening tag and right
    after a call is a separator, not content; a possible partial opening tag at the end of the text
    seen so far is held back until the next piece decides it;
  * inside a block the JSON object is scanned structurally; the call's header (index, id, name) is
    emitted once its "name" is complete and names one of the request's tools (a block naming an
    unknown tool, or not a JSON object with a name, is content); the arguments are the raw text of
    the arguments value, streamed as it arrives (a JSON-string value is decoded and sent whole when
    complete; a missing or null value is "{}").
Non-stream (`parse_tool_calls`) is strict where streaming cannot be: a call whose block is not valid
JSON with a JSON-object-or-array arguments value (e.g. cut off by max_tokens) is returned as content,
while a stream has already sent its header and fragments.

This module has no web-framework imports (server_args validates `--tool-call-parser` against it).
"""

from __future__ import annotations

import json
import uuid
from typing import Any, Dict, Iterable, List, Optional, Tuple

TOOL_CALL_PARSERS = ("hermes", "qwen25", "qwen", "llama3")
_FORMATS = {"hermes": "hermes", "qwen25": "hermes", "qwen": "hermes", "llama3": "llama3"}

HERMES_START, HERMES_END = "<tool_call>", "</tool_call>"
PYTHON_TAG = "<|python_tag|>"
ARG_KEYS = ("arguments", "parameters")
_WS = " \t\r\n"

# ("text", s) | ("call", index, id, name) | ("args", index, fragment) | ("end", index, valid, raw)
Event = Tuple[Any, ...]


def tool_call_format(parser: Optional[str], chat_template: Any = None) -> str:
    """The call format ("hermes" or "llama3") for a --tool-call-parser value; None = from the template."""
    if parser:
        if parser not in _FORMATS:
            raise ValueError(f"unknown tool-call parser {parser!r} (valid: {', '.join(TOOL_CALL_PARSERS)})")
        return _FORMATS[parser]
    if isinstance(chat_template, dict):
        chat_template = "\n".join(str(v) for v in chat_template.values())
    elif isinstance(chat_template, (list, tuple)):
        chat_template = "\n".join(str(t.get("template", "")) if isinstance(t, dict) else str(t) for t in chat_template)
    return "hermes" if HERMES_START in str(chat_template or "") else "llama3"


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest proper prefix of `tag` that `text` ends with."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


class _CallScanner:
    """Structural, incremental scan of one JSON object `{"name": ..., "arguments": ...}`.

    Feeds stop at the object's closing brace (`done`) or at the first character that cannot belong
    to it (`error`; that character is not consumed). Top-level values are recorded as raw spans."""

    def __init__(self):
        self.buf = ""
        self.depth = 0
        self.in_str = self.esc = False
        self.state = "start"  # start | key | colon | value | after
        self.tok_start: Optional[int] = None  # start of the top-level key / value being read
        self.key: Optional[str] = None
        self.args_key: Optional[str] = None  # the first of ARG_KEYS met: the one used
        self.fields: Dict[str, Tuple[int, int]] = {}
        self.done = self.error = False

    def feed(self, s: str) -> int:
        i0 = len(self.buf)
        self.buf += s
        for j in range(i0, len(self.buf)):
            self._step(j, self.buf[j])
            if self.error:
                self.buf = self.buf[:j]
                return j - i0
            if self.done:
                self.buf = self.buf[:j + 1]
                return j + 1 - i0
        return len(s)

    def _end_value(self, end: int) -> None:
        start = self.tok_start
        raw = self.buf[start:end].rstrip(_WS)
        if self.key is not None and self.key not in self.fields:
            self.fields[self.key] = (start, start + len(raw))
        self.state, self.tok_start = "after", None

    def _step(self, i: int, c: str) -> None:
        if self.in_str:
            if self.esc:
                self.esc = False
            elif c == "\\":
                self.esc = True
            elif c == '"':
                self.in_str = False
                if self.depth == 1 and self.state == "key":
                    try:
                        self.key = json.loads(self.buf[self.tok_start:i + 1])
                    except ValueError:
                        self.error = True
                        return
                    if self.key in ARG_KEYS and self.args_key is None:
                        self.args_key = self.key
                    self.state, self.tok_start = "colon", None
                elif self.depth == 1 and self.state == "value":
                    self._end_value(i + 1)
            return
        if self.depth == 0:
            if c == "{" and self.state == "start":
                self.depth, self.state = 1, "key"
            elif not (c in _WS and self.state == "start"):
                self.error = True
            return
        if self.depth >= 2:
            if c == '"':
                self.in_str = True
            elif c in "{[":
                self.depth += 1
            elif c in "}]":
                self.depth -= 1
                if self.depth == 1:
                    self._end_value(i + 1)
            return
        st = self.state
        if st == "value" and self.tok_start is not None:  # a scalar being read
            if c in ",}":
                self._end_value(i)
                st = "after"
            elif c in '{["':
                self.error = True
                return
            else:
                return
        if c in _WS:
            return
        if st == "key":
            if c == '"':
                self.in_str, self.tok_start = True, i
            elif c == "}":
                self.depth, self.done = 0, True
            else:
                self.error = True
        elif st == "colon":
            if c == ":":
                self.state, self.tok_start = "value", None
            else:
                self.error = True
        elif st == "value":
            self.tok_start = i
            if c == '"':
                self.in_str = True
            elif c in "{[":
                self.depth = 2
            elif c in ",}]:":
                self.error = True
        else:  # after
            if c == ",":
                self.state = "key"
            elif c == "}":
                self.depth, self.done = 0, True
            else:
                self.error = True

    def name(self) -> Tuple[bool, Optional[str]]:
        """(known, name): known once the "name" value is complete; name None when it is no string."""
        span = self.fields.get("name")
        if span is None:
            return False, None
        try:
            v = json.loads(self.buf[span[0]:span[1]])
        except ValueError:
            return True, None
        return True, v if isinstance(v, str) else None

    def args_text(self) -> str:
        """The arguments text available so far (each result extends the previous one)."""
        k = self.args_key
        if k is not None and k in self.fields:
            s, e = self.fields[k]
            raw = self.buf[s:e]
            if raw.startswith('"'):
                try:
                    v = json.loads(raw)
                    return v if isinstance(v, str) else raw
                except ValueError:
                    return raw
            return "{}" if raw == "null" else raw
        if k is not None and self.key == k and self.state == "value" and self.tok_start is not None \
                and self.depth >= 2:
            return self.buf[self.tok_start:]
        return "{}" if self.done else ""

    def valid(self) -> bool:
        if not self.done:
            return False
        try:
            obj = json.loads(self.buf)
            args = json.loads(self.args_text())
        except ValueError:
            return False
        return isinstance(obj, dict) and isinstance(obj.get("name"), str) and isinstance(args, (dict, list))


class _Call:
    def __init__(self, prefix: str):
        self.prefix = prefix  # whitespace and tag before the object (given back if it is no call)
        self.scanner = _CallScanner()
        self.decided = False  # the name was read and accepted
        self.header = False  # the call's header event was emitted
        self.index = -1
        self.args_sent = 0


class ToolCallParser:
    """Incremental tool-call extraction for one choice: `feed(text_delta)` then `finish()`, each
    returning events ("text", s), ("call", index, id, name), ("args", index, fragment) and
    ("end", index, valid, raw_block). `parallel=False` keeps only the first call (later ones are
    dropped, neither content nor calls)."""

    def __init__(self, fmt: str, tool_names: Iterable[str], parallel: bool = True):
        if fmt not in ("hermes", "llama3"):
            raise ValueError(f"unknown tool-call format {fmt!r}")
        self.fmt = fmt
        self.tag = HERMES_START if fmt == "hermes" else PYTHON_TAG
        self.names = set(tool_names)
        self.max_calls = None if parallel else 1
        self.pending = ""
        self.mode = "text"  # text | call | after
        self.held_ws = ""  # trailing whitespace of the content, held until we know it is content
        self.ws_droppable = False  # the held whitespace follows a call
        self.seen_text = False  # some non-whitespace content was emitted
        self.call: Optional[_Call] = None
        self.num_calls = 0  # headers emitted
        self.out: List[Event] = []

    # ------------------------------------------------------------------ public
    def feed(self, text: str) -> List[Event]:
        self.pending += text
        self._run(final=False)
        return self._take()

    def finish(self) -> List[Event]:
        self._run(final=True)
        if self.mode == "call":
            if self.call.decided:
                self._end_call(False)
            else:
                self._fallback()
            self._run(final=True)
        self.pending = ""
        if self.held_ws and not self.ws_droppable:
            self.out.append(("text", self.held_ws))
        self.held_ws = ""
        return self._take()

    # ------------------------------------------------------------------ machinery
    def _take(self) -> List[Event]:
        out, self.out = self.out, []
        return out

    def _run(self, final: bool) -> None:
        while True:
            if self.mode == "text":
                progressed = self._text_step(final)
            elif self.mode == "call":
                progressed = self._call_step()
            else:
                progressed = self._after_step(final)
            if not progressed:
                return

    def _text(self, s: str) -> None:
        if not s:
            return
        combined = self.held_ws + s
        if self.ws_droppable and not self.seen_text:
            combined = combined.lstrip(_WS)
        body = combined.rstrip(_WS)
        if body:
            self.out.append(("text", body))
            self.seen_text, self.ws_droppable = True, False
        self.held_ws = combined[len(body):]

    def _begin(self, rest: str, tag: str) -> None:
        self.call = _Call(("" if self.ws_droppable else self.held_ws) + tag)
        self.held_ws = ""
        self.pending, self.mode = rest, "call"

    def _text_step(self, final: bool) -> bool:
        p = self.pending
        if not p:
            return False
        if self.fmt == "llama3" and not self.seen_text:  # a bare JSON call at the start of the output
            body = p.lstrip(_WS)
            if body.startswith("{"):
                self._text(p[:len(p) - len(body)])
                self._begin(body, "")
                return True
        k = p.find(self.tag)
        if k >= 0:
            self._text(p[:k])
            self._begin(p[k + len(self.tag):], self.tag)
            return True
        keep = 0 if final else _partial_suffix(p, self.tag)
        if self.fmt == "llama3" and not self.seen_text and not final and not p.strip(_WS):
            keep = 0  # whitespace only: _text holds it
        self._text(p[:len(p) - keep])
        self.pending = p[len(p) - keep:]
        return False

    def _call_step(self) -> bool:
        c = self.call
        sc = c.scanner
        n = sc.feed(self.pending)
        self.pending = self.pending[n:]
        if not c.decided:
            known, name = sc.name()
            if known:
                if name is None or name not in self.names:
                    return self._fallback()
                c.decided = True
                if self.max_calls is None or self.num_calls < self.max_calls:
                    c.header, c.index = True, self.num_calls
                    self.num_calls += 1
                    self.out.append(("call", c.index, new_call_id(), name))
            elif sc.error or sc.done:
                return self._fallback()
        if c.header:
            text = sc.args_text()
            if len(text) > c.args_sent:
                self.out.append(("args", c.index, text[c.args_sent:]))
                c.args_sent = len(text)
        if sc.done or sc.error:
            self._end_call(sc.valid())
            return True
        return False

    def _end_call(self, valid: bool) -> None:
        c = self.call
        if c.header:
            self.out.append(("end", c.index, valid, c.prefix + c.scanner.buf))
        self.call = None
        self.ws_droppable = True
        self.held_ws = ""
        self.mode = "after" if c.scanner.done else "text"

    def _fallback(self) -> bool:
        """The block is no call: its text is content (not scanned again for tags)."""
        c, self.call = self.call, None
        self.mode = "text"
        raw = c.prefix + c.scanner.buf
        body = raw.rstrip(_WS)
        if body:
            self.out.append(("text", body))
            self.seen_text, self.ws_droppable = True, False
        self.held_ws = raw[len(body):]
        return True

    def _after_step(self, final: bool) -> bool:
        p = self.pending
        body = p.lstrip(_WS)
        if self.fmt == "hermes":
            if body.startswith(HERMES_END):
                self.pending, self.mode = body[len(HERMES_END):], "text"
                return True
            if HERMES_END.startswith(body):  # nothing yet, or a partial closing tag
                if final:
                    self.pending, self.mode = "", "text"
                return False
            self.pending, self.mode = body, "text"  # no closing tag: lenient
            return True
        if not body:
            return False
        if body[0] == ";":
            rest = body[1:].lstrip(_WS)
            if not rest:
                if final:
                    self.pending, self.mode = "", "text"
                return False
            if rest[0] == "{":
                self._begin(rest, "")
                return True
        elif body[0] == "{":
            self._begin(body, "")
            return True
        self.pending, self.mode = body, "text"
        return True


def parse_tool_calls(text: str, fmt: str, tool_names: Iterable[str],
                     parallel: bool = True) -> Tuple[Optional[str], List[Dict[str, Any]]]:
    """Non-stream extraction: (content, tool_calls). With calls, content is the normal text around
    them or None when there is none; without, it is the text unchanged."""
    p = ToolCallParser(fmt, tool_names, parallel)
    segments: List[Any] = []
    calls: Dict[int, Dict[str, Any]] = {}
    for ev in p.feed(text) + p.finish():
        if ev[0] == "text":
            segments.append(ev[1])
        elif ev[0] == "call":
            calls[ev[1]] = {"id": ev[2], "type": "function", "function": {"name": ev[3], "arguments": ""}}
            segments.append(calls[ev[1]])
        elif ev[0] == "args":
            calls[ev[1]]["function"]["arguments"] += ev[2]
        elif ev[0] == "end" and not ev[2]:
            bad = calls.pop(ev[1])
            segments[next(i for i, s in enumerate(segments) if s is bad)] = ev[3]
    content = "".join(s for s in segments if isinstance(s, str))
    tool_calls = [s for s in segments if isinstance(s, dict)]
    if tool_calls and not content.strip(_WS):
        return None, tool_calls
    return content, tool_calls
