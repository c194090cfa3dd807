"""Loading a checkpoint's tokenizer (HF `tokenizers` through transformers' fast tokenizer)."""

from __future__ import annotations

import os


def get_tokenizer(path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    if not os.path.isdir(path):
        raise FileNotFoundError(f"tokenizer path {path!r} is not a directory (radixlm loads local HF directories)")
    return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
