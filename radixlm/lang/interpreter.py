"""Running programs: one (`run_program`) or a batch on a thread pool (`run_program_batch`).

Each state has a worker (executor.py) that executes the expressions appended with `s += ...` in
order, so a program's body returns quickly and its forks generate concurrently (their requests
batch on the runtime); the user-facing state is program_state.py. A failure (in the body or in a
request) is kept on the state: `state.error()` returns the exception and `state.traceback()` its
formatted traceback.
"""

from __future__ import annotations

import logging
import os
import threading
import traceback as tb
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

from radixlm.lang.executor import ProgramError, StreamExecutor  # noqa: F401  (ProgramError: re-exported)
from radixlm.lang.ir import SamplingDefaults
from radixlm.lang.program_state import ProgramState

logger = logging.getLogger(__name__)


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
