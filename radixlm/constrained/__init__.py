"""Structured generation: grammar backends that constrain decoding to a regex, JSON schema or EBNF.

`create_grammar_backend(name, ...)` imports lazily (xgrammar is needed only when a constrained
request arrives); `grammar_key(sp)` normalises a request's constraint into the cache key
(type, text); `check_grammar_syntax(key)` validates it without a tokenizer, so bad input is
rejected before scheduling.
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
    return None


_FIELD = {"regex": "regex", "json": "json_schema", "ebnf": "ebnf"}
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
        else:
            xgr.Grammar.from_ebnf(text)
    except Exception as e:  # noqa: BLE001 - xgrammar raises several types for bad input
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        msg = re.sub(r"^\[[^\]]*\]\s*\S+:\d+:\s*", "", msg)  # drop xgrammar's "[time] file.cc:N:" prefix
        raise ValueError(f"Invalid {field}: {msg}") from None


def create_grammar_backend(name: str, tokenizer, vocab_size: int, eos_token_ids, **opts):
    if name == "none":
        return None
    if name == "xgrammar":
        from radixlm.constrained.xgrammar_backend import XGrammarBackend

        return XGrammarBackend(tokenizer, vocab_size, eos_token_ids, **opts)
    raise ValueError(f"Unknown grammar backend {name!r}. Valid: {', '.join(GRAMMAR_BACKENDS)}")
