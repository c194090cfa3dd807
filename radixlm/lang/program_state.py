"""`ProgramState`, the `s` of a program (what `s += ...`, `s["x"]`, `s.fork()` do), and
`ProgramStateGroup`, the states a fork returns (`join`). Reading a variable waits for the
executor (executor.py) to produce it; a failed program raises `ProgramError` chained to the cause.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import threading
from typing import Any, Dict, Iterator, List, Optional

from radixlm.lang.executor import StreamExecutor, _SetVars
from radixlm.lang.ir import ForkGroupSyntax, RoleSyntax, to_expr

logger = logging.getLogger(__name__)


class ProgramState(RoleSyntax):
    """The `s` of a program: `s += ...` appends, `s["name"]` reads a variable (waiting for it)."""

    def __init__(self, executor: StreamExecutor):
        self.stream_executor = executor
        self._body_done = threading.Event()
        self._body_done.set()
        self._body_thread: Optional[int] = None

    # ------------------------------------------------------------------ appending
    def __iadd__(self, other: Any) -> "ProgramState":
        if other is None:
            raise TypeError("cannot append None to a program state")
        self.stream_executor.submit(to_expr(other))
        return self


    # ------------------------------------------------------------------ variables
    def __getitem__(self, name: str) -> Any:
        return self.get_var(name)

    def __setitem__(self, name: str, value: Any) -> None:
        self.set_var(name, value)

    def __contains__(self, name: str) -> bool:
        ex = self.stream_executor
        return name in ex.variables or name in ex.variable_event

    def get_var(self, name: str) -> Any:
        return self.stream_executor.get_var(name)

    def set_var(self, name: str, value: Any) -> None:
        self.stream_executor.submit(_SetVars({name: value}, {}))

    def get_meta_info(self, name: str) -> Any:
        return self.stream_executor.get_meta_info(name)

    # ------------------------------------------------------------------ whole state
    def sync(self) -> "ProgramState":
        if self._body_thread != threading.get_ident():  # outside a streaming body: wait for it to end
            self._body_done.wait()
        self.stream_executor.sync()
        return self

    def text(self) -> str:
        self.sync()
        return self.stream_executor.text_

    def messages(self) -> List[Dict[str, Any]]:
        self.sync()
        return copy.deepcopy(self.stream_executor.messages_)

    def variables(self) -> Dict[str, Any]:
        self.sync()
        return dict(self.stream_executor.variables)

    def error(self) -> Optional[BaseException]:
        self.sync()
        return self.stream_executor.error_

    def traceback(self) -> Optional[str]:
        self.sync()
        return self.stream_executor.traceback_

    def raise_for_error(self) -> "ProgramState":
        err = self.error()
        if err is not None:
            raise err
        return self

    # ------------------------------------------------------------------ forks
    def fork(self, size: int = 1) -> "ProgramStateGroup":
        if size < 1:
            raise ValueError("fork: size must be at least 1")
        kids = self.stream_executor.fork(size)
        return ProgramStateGroup([ProgramState(k) for k in kids], self)

    @contextlib.contextmanager
    def copy(self):
        group = self.fork(1)
        yield group[0]
        group.join()

    # ------------------------------------------------------------------ streaming
    def text_iter(self, var_name: Optional[str] = None) -> Iterator[str]:
        """Yields the program's text (or one variable's) as it grows; the pieces concatenate to
        the final text. Works with `run(stream=True)` (without it the pieces are coarser)."""
        ex = self.stream_executor
        if var_name is not None:
            yield from self._var_iter(var_name)
            return
        pos = 0
        while True:
            with ex.cond:
                while len(ex.text_) == pos and not ex.finished:
                    ex.cond.wait(0.5)
                chunk, done = ex.text_[pos:], ex.finished
                pos = len(ex.text_)
            if chunk:
                yield chunk
            elif done:
                return

    def _var_iter(self, name: str) -> Iterator[str]:
        ex = self.stream_executor
        sent = 0
        while True:
            with ex.cond:
                while True:
                    if name in ex.variables and ex.variable_event.get(name, threading.Event()).is_set():
                        cur, done = str(ex.variables[name]), True
                        break
                    if name in ex.partial and len(ex.partial[name]) > sent:
                        cur, done = ex.partial[name], False
                        break
                    if ex.finished or ex.error_ is not None:
                        cur, done = "", True
                        break
                    ex.cond.wait(0.5)
            if len(cur) > sent:
                yield cur[sent:]
                sent = len(cur)
            if done:
                return

    async def text_async_iter(self, var_name: Optional[str] = None, return_meta_data: bool = False):
        import asyncio

        it = self.text_iter(var_name)
        loop = asyncio.get_running_loop()
        sentinel = object()
        while True:
            chunk = await loop.run_in_executor(None, next, it, sentinel)
            if chunk is sentinel:
                return
            yield (chunk, {}) if return_meta_data else chunk

    def __repr__(self) -> str:
        ex = self.stream_executor
        return f"ProgramState(text={ex.text_[-80:]!r}, variables={sorted(ex.variables)})"


class ProgramStateGroup(ForkGroupSyntax):
    """The states returned by `s.fork(n)`. `+=` takes an expression (for every branch), a list
    (one item per branch) or a callable `i -> expression`. `join()` waits for the branches and
    gathers their new variables into the parent as lists (one item per branch)."""

    def __init__(self, states: List[ProgramState], parent: ProgramState):
        self.states = states
        self.parent = parent
        self.joined = False

    def join(self, mode: str = "gather_variable") -> None:
        if mode != "gather_variable":
            raise NotImplementedError(f"join mode {mode!r}: only 'gather_variable' is supported")
        for st in self.states:
            st.stream_executor.sync()
        errs = [st.stream_executor.error_ for st in self.states if st.stream_executor.error_ is not None]
        if errs:
            raise errs[0]
        kids = [st.stream_executor for st in self.states]
        base = kids[0].fork_var_names
        names: List[str] = []
        for k in kids:
            for n in k.variables:
                if n not in base and n not in names:
                    names.append(n)
        values = {n: [k.variables.get(n) for k in kids] for n in names}
        metas = {n: [k.meta_info.get(n) for k in kids] for n in names}
        self.parent.stream_executor.submit(_SetVars(values, metas))
        for k in kids:
            k.end()
        self.joined = True
