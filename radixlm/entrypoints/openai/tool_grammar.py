"""The grammar of forced tool calls (tool_choice "required" or named), as an EBNF constraint.

A forced call is written in the format's own text (tool_formats: `forced_call`, `separator`) around
arguments that follow xgrammar's grammar of the function's parameter schema (strict: no properties
beyond those declared). The grammar goes to the scheduler as an `ebnf` constraint, so the output
always parses unless max_tokens or a stop string cuts it. Schemas xgrammar cannot enforce raise
`SchemaError` naming the function.
"""

from __future__ import annotations

import functools
import json
import re
from typing import Optional

from radixlm.entrypoints.openai.tool_formats import get_format

_ROOT_ALIAS = "radixlm_tool_call"


class SchemaError(ValueError):
    def __init__(self, name: str, msg: str):
        super().__init__(msg)
        self.name = name


def _ebnf_literal(s: str) -> str:
    return json.dumps(s)  # JSON string escapes (\", \\, \n, \uXXXX) read the same in xgrammar's EBNF


@functools.lru_cache(maxsize=64)
def forced_call_ebnf(fmt: str, functions_json: str, parallel: bool, any_whitespace: bool,
                     max_whitespace: Optional[int]) -> str:
    """EBNF (xgrammar dialect, `root` rule) of one call, or of one or more calls when `parallel`, of
    the functions [(name, parameters schema)] given as JSON, in the call format `fmt`."""
    import xgrammar as xgr

    form = get_format(fmt)
    calls = []
    for name, schema in json.loads(functions_json):
        head, tail = form.forced_call(name)
        args = _arguments_grammar(name, schema, any_whitespace, max_whitespace)
        calls.append(xgr.Grammar.concat(_literal(head), args, _literal(tail)))
    one = str(calls[0] if len(calls) == 1 else xgr.Grammar.union(*calls))
    return _repeated(one, form.separator) if parallel else one


def _literal(s: str):
    import xgrammar as xgr

    return xgr.Grammar.from_ebnf(f"root ::= {_ebnf_literal(s)}")


def _arguments_grammar(name: str, schema: dict, any_whitespace: bool, max_whitespace: Optional[int]):
    import xgrammar as xgr

    from radixlm.constrained import bounded_strings_as_patterns

    try:
        # as for json_schema constraints: length-bounded strings become patterns (xgrammar lets
        # control characters into them), keywords the backend would not enforce are refused
        schema = bounded_strings_as_patterns(schema)
        return xgr.Grammar.from_json_schema(json.dumps(schema), any_whitespace=any_whitespace,
                                            max_whitespace_cnt=max_whitespace)
    except Exception as e:  # noqa: BLE001 - xgrammar raises several types for unsupported schemas
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        msg = re.sub(r"^json_schema: ", "", re.sub(r"^\[[^\]]*\]\s*\S+:\d+:\s*", "", msg))
        raise SchemaError(name, msg) from None


def _repeated(text: str, sep: str) -> str:
    """root ::= call (SEP call)*: the combinators made a fresh `root` that nothing else refers to."""
    lines = text.splitlines()
    roots = [i for i, line in enumerate(lines) if line.startswith("root ::= ")]
    if len(roots) != 1 or _ROOT_ALIAS in text:
        raise RuntimeError("unexpected grammar text from xgrammar")
    lines[roots[0]] = f"{_ROOT_ALIAS} ::= " + lines[roots[0]][len("root ::= "):]
    lines.insert(0, f"root ::= {_ROOT_ALIAS} ({_ebnf_literal(sep)} {_ROOT_ALIAS})*")
    return "\n".join(lines) + "\n"
