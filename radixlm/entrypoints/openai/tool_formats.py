"""Tool-call formats: how a model writes its calls in the text, one small class per format.

A format says where a call may begin, what may follow one (a closing tag, a separator, the next
call) and how a forced call is written (the grammar of tool_grammar.py writes exactly what the
parser reads). The call itself is always a JSON object read by tool_call_json.CallScanner.
  hermes  `<tool_call>\\n{"name": "f", "arguments": {...}}\\n</tool_call>` blocks, any number, anywhere
          in the text (Qwen2.5, Hermes, the tiny test models' template); forced calls joined by "\\n";
  llama3  Llama-3.1 JSON calls `{"name": "f", "parameters": {...}}`, either after `<|python_tag|>`
          or at the very start of the output, several joined by ";" (forced calls by "; ").

`TOOL_CALL_PARSERS` is the registry of `--tool-call-parser` values (SGLang's names): hermes, qwen25
and qwen are the hermes format. Without the flag the format is chosen per request from the chat
template (`tool_call_format`). No web-framework imports: server_args validates the flag against it.
"""

from __future__ import annotations

import json
from typing import Any, Dict, Optional, Tuple

from radixlm.entrypoints.openai.tool_call_json import WS

# what follows a call: None = not known yet; ("text", rest) = content goes on; ("call", rest) = a call
Next = Optional[Tuple[str, str]]


class ToolCallFormat:
    name = ""
    start_tag = ""  # the tag before a call (a partial one at the end of the text is held back)
    args_key = "arguments"  # the arguments key of forced calls (the parser reads either of ARG_KEYS)
    prefix = suffix = ""  # around a forced call's JSON object
    separator = ""  # between forced calls

    def find_call(self, text: str, at_output_start: bool) -> Optional[Tuple[int, int]]:
        """(k, m) when a call begins in `text`: content is text[:k], the tag text[k:m], the JSON from m."""
        k = text.find(self.start_tag)
        return None if k < 0 else (k, k + len(self.start_tag))

    def after_call(self, text: str) -> Next:
        """What `text`, the output right after a call's JSON object, holds."""
        raise NotImplementedError

    def forced_call(self, name: str) -> Tuple[str, str]:
        """The text before and after the arguments of a forced call of `name`."""
        head = self.prefix + '{"name": ' + json.dumps(name) + ', "' + self.args_key + '": '
        return head, "}" + self.suffix


class HermesFormat(ToolCallFormat):
    name = "hermes"
    start_tag, end_tag = "<tool_call>", "</tool_call>"
    prefix, suffix, separator = "<tool_call>\n", "\n</tool_call>", "\n"

    def after_call(self, text: str) -> Next:
        body = text.lstrip(WS)
        if body.startswith(self.end_tag):
            return "text", body[len(self.end_tag):]
        if self.end_tag.startswith(body):  # nothing yet, or a partial closing tag
            return None
        return "text", body  # no closing tag: lenient


class Llama3Format(ToolCallFormat):
    name = "llama3"
    start_tag = "<|python_tag|>"
    args_key, separator = "parameters", "; "

    def find_call(self, text: str, at_output_start: bool) -> Optional[Tuple[int, int]]:
        body = text.lstrip(WS)
        if at_output_start and body.startswith("{"):  # a bare JSON call at the start of the output
            k = len(text) - len(body)
            return k, k
        return super().find_call(text, at_output_start)

    def after_call(self, text: str) -> Next:
        body = text.lstrip(WS)
        rest = body[1:].lstrip(WS) if body.startswith(";") else body
        if not rest:
            return None
        return ("call", rest) if rest.startswith("{") else ("text", body)


HERMES, LLAMA3 = HermesFormat(), Llama3Format()
FORMATS: Dict[str, ToolCallFormat] = {f.name: f for f in (HERMES, LLAMA3)}
TOOL_CALL_PARSERS: Dict[str, ToolCallFormat] = {"hermes": HERMES, "qwen25": HERMES, "qwen": HERMES,
                                                "llama3": LLAMA3}


def get_format(fmt: str) -> ToolCallFormat:
    """The format named "hermes" or "llama3"."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown tool-call format {fmt!r}")
    return FORMATS[fmt]


def tool_call_format(parser: Optional[str], chat_template: Any = None) -> str:
    """The call format ("hermes" or "llama3") for a --tool-call-parser value; None = from the template."""
    if parser:
        if parser not in TOOL_CALL_PARSERS:
            raise ValueError(f"unknown tool-call parser {parser!r} (valid: {', '.join(TOOL_CALL_PARSERS)})")
        return TOOL_CALL_PARSERS[parser].name
    return HERMES.name if HERMES.start_tag in _template_text(chat_template) else LLAMA3.name


def _template_text(chat_template: Any) -> str:
    """All the text of a chat template given as a string, a {name: template} dict or a list of those."""
    if isinstance(chat_template, dict):
        return "\n".join(str(v) for v in chat_template.values())
    if isinstance(chat_template, (list, tuple)):
        return "\n".join(str(t.get("template", "")) if isinstance(t, dict) else str(t) for t in chat_template)
    return str(chat_template or "")
