"""GrammarManager: the scheduler's side of a constrained request's grammar, from arrival to its
matcher.

Owns the grammar backend of one scheduler (created by its factory on the first constrained
request; the xgrammar backend does its heavy set-up on a worker of its own) and the life of each
request's grammar: its compile starts when the request arrives (`start`), the request waits in the
queue while it compiles (admission skips it), and `resolve` turns finished compiles into matchers or
into the error its request fails with. It never touches the queues or KV: the scheduler does.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

from radixlm.constrained import grammar_key
from radixlm.core import Req


class GrammarManager:
    def __init__(self, factory: Optional[Callable[[], object]], sampler):
        self._factory = factory
        self._sampler = sampler  # gets the backend, to apply token bitmasks
        self._backend = None

    def backend(self):
        """The grammar backend, created on the first constrained request."""
        if self._backend is None:
            if self._factory is None:
                raise ValueError("constrained decoding is disabled (--grammar-backend none)")
            try:
                self._backend = self._factory()
            except RuntimeError as e:
                raise ValueError(str(e)) from None
            self._sampler.grammar_backend = self._backend
        return self._backend

    def start(self, req: Req) -> None:
        """Starts compiling the request's grammar, if it has one (a ValueError: no backend)."""
        key = grammar_key(req.sampling_params)
        if key is not None:
            req.grammar_future = self.backend().compile_async(key)

    @staticmethod
    def compiling(reqs: Sequence[Req]) -> bool:
        return any(r.grammar_future is not None for r in reqs)

    def resolve(self, waiting: Sequence[Req]) -> List[Tuple[Req, str]]:
        """Requests whose grammar finished compiling get their matcher; returns the ones whose
        grammar failed, with the message they fail with."""
        failed = []
        for req in [r for r in waiting if r.grammar_future is not None and r.grammar_future.done()]:
            fut, req.grammar_future = req.grammar_future, None
            try:
                req.grammar = self._backend.new_matcher(fut.result())
            except Exception as e:  # noqa: BLE001 - a grammar the backend cannot compile
                failed.append((req, f"Invalid grammar: {e}"))
        return failed
