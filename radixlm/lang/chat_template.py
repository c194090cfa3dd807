"""Role rendering: the text `system(...)`, `user(...)` and `assistant(...)` put around a turn.

A `ChatTemplate` holds, per role, the prefix written at `*_begin()` and the suffix written at
`*_end()`, plus a preamble inserted before the first role when that role is not `system` (the
template's default system prompt, or a BOS string) and the stop strings added to every gen.
`from_tokenizer` derives them from a Hugging Face tokenizer's Jinja chat template by rendering
small conversations around a marker; a template that cannot be analysed falls back to ChatML.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Dict, Optional, Tuple

logger = logging.getLogger(__name__)

_MARK = "RADIXLMMARKERq7z"


@dataclasses.dataclass
class ChatTemplate:
    name: str
    roles: Dict[str, Tuple[str, str]]
    default_preamble: str = ""
    stop_str: Tuple[str, ...] = ()

    def prefix(self, role: str) -> str:
        return self._pair(role)[0]

    def suffix(self, role: str) -> str:
        return self._pair(role)[1]

    def _pair(self, role: str) -> Tuple[str, str]:
        if role not in self.roles:
            raise ValueError(f"unknown role {role!r}; the chat template knows {sorted(self.roles)}")
        return self.roles[role]

    def begin_text(self, role: str, first_role: bool) -> str:
        """Text written at a role's beginning; the first non-system role gets the preamble first."""
        pre = self.default_preamble if first_role and role != "system" else ""
        return pre + self.prefix(role)


CHATML = ChatTemplate(
    name="chatml",
    roles={r: (f"<|im_start|>{r}\n", "<|im_end|>\n") for r in ("system", "user", "assistant")},
    default_preamble="",
    stop_str=("<|im_end|>",),
)


def _split(rendered: str) -> Tuple[str, str]:
    i = rendered.index(_MARK)
    return rendered[:i], rendered[i + len(_MARK):]


def _strip_head(text: str, head: str) -> str:
    if not text.startswith(head):
        raise ValueError("the template does not render conversations incrementally")
    return text[len(head):]


def from_tokenizer(tokenizer, name: Optional[str] = None) -> ChatTemplate:
    """Derives role prefixes/suffixes from `tokenizer.chat_template` (ChatML when it has none)."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        return CHATML

    def render(msgs, gen_prompt: bool = False) -> str:
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen_prompt)

    try:
        sys_ = {"role": "system", "content": "S"}
        usr = {"role": "user", "content": "U"}
        asst = {"role": "assistant", "content": "A"}
        sys_pre, sys_suf = _split(render([{"role": "system", "content": _MARK}]))
        sys_block = render([sys_])
        head, usr_suf = _split(render([sys_, {"role": "user", "content": _MARK}]))
        usr_pre = _strip_head(head, sys_block)
        solo_head, _ = _split(render([{"role": "user", "content": _MARK}]))
        if not solo_head.endswith(usr_pre):
            raise ValueError("the user prefix differs between positions")
        preamble = solo_head[:len(solo_head) - len(usr_pre)]
        two = render([sys_, usr])
        asst_pre, asst_suf = _split(_strip_head(render([sys_, usr, {"role": "assistant", "content": _MARK}]), two))
        gen_prompt = _strip_head(render([sys_, usr], gen_prompt=True), two)
        if gen_prompt.startswith(asst_pre) and len(gen_prompt) > len(asst_pre):
            asst_pre = gen_prompt  # e.g. an empty think block the template adds for generation
        # the user prefix after an assistant turn (templates that vary by position are rejected)
        three = render([sys_, usr, asst])
        later_pre, _ = _split(_strip_head(render([sys_, usr, asst, {"role": "user", "content": _MARK}]), three))
        if later_pre != usr_pre:
            raise ValueError("the user prefix differs between turns")
    except Exception as e:  # noqa: BLE001 - any template we cannot analyse
        logger.warning("could not derive role markers from the chat template (%s); using ChatML", e)
        return CHATML
    stop = asst_suf.strip()
    return ChatTemplate(
        name=name or getattr(tokenizer, "name_or_path", "hf") or "hf",
        roles={"system": (sys_pre, sys_suf), "user": (usr_pre, usr_suf), "assistant": (asst_pre, asst_suf)},
        default_preamble=preamble,
        stop_str=(stop,) if stop else (),
    )
