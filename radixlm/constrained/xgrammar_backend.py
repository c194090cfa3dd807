"""xgrammar grammar backend: compiles constraints against the tokenizer's vocabulary (cached by
(type, text), off the scheduler's thread) and gives each request its own matcher.

Owns the compiler, the compile cache and the worker thread. A matcher fills its row of the step's
token bitmask, accepts sampled tokens, reports termination and the forced continuation string
used by jump-forward decoding.
"""

from __future__ import annotations

import concurrent.futures
from typing import Dict, List, Optional, Sequence

import torch

from radixlm.constrained import GrammarKey, normalize_json_schema


class XGrammarMatcher:
    def __init__(self, matcher):
        self.matcher = matcher

    def accept_token(self, token_id: int) -> bool:
        return bool(self.matcher.accept_token(token_id))

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        self.matcher.fill_next_token_bitmask(bitmask, row)

    def is_terminated(self) -> bool:
        return bool(self.matcher.is_terminated())

    def jump_forward_string(self) -> str:
        return self.matcher.find_jump_forward_string()

    def rollback(self, num_tokens: int) -> None:
        self.matcher.rollback(num_tokens)


class XGrammarBackend:
    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: Sequence[int], any_whitespace: bool = True,
                 max_whitespace_cnt: Optional[int] = None):
        try:
            import xgrammar as xgr
        except ImportError as e:
            raise RuntimeError("grammar backend 'xgrammar' is not installed (pip install xgrammar)") from e
        self.xgr = xgr
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                  stop_token_ids=list(eos_token_ids))
        self.compiler = xgr.GrammarCompiler(info, max_threads=2)
        self.vocab_size = vocab_size
        self.any_whitespace = any_whitespace
        self.max_whitespace_cnt = max_whitespace_cnt
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="grammar-compile")
        self.cache: Dict[GrammarKey, concurrent.futures.Future] = {}

    def compile_async(self, key: GrammarKey) -> concurrent.futures.Future:
        fut = self.cache.get(key)
        if fut is None:
            fut = self.cache[key] = self.pool.submit(self._compile, key)
        return fut

    def _compile(self, key: GrammarKey):
        kind, text = key
        if kind == "regex":
            return self.compiler.compile_regex(text)
        if kind == "json":
            text = normalize_json_schema(text)
            return self.compiler.compile_json_schema(text, any_whitespace=self.any_whitespace,
                                                     max_whitespace_cnt=self.max_whitespace_cnt)
        return self.compiler.compile_grammar(text)

    def new_matcher(self, compiled) -> XGrammarMatcher:
        return XGrammarMatcher(self.xgr.GrammarMatcher(compiled))

    def allocate_bitmask(self, batch_size: int) -> torch.Tensor:
        return self.xgr.allocate_token_bitmask(batch_size, self.vocab_size)

    def apply_bitmask(self, logits: torch.Tensor, bitmask: torch.Tensor, rows: List[int]) -> None:
        self.xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device), indices=list(rows))
