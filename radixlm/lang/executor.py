"""The worker behind a program state: `StreamExecutor` runs the expressions appended with
`s += ...` in order on its own thread, keeps the text, variables and meta info they produce, and
forks copies of itself. A failure is kept on the executor; later expressions are skipped.
"""

from __future__ import annotations

import copy
import logging
import queue
import threading
import traceback as tb
import uuid
from typing import Any, Callable, Dict, List, Optional

from radixlm.lang.chat_template import ChatTemplate
from radixlm.lang.ir import (
    Constant,
    Expr,
    ExprList,
    Gen,
    RoleBegin,
    RoleEnd,
    SamplingDefaults,
    Select,
    VarScopeBegin,
    VarScopeEnd,
)

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
