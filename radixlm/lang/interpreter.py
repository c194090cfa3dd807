"""Executing programs: `ProgramState` (the `s` of a program), its worker (`StreamExecutor`), forks,
and running one program or a batch.

Each state has a worker thread that executes the expressions appended with `s += ...` in order,
so a program's body returns quickly and its forks generate concurrently (their requests batch on
the runtime). Reading a variable (`s["x"]`) waits until the worker has produced it. A failure
(in the body or in a request) is kept on the state: `state.error()` returns the exception and
`state.traceback()` its formatted traceback; later expressions are skipped and reading a variable
that was never produced raises `ProgramError` chained to it.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import queue
import threading
import traceback as tb
import uuid
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Union

from radixlm.lang.chat_template import ChatTemplate
from radixlm.lang.ir import (ForkGroupSyntax, RoleSyntax, Constant, Expr, ExprList, Gen, RoleBegin, RoleEnd, SamplingDefaults, Select,
                             VarScopeBegin, VarScopeEnd, to_expr)

logger = logging.getLogger(__name__)

_END = object()


class ProgramError(RuntimeError):
    """A variable was read from a program that failed before producing it."""


class _SetVars(Expr):
    """Internal: sets variables (and meta info) in order with the other expressions (join)."""

    def __init__(self, values: Dict[str, Any], metas: Dict[str, Any]):
        self.values, self.metas = values, metas


class _Call(Expr):
    """Internal: runs a callable on the worker, in order with the other expressions."""

    def __init__(self, fn: Callable[["StreamExecutor"], None]):
        self.fn = fn


class StreamExecutor:
    """One program state's text, messages, variables and worker thread."""

    def __init__(self, backend, arguments: Dict[str, Any], sampling: SamplingDefaults, stream: bool = False,
                 chat_template: Optional[ChatTemplate] = None):
        self.sid = uuid.uuid4().hex
        self.backend = backend
        self.arguments = arguments
        self.sampling = sampling
        self.stream = stream
        self.chat_template = chat_template or backend.get_chat_template()
        self.text_ = ""
        self.messages_: List[Dict[str, Any]] = []
        self.cur_role: Optional[str] = None
        self.cur_role_begin_pos: Optional[int] = None
        self.seen_role = False
        self.variables: Dict[str, Any] = {}
        self.meta_info: Dict[str, Any] = {}
        self.variable_event: Dict[str, threading.Event] = {}
        self.partial: Dict[str, str] = {}  # a variable's text while it streams
        self.var_scopes: Dict[str, int] = {}
        self.error_: Optional[BaseException] = None
        self.traceback_: Optional[str] = None
        self.children: List["StreamExecutor"] = []
        self.fork_var_names: set = set()  # for a fork: the variables it inherited
        self.cond = threading.Condition()
        self.finished = False  # the worker has stopped (program ended)
        self.queue: "queue.Queue" = queue.Queue()
        self.worker = threading.Thread(target=self._work, name=f"radixlm-lang-{self.sid[:8]}", daemon=True)
        self.worker.start()

    # ------------------------------------------------------------------ submission
    def submit(self, expr: Expr) -> None:
        for leaf in expr.leaves():
            name = getattr(leaf, "name", None)
            if isinstance(leaf, (Gen, Select, VarScopeEnd)) and name is not None:
                with self.cond:
                    self.variable_event.setdefault(name, threading.Event()).clear()
            elif isinstance(leaf, _SetVars):
                with self.cond:
                    for k in leaf.values:
                        self.variable_event.setdefault(k, threading.Event()).clear()
        self.queue.put(expr)

    def sync(self) -> None:
        self.queue.join()

    def end(self) -> None:
        """No more expressions: the worker finishes what is queued and stops (children too)."""
        for c in list(self.children):
            c.end()
        if not self.finished and self.worker.is_alive():
            self.queue.put(_END)

    def wait_finished(self, timeout: Optional[float] = None) -> bool:
        self.worker.join(timeout)
        return not self.worker.is_alive()

    # ------------------------------------------------------------------ worker
    def _work(self) -> None:
        while True:
            expr = self.queue.get()
            try:
                if expr is _END:
                    return
                if self.error_ is None:
                    try:
                        self._execute(expr)
                    except BaseException as e:  # noqa: BLE001 - kept for the caller
                        self.set_error(e)
            finally:
                self.queue.task_done()
                if expr is _END:
                    with self.cond:
                        self.finished = True
                        for ev in self.variable_event.values():
                            ev.set()
                        self.cond.notify_all()

    def set_error(self, e: BaseException, formatted: Optional[str] = None) -> None:
        with self.cond:
            if self.error_ is None:
                self.error_ = e
                self.traceback_ = formatted or "".join(tb.format_exception(type(e), e, e.__traceback__))
            for ev in self.variable_event.values():  # nobody waits forever on a failed program
                ev.set()
            self.cond.notify_all()

    def _append(self, text: str) -> None:
        if text:
            with self.cond:
                self.text_ += text
                self.cond.notify_all()

    def _set_var(self, name: Optional[str], value: Any, meta: Any = None, has_meta: bool = False) -> None:
        if name is None:
            return
        with self.cond:
            self.variables[name] = value
            if has_meta:
                self.meta_info[name] = meta
            self.partial.pop(name, None)
            self.variable_event.setdefault(name, threading.Event()).set()
            self.cond.notify_all()

    def _execute(self, expr: Expr) -> None:
        if isinstance(expr, ExprList):
            for e in expr.exprs:
                self._execute(e)
        elif isinstance(expr, Constant):
            self._append(expr.value)
        elif isinstance(expr, Gen):
            self._execute_gen(expr)
        elif isinstance(expr, Select):
            decision = self.backend.select(self, expr.choices, expr.temperature, expr.choices_method)
            self._append(decision.decision)
            self._set_var(expr.name, decision.decision, decision.meta_info, True)
        elif isinstance(expr, RoleBegin):
            self._role_begin(expr.role)
        elif isinstance(expr, RoleEnd):
            self._role_end(expr.role)
        elif isinstance(expr, VarScopeBegin):
            self.var_scopes[expr.name] = len(self.text_)
        elif isinstance(expr, VarScopeEnd):
            if expr.name not in self.var_scopes:
                raise ValueError(f"var_scope {expr.name!r} ended without a beginning")
            self._set_var(expr.name, self.text_[self.var_scopes.pop(expr.name):])
        elif isinstance(expr, _SetVars):
            with self.cond:
                self.meta_info.update(expr.metas)
            for k, v in expr.values.items():
                self._set_var(k, v)
        elif isinstance(expr, _Call):
            expr.fn(self)
        else:
            raise TypeError(f"cannot execute {expr!r}")

    def _execute_gen(self, expr: Gen) -> None:
        sampling = self.sampling.merged(expr, self.chat_template.stop_str)
        name = expr.name
        if self.stream:
            pieces: List[str] = []
            meta: Dict[str, Any] = {}
            for delta, meta in self.backend.generate_stream(self, sampling):
                if delta:
                    pieces.append(delta)
                    with self.cond:
                        if name is not None:
                            self.partial[name] = self.partial.get(name, "") + delta
                        self.text_ += delta
                        self.cond.notify_all()
            comp = "".join(pieces)
        else:
            comp, meta = self.backend.generate(self, sampling)
            self._append(comp)
        self._set_var(name, comp, meta, True)

    def _role_begin(self, role: str) -> None:
        if self.cur_role is not None:
            raise ValueError(f"cannot begin role {role!r} inside role {self.cur_role!r} (roles do not nest)")
        self._append(self.chat_template.begin_text(role, first_role=not self.seen_role))
        self.seen_role = True
        self.cur_role = role
        self.cur_role_begin_pos = len(self.text_)

    def _role_end(self, role: str) -> None:
        if self.cur_role != role:
            raise ValueError(f"role end {role!r} does not match the open role {self.cur_role!r}")
        content = self.text_[self.cur_role_begin_pos:]
        self._append(self.chat_template.suffix(role))
        self.messages_.append({"role": role, "content": content})
        self.cur_role = None
        self.cur_role_begin_pos = None

    # ------------------------------------------------------------------ reading
    def get_var(self, name: str) -> Any:
        ev = self.variable_event.get(name)
        if ev is not None:
            ev.wait()
        with self.cond:
            if name in self.variables:
                return self.variables[name]
            if self.error_ is not None:
                raise ProgramError(f"variable {name!r} was not produced: the program failed with "
                                   f"{type(self.error_).__name__}: {self.error_}") from self.error_
        raise KeyError(name)

    def get_meta_info(self, name: str) -> Any:
        self.get_var(name)
        return self.meta_info.get(name)

    # ------------------------------------------------------------------ fork
    def fork(self, n: int) -> List["StreamExecutor"]:
        self.sync()
        if self.error_ is not None:
            raise ProgramError(f"cannot fork a failed program: {self.error_}") from self.error_
        if n > 1 and self.text_:
            self.backend.commit_lazy_operations(self)
        kids = []
        for _ in range(n):
            k = StreamExecutor(self.backend, self.arguments, self.sampling, self.stream, self.chat_template)
            k.text_ = self.text_
            k.messages_ = copy.deepcopy(self.messages_)
            k.cur_role, k.cur_role_begin_pos, k.seen_role = self.cur_role, self.cur_role_begin_pos, self.seen_role
            k.variables = dict(self.variables)
            k.meta_info = dict(self.meta_info)
            k.fork_var_names = set(self.variables)
            kids.append(k)
        self.children.extend(kids)
        return kids


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


# ------------------------------------------------------------------------------------ running
def _new_state(backend, arguments: Dict[str, Any], sampling: SamplingDefaults, stream: bool) -> ProgramState:
    return ProgramState(StreamExecutor(backend, arguments, sampling, stream))


def _run_body(func: Callable, state: ProgramState, arguments: Dict[str, Any]) -> None:
    ex = state.stream_executor
    state._body_thread = threading.get_ident()
    try:
        func(state, **arguments)
    except BaseException as e:  # noqa: BLE001 - kept on the state
        ex.sync()
        ex.set_error(e)
        logger.debug("program %s failed: %r", getattr(func, "__name__", func), e)
    finally:
        ex.end()
        ex.wait_finished()
        state._body_done.set()


def run_program(func: Callable, backend, arguments: Dict[str, Any], sampling: SamplingDefaults,
                stream: bool = False) -> ProgramState:
    state = _new_state(backend, arguments, sampling, stream)
    if stream:  # the body runs in the background; text_iter() follows it as it grows
        state._body_done.clear()
        threading.Thread(target=_run_body, args=(func, state, arguments), daemon=True,
                         name="radixlm-lang-program").start()
    else:
        _run_body(func, state, arguments)
    return state


def default_num_threads(n: int) -> int:
    return max(1, min(n, max(96, 16 * (os.cpu_count() or 1))))


def run_program_batch(func: Callable, backend, batch_arguments: Sequence[Dict[str, Any]],
                      sampling: SamplingDefaults, num_threads: Union[str, int] = "auto",
                      progress_bar: bool = False, desc: Optional[str] = None) -> List[ProgramState]:
    n = len(batch_arguments)
    if n == 0:
        return []
    workers = default_num_threads(n) if num_threads == "auto" else max(1, min(int(num_threads), n))
    bar = None
    if progress_bar:
        from tqdm.auto import tqdm

        bar = tqdm(total=n, desc=desc or getattr(func, "__name__", "programs"))
    states: List[Optional[ProgramState]] = [None] * n

    def one(i: int) -> None:
        try:
            states[i] = run_program(func, backend, batch_arguments[i], sampling, stream=False)
        except BaseException as e:  # noqa: BLE001 - e.g. a backend that cannot start a state
            states[i] = ProgramState(_FailedExecutor(e))

    try:
        if workers == 1:
            for i in range(n):
                one(i)
                if bar is not None:
                    bar.update(1)
        else:
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="radixlm-lang-batch") as pool:
                for _ in as_completed([pool.submit(one, i) for i in range(n)]):
                    if bar is not None:  # updated from this thread only: one clean bar
                        bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return states  # type: ignore[return-value]


class _FailedExecutor:
    """Stands in for a state whose program could not even start."""

    def __init__(self, e: BaseException):
        self.error_ = e
        self.traceback_ = "".join(tb.format_exception(type(e), e, e.__traceback__))
        self.text_ = ""
        self.messages_: List[Dict[str, Any]] = []
        self.variables: Dict[str, Any] = {}
        self.variable_event: Dict[str, threading.Event] = {}
        self.meta_info: Dict[str, Any] = {}
        self.finished = True
        self.cond = threading.Condition()
        self.partial: Dict[str, str] = {}

    def sync(self) -> None:
        pass

    def get_var(self, name: str) -> Any:
        raise ProgramError(f"variable {name!r}: the program failed to start: {self.error_}") from self.error_

    def get_meta_info(self, name: str) -> Any:
        return self.get_var(name)
