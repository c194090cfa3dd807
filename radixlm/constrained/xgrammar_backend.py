"""xgrammar grammar backend: compiles constraints against the tokenizer's vocabulary (cached by
(type, text), off the scheduler's thread) and gives each request its own matcher.

Owns the compiler, the compile cache (an LRU of at most `cache_size` grammars), the worker thread
and the compile deadline. Construction is cheap: the tokenizer info and the compiler are built on
the worker, and the first compile waits for them there, so the scheduler thread that calls the
factory never blocks on it. Every future `compile_async` returns completes within
`compile_timeout` seconds, with the compiled grammar or an exception (a compile that never returns
keeps its worker thread, and later compiles get a fresh one). A matcher fills its row of the step's
token bitmask, accepts sampled tokens, reports termination and the forced continuation string used
by jump-forward decoding.
"""

from __future__ import annotations

import collections
import concurrent.futures
import importlib.util
import threading
from typing import Dict, List, Optional, Sequence

import torch

from radixlm.constrained import DaemonWorker, GrammarKey, normalize_json_schema, structural_tag_args
from radixlm.server_args import default_of

_FIELD = {"regex": "regex", "json": "json_schema", "ebnf": "ebnf", "structural_tag": "structural_tag"}
DEFAULT_COMPILE_TIMEOUT = default_of("grammar_compile_timeout")
DEFAULT_CACHE_SIZE = default_of("grammar_cache_size")


class GrammarCompileTimeout(TimeoutError):
    """A grammar did not compile within the deadline."""


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
                 max_whitespace_cnt: Optional[int] = None, compile_timeout: float = DEFAULT_COMPILE_TIMEOUT,
                 cache_size: int = DEFAULT_CACHE_SIZE):
        if importlib.util.find_spec("xgrammar") is None:
            raise RuntimeError("grammar backend 'xgrammar' is not installed (pip install xgrammar)")
        if not compile_timeout > 0 or cache_size < 1:
            raise ValueError("compile_timeout must be positive and cache_size at least 1")
        self.vocab_size = vocab_size
        self.any_whitespace = any_whitespace
        self.max_whitespace_cnt = max_whitespace_cnt
        self.compile_timeout = compile_timeout
        self.cache_size = cache_size
        self.xgr = None
        self.compiler = None
        self._lock = threading.Lock()
        self.cache: "collections.OrderedDict[GrammarKey, concurrent.futures.Future]" = collections.OrderedDict()
        self.pool = self._new_pool()
        self._inflight: Dict[concurrent.futures.Future, concurrent.futures.Future] = {}  # ours -> the worker's
        # the expensive part (importing xgrammar, scanning the vocabulary) runs on a thread of its own
        init = DaemonWorker("grammar-init")
        self._ready = init.submit(self._init, tokenizer, vocab_size, list(eos_token_ids))
        init.shutdown()

    @staticmethod
    def _new_pool() -> DaemonWorker:
        return DaemonWorker("grammar-compile")

    def _init(self, tokenizer, vocab_size: int, eos_token_ids: List[int]) -> None:
        import xgrammar as xgr

        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=eos_token_ids)
        self.compiler = xgr.GrammarCompiler(info, max_threads=2)
        self.xgr = xgr

    def wait_ready(self, timeout: Optional[float] = None) -> None:
        """Blocks until the compiler is built (re-raises its failure)."""
        self._ready.result(timeout)

    # ------------------------------------------------------------------ compile
    def compile_async(self, key: GrammarKey) -> concurrent.futures.Future:
        """A future of the compiled grammar that completes within compile_timeout seconds."""
        with self._lock:
            fut = self.cache.get(key)
            if fut is not None:
                self.cache.move_to_end(key)
                return fut
            fut = self.cache[key] = concurrent.futures.Future()
            while len(self.cache) > self.cache_size:
                self.cache.popitem(last=False)
        timer = threading.Timer(self.compile_timeout, self._expire, (key, fut))
        timer.daemon = True
        self._run(key, fut, timer)
        timer.start()
        return fut

    def _run(self, key: GrammarKey, fut: concurrent.futures.Future, timer: threading.Timer) -> None:
        with self._lock:
            inner = self.pool.submit(self._compile, key)
            self._inflight[fut] = inner
        inner.add_done_callback(lambda f: self._settle(key, fut, f, timer))

    def _settle(self, key: GrammarKey, fut: concurrent.futures.Future, inner: concurrent.futures.Future,
                timer: threading.Timer) -> None:
        if inner.cancelled():  # queued behind a stuck compile: moves to the fresh worker, same deadline
            if not fut.done():
                self._run(key, fut, timer)
            return
        timer.cancel()
        with self._lock:
            if self._inflight.get(fut) is inner:
                del self._inflight[fut]
        err = inner.exception()
        try:
            fut.set_exception(err) if err is not None else fut.set_result(inner.result())
            return
        except concurrent.futures.InvalidStateError:  # the deadline came first
            pass
        if err is None:  # finished after its deadline: later requests for it can use the result
            with self._lock:
                if self.cache.get(key) is fut:
                    done: concurrent.futures.Future = concurrent.futures.Future()
                    done.set_result(inner.result())
                    self.cache[key] = done

    def _expire(self, key: GrammarKey, fut: concurrent.futures.Future) -> None:
        try:
            fut.set_exception(GrammarCompileTimeout(
                f"{_FIELD[key[0]]}: grammar compilation took longer than {self.compile_timeout:g} s "
                "(--grammar-compile-timeout)"))
        except concurrent.futures.InvalidStateError:  # it finished just in time
            return
        with self._lock:
            inner = self._inflight.pop(fut, None)
            stuck = inner is not None and inner.running()
            if stuck:  # the worker may never come back: later compiles get a fresh one
                old, self.pool = self.pool, self._new_pool()
        if stuck:
            old.shutdown(wait=False, cancel_futures=True)  # its queued compiles move over (_settle)
        elif inner is not None:
            inner.cancel()

    def _compile(self, key: GrammarKey):
        self._ready.result()
        kind, text = key
        if kind == "regex":
            return self.compiler.compile_regex(text)
        if kind == "json":
            text = normalize_json_schema(text)
            return self.compiler.compile_json_schema(text, any_whitespace=self.any_whitespace,
                                                     max_whitespace_cnt=self.max_whitespace_cnt)
        if kind == "structural_tag":
            return self.compiler.compile_structural_tag(*structural_tag_args(text))
        return self.compiler.compile_grammar(text)

    # ------------------------------------------------------------------ decode
    def new_matcher(self, compiled) -> XGrammarMatcher:
        return XGrammarMatcher(self.xgr.GrammarMatcher(compiled))

    def allocate_bitmask(self, batch_size: int) -> torch.Tensor:
        return self.xgr.allocate_token_bitmask(batch_size, self.vocab_size)

    def apply_bitmask(self, logits: torch.Tensor, bitmask: torch.Tensor, rows: List[int]) -> None:
        self.xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device), indices=list(rows))
