"""Tool calling for /v1/chat/completions: request checks and the grammar of forced calls.

tool_choice (OpenAI's semantics, SGLang/vLLM behaviour):
  "none"                        the tools are rendered into the prompt, nothing is parsed;
  "auto" (default with tools)   free decoding; the --tool-call-parser extracts calls when present;
  "required"                    decoding is constrained to one or more calls of the given tools
                                (exactly one when parallel_tool_calls is false);
  {"type": "function", "function": {"name": N}}   constrained to exactly one call of N.
Forced calls are written in the parser's own format (hermes: `<tool_call>\\n{"name": "f",
"arguments": ARGS}\\n</tool_call>`, several joined by "\\n"; llama3: `{"name": "f", "parameters":
ARGS}`, several joined by "; ") where ARGS follows xgrammar's grammar of the function's parameter
schema (strict: no properties beyond those declared) as compact JSON: the separators are fixed
(", ", ": ") and there is no free whitespace between tokens, whatever the server's JSON whitespace
settings, so a weak model cannot spend its max_tokens on padding (they are jump-forwarded instead).
The chosen tools' schemas are bounded by --max-grammar-bytes (400 naming tools) before any grammar
is built.
The grammar goes to the scheduler as an `ebnf` constraint, so the output always parses unless
max_tokens or a stop string cuts it.

parallel_tool_calls (default true): false keeps only the first parsed call with "auto" and allows
exactly one call with "required".

A forced call conflicts with response_format / regex / json_schema / ebnf (400). With "auto", such a
constraint wins: the output is returned as content and not parsed for calls.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

from radixlm.entrypoints.openai.common import BadRequest
from radixlm.entrypoints.openai.protocol import ChatCompletionRequest
from radixlm.entrypoints.openai.tool_parser import tool_call_format

_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for function names
_ROOT_ALIAS = "radixlm_tool_call"


@dataclass
class ToolSetup:
    fmt: str  # "hermes" | "llama3"
    names: List[str]  # the tools a call may name
    parallel: bool
    ebnf: Optional[str]  # the forced-call grammar (tool_choice required / named), else None


def _check_tools(tools: List[Dict[str, Any]]) -> List[Tuple[str, Dict[str, Any]]]:
    """[(name, parameters schema)] of well-formed tools, else a 400 naming the field."""
    out: List[Tuple[str, Dict[str, Any]]] = []
    seen = set()
    for i, tool in enumerate(tools):
        where = f"tools.{i}"
        if tool.get("type", "function") != "function":
            raise BadRequest(f"{where}.type: only \"function\" tools are supported (got {tool.get('type')!r})",
                             f"{where}.type")
        fn = tool.get("function")
        if not isinstance(fn, dict):
            raise BadRequest(f"{where}.function is required (an object with name, description, parameters)",
                             f"{where}.function")
        name = fn.get("name")
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise BadRequest(f"{where}.function.name is required: 1 to 64 letters, digits, '_' or '-' "
                             f"(got {name!r})", f"{where}.function.name")
        if name in seen:
            raise BadRequest(f"{where}.function.name: {name!r} is defined twice", f"{where}.function.name")
        seen.add(name)
        desc = fn.get("description")
        if desc is not None and not isinstance(desc, str):
            raise BadRequest(f"{where}.function.description must be a string", f"{where}.function.description")
        params = fn.get("parameters")
        if params is None:
            params = {"type": "object", "properties": {}}
        if not isinstance(params, dict) or params.get("type", "object") != "object":
            raise BadRequest(f"{where}.function.parameters must be a JSON schema of type \"object\"",
                             f"{where}.function.parameters")
        if not isinstance(params.get("properties", {}), dict):
            raise BadRequest(f"{where}.function.parameters.properties must be an object",
                             f"{where}.function.parameters")
        req = params.get("required", [])
        if not isinstance(req, list) or not all(isinstance(r, str) for r in req):
            raise BadRequest(f"{where}.function.parameters.required must be a list of strings",
                             f"{where}.function.parameters")
        out.append((name, {"type": "object", **params}))
    return out


def _choice(req: ChatCompletionRequest, names: List[str]) -> Tuple[str, Optional[str]]:
    """("none" | "auto" | "required" | "named", the named function)."""
    choice = req.tool_choice
    if choice is None:
        return ("auto" if req.tools else "none"), None
    if isinstance(choice, str):
        if choice not in ("none", "auto", "required"):
            raise BadRequest(f"tool_choice must be \"none\", \"auto\", \"required\" or "
                             f"{{\"type\": \"function\", \"function\": {{\"name\": ...}}}} (got {choice!r})",
                             "tool_choice")
        if choice == "required" and not req.tools:
            raise BadRequest("tool_choice \"required\" needs tools", "tool_choice")
        return choice, None
    fn = choice.get("function")
    name = fn.get("name") if isinstance(fn, dict) else None
    if choice.get("type", "function") != "function" or not isinstance(name, str):
        raise BadRequest("tool_choice must be {\"type\": \"function\", \"function\": {\"name\": ...}}", "tool_choice")
    if not req.tools:
        raise BadRequest("a named tool_choice needs tools", "tool_choice")
    if name not in names:
        raise BadRequest(f"tool_choice names the function {name!r}, which is not among the tools "
                         f"({', '.join(names)})", "tool_choice")
    return "named", name


def prepare_tools(req: ChatCompletionRequest, server_args, chat_template: Any,
                  has_constraint: bool) -> Optional[ToolSetup]:
    """Checks tools / tool_choice; None when the output is not parsed for calls."""
    if req.functions or req.function_call not in (None, "none"):
        raise BadRequest("functions / function_call are deprecated and not supported; use tools / tool_choice",
                         "functions")
    specs = _check_tools(req.tools or [])
    names = [n for n, _ in specs]
    choice, named = _choice(req, names)
    if choice == "none" or not specs:
        return None
    fmt = tool_call_format(getattr(server_args, "tool_call_parser", None), chat_template)
    parallel = req.parallel_tool_calls is not False
    if choice == "auto":
        return None if has_constraint else ToolSetup(fmt, names, parallel, None)
    if has_constraint:
        raise BadRequest(f"tool_choice {json.dumps(req.tool_choice)} forces a tool call, which conflicts with "
                         "response_format / regex / json_schema / ebnf", "response_format")
    if getattr(server_args, "grammar_backend", "xgrammar") == "none":
        raise BadRequest(f"tool_choice {json.dumps(req.tool_choice)} forces a tool call, which needs constrained "
                         "decoding; it is disabled (--grammar-backend none)", "tool_choice")
    chosen = [(n, s) for n, s in specs if named is None or n == named]
    key = json.dumps(chosen, sort_keys=True)
    limit = getattr(server_args, "max_grammar_bytes", None)
    size = len(key.encode("utf-8", "replace"))
    if limit is not None and size > limit:
        raise BadRequest(f"tools: the parameter schemas of the forced call(s) are {size} bytes; at most {limit} "
                         "(--max-grammar-bytes)", "tools")
    try:
        ebnf = forced_call_ebnf(fmt, key, parallel and named is None, False, None)
    except _SchemaError as e:
        i = names.index(e.name)
        raise BadRequest(f"tools.{i}.function.parameters: the schema cannot be turned into a grammar: {e}",
                         f"tools.{i}.function.parameters") from None
    return ToolSetup(fmt, [n for n, _ in chosen], parallel and named is None, ebnf)


class _SchemaError(ValueError):
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

    from radixlm.constrained import bounded_strings_as_patterns

    def lit(s: str):
        return xgr.Grammar.from_ebnf(f"root ::= {_ebnf_literal(s)}")

    arg_key, sep = ("arguments", "\n") if fmt == "hermes" else ("parameters", "; ")
    calls = []
    for name, schema in json.loads(functions_json):
        head = '{"name": ' + json.dumps(name) + ', "' + arg_key + '": '
        head, tail = ("<tool_call>\n" + head, "}\n</tool_call>") if fmt == "hermes" else (head, "}")
        try:
            # as for json_schema constraints: length-bounded strings become patterns (xgrammar lets
            # control characters into them), keywords the backend would not enforce are refused
            schema = bounded_strings_as_patterns(schema)
            args = xgr.Grammar.from_json_schema(json.dumps(schema), any_whitespace=any_whitespace,
                                                max_whitespace_cnt=max_whitespace)
        except Exception as e:  # noqa: BLE001 - xgrammar raises several types for unsupported schemas
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            msg = re.sub(r"^json_schema: ", "", re.sub(r"^\[[^\]]*\]\s*\S+:\d+:\s*", "", msg))
            raise _SchemaError(name, msg) from None
        calls.append(xgr.Grammar.concat(lit(head), args, lit(tail)))
    one = calls[0] if len(calls) == 1 else xgr.Grammar.union(*calls)
    text = str(one)
    if not parallel:
        return text
    # root ::= call (SEP call)*: the combinators made a fresh `root` that nothing else refers to
    lines = text.splitlines()
    roots = [i for i, line in enumerate(lines) if line.startswith("root ::= ")]
    if len(roots) != 1 or _ROOT_ALIAS in text:
        raise RuntimeError("unexpected grammar text from xgrammar")
    lines[roots[0]] = f"{_ROOT_ALIAS} ::= " + lines[roots[0]][len("root ::= "):]
    lines.insert(0, f"root ::= {_ROOT_ALIAS} ({_ebnf_literal(sep)} {_ROOT_ALIAS})*")
    return "\n".join(lines) + "\n"
