"""The JSON of one tool call, `{"name": "f", "arguments": {...}}`, read incrementally.

`CallScanner` owns the structural scan (strings, escapes, nesting) of one such object as its text
arrives in pieces, and what can be said about it at any point: the function name once its value is
complete, the arguments text so far (each answer extends the previous one), whether the whole call
is valid. "arguments" or "parameters" may hold the arguments (`ARG_KEYS`; the first met is used).
It knows nothing about tags, formats or the OpenAI shapes (tool_formats.py, tool_parser.py).
"""

from __future__ import annotations

import json
from typing import Dict, Optional, Tuple

ARG_KEYS = ("arguments", "parameters")
WS = " \t\r\n"  # JSON's whitespace


class CallScanner:
    """Structural, incremental scan of one JSON object `{"name": ..., "arguments": ...}`.

    `feed` stops at the object's closing brace (`done`) or at the first character that cannot belong
    to it (`error`; that character is not consumed). Top-level values are recorded as raw spans."""

    def __init__(self):
        self.buf = ""
        self.depth = 0
        self.in_str = self.esc = False
        self.state = "start"  # start | key | colon | value | after
        self.tok_start: Optional[int] = None  # start of the top-level key / value being read
        self.key: Optional[str] = None  # the top-level key last read
        self.args_key: Optional[str] = None  # the first of ARG_KEYS met: the one used
        self.fields: Dict[str, Tuple[int, int]] = {}  # top-level key -> span of its (first) value
        self.done = self.error = False

    def feed(self, s: str) -> int:
        """Scans `s`; returns how many of its characters belong to the object."""
        i0 = len(self.buf)
        self.buf += s
        for j in range(i0, len(self.buf)):
            self._step(j, self.buf[j])
            if self.error or self.done:
                end = j + 1 if self.done else j
                self.buf = self.buf[:end]
                return end - i0
        return len(s)

    # ------------------------------------------------------------------ what is known
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
        """The arguments text available so far (each result extends the previous one): an object or
        array value streams as it arrives, a string value is decoded when complete, a missing or null
        value is "{}"."""
        k = self.args_key
        if k is not None and k in self.fields:
            return _args_value(self.buf[slice(*self.fields[k])])
        if k is not None and self.key == k and self.state == "value" and self.depth >= 2:
            return self.buf[self.tok_start:]  # an object or array on its way
        return "{}" if self.done else ""

    def valid(self) -> bool:
        """Complete, valid JSON with a string name and an object or array as arguments."""
        if not self.done:
            return False
        try:
            obj = json.loads(self.buf)
            args = json.loads(self.args_text())
        except ValueError:
            return False
        return isinstance(obj, dict) and isinstance(obj.get("name"), str) and isinstance(args, (dict, list))

    # ------------------------------------------------------------------ the scan, one character at a time
    def _step(self, i: int, c: str) -> None:
        if self.in_str:
            self._string_char(i, c)
        elif self.depth == 0:
            self._outside(c)
        elif self.depth >= 2:
            self._nested(i, c)
        else:
            self._top_level(i, c)

    def _string_char(self, i: int, c: str) -> None:
        if self.esc:
            self.esc = False
        elif c == "\\":
            self.esc = True
        elif c == '"':
            self.in_str = False
            if self.depth == 1 and self.state == "key":
                self._end_key(i + 1)
            elif self.depth == 1 and self.state == "value":
                self._end_value(i + 1)

    def _outside(self, c: str) -> None:
        if c == "{" and self.state == "start":
            self.depth, self.state = 1, "key"
        elif not (c in WS and self.state == "start"):
            self.error = True

    def _nested(self, i: int, c: str) -> None:
        if c == '"':
            self.in_str = True
        elif c in "{[":
            self.depth += 1
        elif c in "}]":
            self.depth -= 1
            if self.depth == 1:
                self._end_value(i + 1)

    def _top_level(self, i: int, c: str) -> None:
        if self.state == "value" and self.tok_start is not None:  # a scalar being read
            if c in '{["':
                self.error = True
            if c not in ",}":
                return
            self._end_value(i)
        if c not in WS:
            getattr(self, "_expect_" + self.state)(i, c)

    def _expect_key(self, i: int, c: str) -> None:
        if c == '"':
            self.in_str, self.tok_start = True, i
        elif c == "}":
            self.depth, self.done = 0, True
        else:
            self.error = True

    def _expect_colon(self, i: int, c: str) -> None:
        if c == ":":
            self.state, self.tok_start = "value", None
        else:
            self.error = True

    def _expect_value(self, i: int, c: str) -> None:
        self.tok_start = i
        if c == '"':
            self.in_str = True
        elif c in "{[":
            self.depth = 2
        elif c in ",}]:":
            self.error = True

    def _expect_after(self, i: int, c: str) -> None:
        if c == ",":
            self.state = "key"
        elif c == "}":
            self.depth, self.done = 0, True
        else:
            self.error = True

    def _end_key(self, end: int) -> None:
        try:
            self.key = json.loads(self.buf[self.tok_start:end])
        except ValueError:
            self.error = True
            return
        if self.key in ARG_KEYS and self.args_key is None:
            self.args_key = self.key
        self.state, self.tok_start = "colon", None

    def _end_value(self, end: int) -> None:
        start = self.tok_start
        raw = self.buf[start:end].rstrip(WS)
        if self.key is not None and self.key not in self.fields:
            self.fields[self.key] = (start, start + len(raw))
        self.state, self.tok_start = "after", None


def _args_value(raw: str) -> str:
    """The arguments text of a complete arguments value."""
    if raw.startswith('"'):
        try:
            return json.loads(raw)
        except ValueError:
            return raw
    return "{}" if raw == "null" else raw
