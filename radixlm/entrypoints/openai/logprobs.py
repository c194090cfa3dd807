"""OpenAI's two logprobs shapes built from a request state's (logprob, token_id) lists.

Completions: `{tokens, token_logprobs, top_logprobs: [{token: logprob}], text_offset}`.
Chat: `{content: [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]}`.
`bytes` are the token's exact bytes for byte-level BPE tokenizers (a token may end inside a UTF-8
character, where its decoded text shows U+FFFD), else the UTF-8 of the decoded text.
"""

from __future__ import annotations

import json
from typing import Any, Dict, List, Optional

from radixlm.managers.tokenizer_manager import ReqState, TokenizerManager

_BYTE_LEVEL: Dict[int, bool] = {}


def _unicode_to_byte() -> Dict[str, int]:
    """Inverse of the byte-level BPE alphabet: printable bytes map to themselves, the others to
    code points from 256 upwards in byte order."""
    printable = [b for b in range(256) if 33 <= b <= 126 or 161 <= b <= 172 or 174 <= b <= 255]
    table = {chr(b): b for b in printable}
    extra = 0
    for b in range(256):
        if b not in table.values():
            table[chr(256 + extra)] = b
            extra += 1
    return table


_U2B = _unicode_to_byte()


def _is_byte_level(tokenizer) -> bool:
    key = id(tokenizer)
    if key not in _BYTE_LEVEL:
        try:
            dec = json.loads(tokenizer.backend_tokenizer.to_str()).get("decoder") or {}
            _BYTE_LEVEL[key] = dec.get("type") == "ByteLevel"
        except Exception:  # noqa: BLE001 - a slow tokenizer or an unusual backend
            _BYTE_LEVEL[key] = False
    return _BYTE_LEVEL[key]


def token_bytes(tm: TokenizerManager, token_id: int, text: str) -> List[int]:
    tok = tm.tokenizer
    if tok is not None and _is_byte_level(tok):
        piece = tok.convert_ids_to_tokens(token_id)
        if isinstance(piece, str) and piece and all(c in _U2B for c in piece):
            return [_U2B[c] for c in piece]
    return list(text.encode("utf-8"))


def completion_logprobs(tm: TokenizerManager, st: ReqState, lp_from: int, lp_to: int, offset: int,
                        prompt: bool = False) -> Dict[str, Any]:
    """Output entries lp_from:lp_to, after the prompt's entries when `prompt` (echo; the first prompt
    token has no logprob: None). `offset` is the text offset of the first token."""
    with_top = st.msg.top_logprobs_num > 0
    entries = []
    if prompt:
        tops = st.input_top_logprobs or []
        for k, (lp, tid) in enumerate(st.input_logprobs or []):
            entries.append((lp, tid, tops[k] if k < len(tops) else None))
    for k in range(lp_from, lp_to):
        entries.append((*st.logprobs[k], st.top_logprobs[k] if k < len(st.top_logprobs) else []))
    tokens, lps, top_out, offsets = [], [], [], []
    for lp, tid, top in entries:
        s = tm.decode_one(tid)
        tokens.append(s)
        lps.append(lp)
        offsets.append(offset)
        offset += len(s)
        if with_top:
            if top is None:
                top_out.append(None)
                continue
            d: Dict[str, float] = {}
            for v, t in top:  # highest first; two ids may decode to the same text: keep the best
                d.setdefault(tm.decode_one(t), v)
            top_out.append(d)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": top_out if with_top else None,
            "text_offset": offsets}


def chat_logprobs(tm: TokenizerManager, st: ReqState, lp_from: int, lp_to: int) -> Dict[str, Any]:
    def entry(lp: float, tid: int) -> Dict[str, Any]:
        s = tm.decode_one(tid)
        return {"token": s, "logprob": lp, "bytes": token_bytes(tm, tid, s)}

    content: List[Dict[str, Any]] = []
    for k in range(lp_from, lp_to):
        e = entry(*st.logprobs[k])
        top: Optional[list] = st.top_logprobs[k] if k < len(st.top_logprobs) else []
        e["top_logprobs"] = [entry(v, t) for v, t in (top or [])][:st.msg.top_logprobs_num]
        content.append(e)
    return {"content": content}
