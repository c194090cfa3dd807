"""Loading a checkpoint's tokenizer (HF `tokenizers` through transformers' fast tokenizer)."""

from __future__ import annotations

import os
from typing import Optional


def get_tokenizer(path: str, trust_remote_code: bool = False, chat_template: Optional[str] = None):
    """The tokenizer of a local directory (or a hub id, resolved through the hub cache).
    `chat_template`: --chat-template (a file or a built-in name, radixlm/models/hub.py), replacing
    the tokenizer's own template."""
    from transformers import AutoTokenizer

    if not os.path.isdir(path):
        from radixlm.models.hub import resolve_model_path

        path = resolve_model_path(path, field="tokenizer_path")
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if chat_template is not None:
        from radixlm.models.hub import load_chat_template

        tok.chat_template = load_chat_template(chat_template)
    return tok
