"""Structured generation: grammar backends that constrain decoding to a regex, JSON schema or EBNF.

`create_grammar_backend(name, ...)` imports lazily (xgrammar is needed only when a constrained
request arrives); `grammar_key(sp)` normalises a request's constraint into the cache key
(type, text); `check_grammar_syntax(key)` validates it without a tokenizer, so bad input is
rejected before scheduling.
"""

from __future__ import annotations

import json
import re
from typing import Optional, Tuple

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
