"""Tool calling for /v1/chat/completions: the request's tools and tool_choice, checked once.

`prepare_tools` turns a request into a `ToolSetup` (the call format, the tools a call may name,
parallel or not, and the forced-call grammar) or None when the output is not parsed for calls; every
malformed field is a 400 naming it. The parsing itself is tool_parser.py, the formats tool_formats.py,
the grammar tool_grammar.py.

tool_choice (OpenAI's semantics, SGLang/vLLM behaviour):
  "none"                        the tools are rendered into the prompt, nothing is parsed;
  "auto" (default with tools)   free decoding; the --tool-call-parser extracts calls when present;
  "required"                    decoding is constrained to one or more calls of the given tools
                                (exactly one when parallel_tool_calls is false);
  {"type": "function", "function": {"name": N}}   constrained to exactly one call of N.
Forced calls are written in the parser's own format (hermes: `<tool_call>\\n{"name": "f",
"arguments": ARGS}\\n</tool_call>`, several joined by "\\n"; llama3: `{"name": "f", "parameters":
ARGS}`, several joined by "; ") where ARGS follows xgrammar's grammar of the function's parameter
schema as compact JSON: the separators are fixed (", ", ": ") and there is no free whitespace
between tokens, whatever the server's JSON whitespace settings, so a weak model cannot spend its
max_tokens on padding (they are jump-forwarded instead). The chosen tools' schemas are bounded by
--max-grammar-bytes (400 naming tools) before any grammar is built.

parallel_tool_calls (default true): false keeps only the first parsed call with "auto" and allows
exactly one call with "required".

A forced call conflicts with response_format / regex / json_schema / ebnf (400). With "auto", such a
constraint wins: the output is returned as content and not parsed for calls.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

from radixlm.entrypoints.openai.common import BadRequest
from radixlm.entrypoints.openai.protocol import ChatCompletionRequest
from radixlm.entrypoints.openai.tool_formats import tool_call_format
from radixlm.entrypoints.openai.tool_grammar import SchemaError, forced_call_ebnf

__all__ = ["ToolSetup", "prepare_tools", "forced_call_ebnf"]

_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for function names


@dataclass
class ToolSetup:
    fmt: str  # "hermes" | "llama3"
    names: List[str]  # the tools a call may name
    parallel: bool
    ebnf: Optional[str]  # the forced-call grammar (tool_choice required / named), else None


Spec = Tuple[str, Dict[str, Any]]  # (function name, parameters schema)


def _check_tools(tools: List[Dict[str, Any]]) -> List[Spec]:
    """[(name, parameters schema)] of well-formed tools, else a 400 naming the field."""
    out: List[Spec] = []
    for i, tool in enumerate(tools):
        out.append(_check_tool(tool, f"tools.{i}", [n for n, _ in out]))
    return out


def _check_tool(tool: Dict[str, Any], where: str, taken: List[str]) -> Spec:
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
    if name in taken:
        raise BadRequest(f"{where}.function.name: {name!r} is defined twice", f"{where}.function.name")
    desc = fn.get("description")
    if desc is not None and not isinstance(desc, str):
        raise BadRequest(f"{where}.function.description must be a string", f"{where}.function.description")
    return name, _check_parameters(fn.get("parameters"), f"{where}.function.parameters")


def _check_parameters(params: Any, where: str) -> Dict[str, Any]:
    if params is None:
        params = {"type": "object", "properties": {}}
    if not isinstance(params, dict) or params.get("type", "object") != "object":
        raise BadRequest(f"{where} must be a JSON schema of type \"object\"", where)
    if not isinstance(params.get("properties", {}), dict):
        raise BadRequest(f"{where}.properties must be an object", where)
    req = params.get("required", [])
    if not isinstance(req, list) or not all(isinstance(r, str) for r in req):
        raise BadRequest(f"{where}.required must be a list of strings", where)
    return {"type": "object", **params}


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
    _check_forced(req, server_args, has_constraint)
    chosen = [(n, s) for n, s in specs if named is None or n == named]
    parallel = parallel and named is None
    return ToolSetup(fmt, [n for n, _ in chosen], parallel, _forced_grammar(fmt, chosen, parallel, names, server_args))


def _check_forced(req: ChatCompletionRequest, server_args, has_constraint: bool) -> None:
    """A forced call needs the grammar backend and no other constraint."""
    forces = f"tool_choice {json.dumps(req.tool_choice)} forces a tool call, which"
    if has_constraint:
        raise BadRequest(f"{forces} conflicts with response_format / regex / json_schema / ebnf", "response_format")
    if getattr(server_args, "grammar_backend", "xgrammar") == "none":
        raise BadRequest(f"{forces} needs constrained decoding; it is disabled (--grammar-backend none)",
                         "tool_choice")


def _forced_grammar(fmt: str, chosen: List[Spec], parallel: bool, names: List[str], server_args) -> str:
    """The EBNF of the forced call(s) of the `chosen` tools, within --max-grammar-bytes."""
    key = json.dumps(chosen, sort_keys=True)
    limit = getattr(server_args, "max_grammar_bytes", None)
    size = len(key.encode("utf-8", "replace"))
    if limit is not None and size > limit:
        raise BadRequest(f"tools: the parameter schemas of the forced call(s) are {size} bytes; at most {limit} "
                         "(--max-grammar-bytes)", "tools")
    try:
        return forced_call_ebnf(fmt, key, parallel, False, None)
    except SchemaError as e:
        i = names.index(e.name)
        raise BadRequest(f"tools.{i}.function.parameters: the schema cannot be turned into a grammar: {e}",
                         f"tools.{i}.function.parameters") from None
