"""Tool-call parsing: find function calls in the model's text, incrementally (streaming) or at once.

One incremental machine (`ToolCallParser`) serves both paths, so a stream's reassembled deltas equal
the non-stream answer by construction; the format (tool_formats.py) says where calls begin and what
may follow them, the call's JSON is read by tool_call_json.CallScanner:
  * text outside calls is normal content; whitespace right before a call and right after one is a
    separator, not content (`_Content`); a possible partial opening tag at the end of the text seen
    so far is held back until the next piece decides it;
  * a call's header (index, id, name) is emitted once its "name" is complete and names one of the
    request's tools (a block naming an unknown tool, or not a JSON object with a name, is content);
    its arguments are streamed as they arrive (see CallScanner.args_text).
Non-stream (`parse_tool_calls`) is strict where streaming cannot be: a call whose block is not valid
JSON with a JSON-object-or-array arguments value (e.g. cut off by max_tokens) is returned as content,
while a stream has already sent its header and fragments (`tool_call_deltas`).

This module has no web-framework imports (server_args validates `--tool-call-parser` against
`TOOL_CALL_PARSERS`, the registry of formats, re-exported here).
"""

from __future__ import annotations

import uuid
from typing import Any, Dict, Iterable, List, Optional, Tuple

from radixlm.entrypoints.openai.tool_call_json import WS, CallScanner
from radixlm.entrypoints.openai.tool_formats import TOOL_CALL_PARSERS, get_format, tool_call_format

__all__ = ["TOOL_CALL_PARSERS", "tool_call_format", "ToolCallParser", "parse_tool_calls", "tool_call_deltas"]

# ("text", s) | ("call", index, id, name) | ("args", index, fragment) | ("end", index, valid, raw)
Event = Tuple[Any, ...]


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest proper prefix of `tag` that `text` ends with."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


class _Content:
    """The normal text: its trailing whitespace is held until what follows decides it (more content:
    it is content; a call: it goes with the call; the end: it is content unless a call came before)."""

    def __init__(self):
        self.held = ""
        self.after_call = False  # a call came after the last content
        self.seen = False  # some non-whitespace content was emitted

    def add(self, s: str) -> str:
        """The text to emit now for `s`."""
        if not s:
            return ""
        combined = self.held + s
        if self.after_call and not self.seen:
            combined = combined.lstrip(WS)
        body = combined.rstrip(WS)
        if body:
            self.seen, self.after_call = True, False
        self.held = combined[len(body):]
        return body

    def call_ended(self) -> None:
        self.held, self.after_call = "", True

    def take_held(self) -> str:
        """The held whitespace, emptied: for a call that begins (it is content again if that is no call)
        or at the end; none when it follows a call (a separator)."""
        held, self.held = ("" if self.after_call else self.held), ""
        return held


class _Call:
    def __init__(self, prefix: str):
        self.prefix = prefix  # whitespace and tag before the object (given back if it is no call)
        self.scanner = CallScanner()
        self.decided = False  # the name was read and accepted
        self.index: Optional[int] = None  # set when its header was emitted (not for a dropped call)
        self.args_sent = 0

    def raw(self) -> str:
        return self.prefix + self.scanner.buf

    def new_args(self) -> str:
        """The arguments text not sent yet."""
        text = self.scanner.args_text()
        fragment, self.args_sent = text[self.args_sent:], max(self.args_sent, len(text))
        return fragment


class ToolCallParser:
    """Incremental tool-call extraction for one choice: `feed(text_delta)` then `finish()`, each
    returning events ("text", s), ("call", index, id, name), ("args", index, fragment) and
    ("end", index, valid, raw_block). `parallel=False` keeps only the first call (later ones are
    dropped, neither content nor calls)."""

    def __init__(self, fmt: str, tool_names: Iterable[str], parallel: bool = True):
        self.format = get_format(fmt)
        self.names = set(tool_names)
        self.max_calls = None if parallel else 1
        self.pending = ""  # text received, not consumed yet
        self.mode = "text"  # text | call | after (a call's object ended: what follows it)
        self.content = _Content()
        self.call: Optional[_Call] = None
        self.num_calls = 0  # headers emitted
        self.out: List[Event] = []

    def feed(self, text: str) -> List[Event]:
        self.pending += text
        self._run(final=False)
        return self._take()

    def finish(self) -> List[Event]:
        self._run(final=True)
        if self.mode == "call":  # the output ends inside a call
            if self.call.decided:
                self._end_call(False)
            else:
                self._no_call()
        self.pending = ""
        self._text(self.content.take_held())
        return self._take()

    # ------------------------------------------------------------------ machinery
    def _take(self) -> List[Event]:
        out, self.out = self.out, []
        return out

    def _run(self, final: bool) -> None:
        while self._step(final):
            pass

    def _step(self, final: bool) -> bool:
        """One move of the machine; False when it waits for more text."""
        if self.mode == "text":
            return self._text_step(final)
        return self._call_step() if self.mode == "call" else self._after_step()

    def _text(self, s: str) -> None:
        if s:
            self.out.append(("text", s))

    def _begin(self, rest: str, tag: str) -> None:
        self.call = _Call(self.content.take_held() + tag)
        self.pending, self.mode = rest, "call"

    def _text_step(self, final: bool) -> bool:
        p = self.pending
        if not p:
            return False
        found = self.format.find_call(p, at_output_start=not self.content.seen)
        if found is not None:
            k, m = found
            self._text(self.content.add(p[:k]))
            self._begin(p[m:], p[k:m])
            return True
        keep = 0 if final else _partial_suffix(p, self.format.start_tag)
        self._text(self.content.add(p[:len(p) - keep]))
        self.pending = p[len(p) - keep:]
        return False

    def _call_step(self) -> bool:
        call, scanner = self.call, self.call.scanner
        self.pending = self.pending[scanner.feed(self.pending):]
        if not call.decided:
            known, name = scanner.name()
            if known or scanner.done or scanner.error:
                if name not in self.names:
                    return self._no_call()
                self._accept(call, name)
        if call.index is not None:
            fragment = call.new_args()
            if fragment:
                self.out.append(("args", call.index, fragment))
        if scanner.done or scanner.error:
            self._end_call(scanner.valid())
            return True
        return False

    def _accept(self, call: _Call, name: str) -> None:
        call.decided = True
        if self.max_calls is None or self.num_calls < self.max_calls:
            call.index = self.num_calls
            self.num_calls += 1
            self.out.append(("call", call.index, new_call_id(), name))

    def _end_call(self, valid: bool) -> None:
        call, self.call = self.call, None
        if call.index is not None:
            self.out.append(("end", call.index, valid, call.raw()))
        self.content.call_ended()
        self.mode = "after" if call.scanner.done else "text"

    def _no_call(self) -> bool:
        """The block is no call: its text is content (not scanned again for tags)."""
        call, self.call = self.call, None
        self.mode = "text"
        self._text(self.content.add(call.raw()))
        return True

    def _after_step(self) -> bool:
        nxt = self.format.after_call(self.pending)
        if nxt is None:
            return False
        kind, rest = nxt
        if kind == "call":
            self._begin(rest, "")
        else:
            self.pending, self.mode = rest, "text"
        return True


# ---------------------------------------------------------------------------------- OpenAI shapes
def _function_call(call_id: str, name: str) -> Dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": ""}}


def parse_tool_calls(text: str, fmt: str, tool_names: Iterable[str],
                     parallel: bool = True) -> Tuple[Optional[str], List[Dict[str, Any]]]:
    """Non-stream extraction: (content, tool_calls). With calls, content is the normal text around
    them or None when there is none; without, it is the text unchanged."""
    p = ToolCallParser(fmt, tool_names, parallel)
    segments: List[Any] = []  # content strings and call dicts, in order
    calls: Dict[int, Dict[str, Any]] = {}
    for kind, *ev in p.feed(text) + p.finish():
        if kind == "text":
            segments.append(ev[0])
        elif kind == "call":
            calls[ev[0]] = _function_call(ev[1], ev[2])
            segments.append(calls[ev[0]])
        elif kind == "args":
            calls[ev[0]]["function"]["arguments"] += ev[1]
        elif kind == "end" and not ev[1]:  # an invalid call is its raw text
            bad = calls.pop(ev[0])
            segments[next(i for i, s in enumerate(segments) if s is bad)] = ev[2]
    content = "".join(s for s in segments if isinstance(s, str))
    tool_calls = [s for s in segments if isinstance(s, dict)]
    if tool_calls and not content.strip(WS):
        return None, tool_calls
    return content, tool_calls


def tool_call_deltas(events: List[Event]) -> List[Dict[str, Any]]:
    """Streaming: the chat-completion deltas of `events`, adjacent pieces of the same kind merged
    (content with content, argument fragments with the same call's fragments; a call's header
    delta carries its name and empty arguments)."""
    out: List[Dict[str, Any]] = []
    for kind, *ev in events:
        last = out[-1] if out else {}
        if kind == "text":
            if "content" in last:
                last["content"] += ev[0]
            else:
                out.append({"content": ev[0]})
        elif kind == "call":
            out.append({"tool_calls": [{"index": ev[0], **_function_call(ev[1], ev[2])}]})
        elif kind == "args":
            tc = last.get("tool_calls", [{}])[0]
            if "id" not in tc and tc.get("index") == ev[0]:
                tc["function"]["arguments"] += ev[1]
            else:
                out.append({"tool_calls": [{"index": ev[0], "function": {"arguments": ev[1]}}]})
    return out
