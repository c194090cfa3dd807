"""Structured generation: grammar backends that constrain decoding to a regex, JSON schema or EBNF.

`create_grammar_backend(name, ...)` imports lazily (xgrammar is needed only when a constrained
request arrives); `grammar_key(sp)` normalises a request's constraint into the cache key
(type, text); `check_grammar_syntax(key)` validates it without a tokenizer, so bad input is
rejected before scheduling. `DaemonWorker` / `call_with_deadline` run compiles and checks on daemon
threads, so one that never returns fails its request by a deadline and never blocks exit.
"""

from __future__ import annotations

import json
import re
from typing import Any, Optional, Tuple

GRAMMAR_BACKENDS = ("xgrammar", "none")

GrammarKey = Tuple[str, str]


def grammar_key(sp) -> Optional[GrammarKey]:
    if sp.regex is not None:
        return ("regex", sp.regex)
    if sp.json_schema is not None:
        s = sp.json_schema
        return ("json", s if isinstance(s, str) else json.dumps(s))
    if sp.ebnf is not None:
        return ("ebnf", sp.ebnf)
    tag = getattr(sp, "structural_tag", None)
    if tag is not None:
        return ("structural_tag", tag if isinstance(tag, str) else json.dumps(tag))
    return None


_FIELD = {"regex": "regex", "json": "json_schema", "ebnf": "ebnf", "structural_tag": "structural_tag"}


def structural_tag_args(text: str) -> tuple:
    """xgrammar's arguments for a structural tag given as JSON text: SGLang's legacy OpenAI shape
    `{"type": "structural_tag", "structures": [{begin, schema, end}], "triggers": [...]}` becomes
    (tags, triggers); the current shape (`{"type": "structural_tag", "format": {...}}`) is passed
    as it is. Raises ValueError naming structural_tag."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"structural_tag is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise ValueError("structural_tag must be a JSON object")
    if "structures" not in obj:
        return (text,)
    import xgrammar as xgr

    structures, triggers = obj.get("structures"), obj.get("triggers")
    if not isinstance(structures, list) or not isinstance(triggers, list) or not all(
            isinstance(t, str) and t for t in triggers):
        raise ValueError("structural_tag: 'structures' must be a list and 'triggers' a list of strings")
    tags = []
    for i, st in enumerate(structures):
        if not isinstance(st, dict) or not isinstance(st.get("begin"), str) or not isinstance(st.get("end"), str):
            raise ValueError(f"structural_tag: structures[{i}] needs string 'begin' and 'end' and a 'schema'")
        schema = st.get("schema", st.get("parameters"))
        if not isinstance(schema, (dict, bool)):
            raise ValueError(f"structural_tag: structures[{i}].schema must be a JSON schema object")
        tags.append(xgr.StructuralTagItem(begin=st["begin"], schema=normalize_json_schema(json.dumps(schema)),
                                          end=st["end"]))
    return (tags, triggers)
_UNSUPPORTED_KEYWORDS = ("allOf", "not", "if", "then", "else", "dependentSchemas")


def _is_string_schema(s: dict) -> bool:
    t = s.get("type")
    return t == "string" or (isinstance(t, list) and "string" in t)


def bounded_strings_as_patterns(schema: Any) -> Any:
    """Returns a copy of a JSON schema whose length-bounded strings carry an explicit pattern.

    xgrammar (0.2.x) lets raw control characters into strings with minLength/maxLength, which
    yields JSON that `json.loads` rejects. The same bounds written as a pattern over plain
    characters (no control characters, quotes or backslashes) compile correctly; validation
    against the user's schema is unchanged. Schemas the backend would silently not enforce are
    rejected with a ValueError naming json_schema.
    """
    if isinstance(schema, list):
        return [bounded_strings_as_patterns(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    for kw in _UNSUPPORTED_KEYWORDS:
        if kw in schema:
            raise ValueError(f"json_schema: '{kw}' is not supported by the grammar backend")
    out = {k: bounded_strings_as_patterns(v) for k, v in schema.items()}
    if _is_string_schema(out) and ("minLength" in out or "maxLength" in out):
        lo, hi = out.get("minLength", 0), out.get("maxLength")
        for name, v in (("minLength", lo), ("maxLength", hi)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
                raise ValueError(f"json_schema: {name} must be a non-negative integer, got {v!r}")
        if hi is not None and hi < lo:
            raise ValueError("json_schema: maxLength is smaller than minLength")
        if any(k in out for k in ("pattern", "format")):
            raise ValueError("json_schema: minLength/maxLength together with pattern or format is not supported "
                             "by the grammar backend; put the length into the pattern")
        if not any(k in out for k in ("enum", "const")):
            out.pop("minLength", None)
            out.pop("maxLength", None)
            out["pattern"] = "^[^\\x00-\\x1f\"\\\\]{%d,%s}$" % (lo, "" if hi is None else hi)
    return out


def normalize_json_schema(text: str) -> str:
    """The schema text the backend compiles (see bounded_strings_as_patterns)."""
    return json.dumps(bounded_strings_as_patterns(json.loads(text)))


def check_grammar_syntax(key: GrammarKey) -> None:
    """Raises ValueError naming the field when the constraint does not parse."""
    kind, text = key
    field = _FIELD[kind]
    if not isinstance(text, str) or not text:
        raise ValueError(f"{field} must be a non-empty string")
    if kind == "json":
        try:
            schema = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"json_schema is not valid JSON: {e}") from None
        if not isinstance(schema, (dict, bool)):
            raise ValueError("json_schema must be a JSON object")
        text = normalize_json_schema(text)
    try:
        import xgrammar as xgr
    except ImportError:  # the scheduler reports the missing backend when it compiles
        return
    try:
        if kind == "regex":
            xgr.Grammar.from_regex(text)
        elif kind == "json":
            xgr.Grammar.from_json_schema(text)
        elif kind == "structural_tag":
            if not hasattr(xgr.Grammar, "from_structural_tag"):
                raise ValueError("structural_tag: the installed xgrammar has no structural tags")
            xgr.Grammar.from_structural_tag(*structural_tag_args(text))
        else:
            xgr.Grammar.from_ebnf(text)
    except ValueError as e:
        if str(e).startswith("structural_tag"):
            raise
        raise ValueError(f"Invalid {field}: {_first_line(e)}") from None
    except Exception as e:  # noqa: BLE001 - xgrammar raises several types for bad input
        raise ValueError(f"Invalid {field}: {_first_line(e)}") from None


def _first_line(e: BaseException) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return re.sub(r"^\[[^\]]*\]\s*\S+:\d+:\s*", "", msg)  # drop xgrammar's "[time] file.cc:N:" prefix


class DaemonWorker:
    """One daemon thread running submitted calls in order (concurrent.futures style). Unlike a
    ThreadPoolExecutor's, its thread never holds up interpreter exit, so a grammar compile or check
    that never returns cannot keep the process alive. `shutdown(cancel_futures=True)` cancels the
    calls still queued; the running one is left to finish or hang on its own."""

    def __init__(self, name: str):
        import queue
        import threading

        self._q: "queue.SimpleQueue" = queue.SimpleQueue()
        self._closed = False
        threading.Thread(target=self._loop, name=name, daemon=True).start()

    def submit(self, fn, *args):
        import concurrent.futures

        if self._closed:
            raise RuntimeError("submit() after shutdown()")
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._q.put((fut, fn, args))
        return fut

    def _loop(self) -> None:
        while True:
            item = self._q.get()
            if item is None:
                return
            fut, fn, args = item
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn(*args))
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                fut.set_exception(e)

    def shutdown(self, wait: bool = False, cancel_futures: bool = False) -> None:
        import queue

        self._closed = True
        if cancel_futures:
            while True:
                try:
                    item = self._q.get_nowait()
                except queue.Empty:
                    break
                if item is not None:
                    item[0].cancel()
        self._q.put(None)


def call_with_deadline(fn, args: tuple, timeout: float, name: str):
    """fn(*args) on a daemon thread of its own; raises concurrent.futures.TimeoutError after
    `timeout` seconds (the thread is left behind: it cannot hold up exit)."""
    worker = DaemonWorker(name)
    fut = worker.submit(fn, *args)
    worker.shutdown()
    return fut.result(timeout)


def create_grammar_backend(name: str, tokenizer, vocab_size: int, eos_token_ids, **opts):
    if name == "none":
        return None
    if name == "xgrammar":
        from radixlm.constrained.xgrammar_backend import XGrammarBackend

        return XGrammarBackend(tokenizer, vocab_size, eos_token_ids, **opts)
    raise ValueError(f"Unknown grammar backend {name!r}. Valid: {', '.join(GRAMMAR_BACKENDS)}")
