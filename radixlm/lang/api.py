"""The public functions of the frontend language: `function`, `gen`, `select`, roles, backends."""

from __future__ import annotations

import functools
import inspect
import logging
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

from radixlm.lang.choices import resolve_method, token_length_normalized
from radixlm.lang.ir import (
    Expr,
    ExprList,
    Gen,
    RoleBegin,
    RoleEnd,
    SamplingDefaults,
    Select,
    _check_regex,
    _schema_text,
    to_expr,
)

logger = logging.getLogger(__name__)

_default_backend = None
PREFIX_HINT_MIN_CHARS = 64  # run_batch caches the common prefix when it is longer than this


# ------------------------------------------------------------------------------------ backends
def set_default_backend(backend) -> None:
    global _default_backend
    _default_backend = backend


def get_default_backend():
    return _default_backend


def resolve_backend(backend=None):
    """The backend to use: the argument, else the default. A `Runtime` means its endpoint; a
    radixlm `Engine` is wrapped in an `EngineBackend`."""
    b = backend if backend is not None else _default_backend
    if b is None:
        raise ValueError("no backend: pass backend=... or call radixlm.set_default_backend(...) first")
    if hasattr(b, "endpoint") and not hasattr(b, "select"):
        return b.endpoint
    if hasattr(b, "scheduler") and hasattr(b, "generate") and not hasattr(b, "select"):
        from radixlm.lang.backend.engine_backend import EngineBackend

        cached = getattr(b, "_lang_backend", None)
        if cached is None:
            cached = EngineBackend(b)
            try:
                b._lang_backend = cached
            except AttributeError:
                pass
        return cached
    return b


def flush_cache(backend=None):
    return resolve_backend(backend).flush_cache()


def get_server_info(backend=None) -> Dict[str, Any]:
    return resolve_backend(backend).get_server_info()


# ------------------------------------------------------------------------------------ expressions
def gen(name: Optional[str] = None, max_tokens: Optional[int] = None, min_tokens: Optional[int] = None,
        stop: Union[str, Sequence[str], None] = None, stop_token_ids: Optional[Sequence[int]] = None,
        temperature: Optional[float] = None, top_p: Optional[float] = None, top_k: Optional[int] = None,
        min_p: Optional[float] = None, frequency_penalty: Optional[float] = None,
        presence_penalty: Optional[float] = None, ignore_eos: Optional[bool] = None,
        return_logprob: Optional[bool] = None, logprob_start_len: Optional[int] = None,
        top_logprobs_num: Optional[int] = None, return_text_in_logprobs: Optional[bool] = None,
        dtype: Any = None, choices: Optional[Sequence[str]] = None, choices_method: Any = None,
        regex: Optional[str] = None, json_schema: Any = None) -> Expr:
    """Generates text into variable `name`. With `choices` it is a `select`; `dtype` (int, float,
    bool, str) constrains the text with a regex; `regex` / `json_schema` constrain it directly."""
    if choices is not None:
        return select(name, choices, temperature=0.0 if temperature is None else temperature,
                      choices_method=choices_method or token_length_normalized)
    _check_regex(regex)
    if regex is not None and json_schema is not None:
        raise ValueError("gen: only one of regex and json_schema can be set")
    return Gen(name, max_new_tokens=max_tokens, min_new_tokens=min_tokens,
               stop=[stop] if isinstance(stop, str) else (list(stop) if stop is not None else None),
               stop_token_ids=list(stop_token_ids) if stop_token_ids is not None else None,
               temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
               frequency_penalty=frequency_penalty, presence_penalty=presence_penalty, ignore_eos=ignore_eos,
               return_logprob=return_logprob, logprob_start_len=logprob_start_len,
               top_logprobs_num=top_logprobs_num, return_text_in_logprobs=return_text_in_logprobs,
               regex=regex, json_schema=_schema_text(json_schema), dtype=dtype)


def gen_int(name: Optional[str] = None, max_tokens: Optional[int] = None, **kw: Any) -> Expr:
    return gen(name, max_tokens=max_tokens, dtype=int, **kw)


def gen_string(name: Optional[str] = None, max_tokens: Optional[int] = None, **kw: Any) -> Expr:
    return gen(name, max_tokens=max_tokens, dtype=str, **kw)


def select(name: Optional[str] = None, choices: Optional[Sequence[str]] = None, temperature: float = 0.0,
           choices_method: Any = token_length_normalized) -> Expr:
    """Appends the choice the backend scores highest and stores it in variable `name`."""
    if not choices:
        raise ValueError("select: choices must be a non-empty list of strings")
    if not all(isinstance(c, str) and c for c in choices):
        raise ValueError("select: every choice must be a non-empty string")
    return Select(name, choices, temperature, resolve_method(choices_method))


def _role_expr(role: str, expr: Any = None) -> Expr:
    if expr is None:
        return ExprList([RoleBegin(role), RoleEnd(role)])
    return ExprList([RoleBegin(role), to_expr(expr), RoleEnd(role)])


def system(expr: Any = None) -> Expr:
    return _role_expr("system", expr)


def user(expr: Any = None) -> Expr:
    return _role_expr("user", expr)


def assistant(expr: Any = None) -> Expr:
    return _role_expr("assistant", expr)


def system_begin() -> Expr:
    return RoleBegin("system")


def system_end() -> Expr:
    return RoleEnd("system")


def user_begin() -> Expr:
    return RoleBegin("user")


def user_end() -> Expr:
    return RoleEnd("user")


def assistant_begin() -> Expr:
    return RoleBegin("assistant")


def assistant_end() -> Expr:
    return RoleEnd("assistant")


# ------------------------------------------------------------------------------------ functions
_SAMPLING_KW = ("max_new_tokens", "min_new_tokens", "stop", "stop_token_ids", "temperature", "top_p", "top_k",
                "min_p", "frequency_penalty", "presence_penalty", "ignore_eos", "return_logprob",
                "logprob_start_len", "top_logprobs_num", "return_text_in_logprobs")


def _sampling(kw: Dict[str, Any]) -> SamplingDefaults:
    d = SamplingDefaults()
    for k in _SAMPLING_KW:
        v = kw.get(k)
        if v is not None:
            if k == "stop" and isinstance(v, str):
                v = [v]
            setattr(d, k, v)
    return d


class SglFunction:
    """A program: `f.run(**kwargs)`, `f.run_batch([...])`, `f.trace(**kwargs)`, `f.bind(**kwargs)`."""

    def __init__(self, func: Callable, num_api_spec_tokens: Optional[int] = None,
                 bind_arguments: Optional[Dict[str, Any]] = None):
        self.func = func
        self.num_api_spec_tokens = num_api_spec_tokens
        self.bind_arguments = dict(bind_arguments or {})
        params = list(inspect.signature(func).parameters.values())
        if not params or params[0].name != "s":
            raise TypeError(f"@function {func.__name__}: the first parameter must be the state `s`")
        self.arg_names = [p.name for p in params[1:]]
        self.arg_defaults = {p.name: p.default for p in params[1:] if p.default is not inspect.Parameter.empty}
        functools.update_wrapper(self, func)

    def bind(self, **kwargs: Any) -> "SglFunction":
        unknown = set(kwargs) - set(self.arg_names)
        if unknown:
            raise TypeError(f"{self.func.__name__}: unknown argument(s) {sorted(unknown)}")
        return SglFunction(self.func, self.num_api_spec_tokens, {**self.bind_arguments, **kwargs})

    def _arguments(self, args: Sequence[Any], kwargs: Dict[str, Any]) -> Dict[str, Any]:
        if len(args) > len(self.arg_names):
            raise TypeError(f"{self.func.__name__}: too many positional arguments")
        out = dict(self.bind_arguments)
        out.update(zip(self.arg_names, args))
        out.update(kwargs)
        unknown = set(out) - set(self.arg_names)
        if unknown:
            raise TypeError(f"{self.func.__name__}: unknown argument(s) {sorted(unknown)}")
        return out

    def run(self, *args: Any, max_new_tokens: int = 128, stop: Union[str, Sequence[str], None] = None,
            stop_token_ids: Optional[Sequence[int]] = None, temperature: float = 1.0, top_p: float = 1.0,
            top_k: int = -1, min_p: float = 0.0, frequency_penalty: float = 0.0, presence_penalty: float = 0.0,
            ignore_eos: bool = False, return_logprob: Optional[bool] = None,
            logprob_start_len: Optional[int] = None, top_logprobs_num: Optional[int] = None,
            return_text_in_logprobs: Optional[bool] = None, stream: bool = False, backend=None, **kwargs: Any):
        """Runs the program; returns its ProgramState (with `error()` set if it failed).
        With stream=True the body runs in the background and `state.text_iter()` follows it."""
        from radixlm.lang.interpreter import run_program

        sampling = _sampling(dict(locals()))
        arguments = self._arguments(args, kwargs)
        return run_program(self.func, resolve_backend(backend), arguments, sampling, stream=stream)

    def run_batch(self, batch_kwargs: Sequence[Any], *, max_new_tokens: int = 128,
                  stop: Union[str, Sequence[str], None] = None, stop_token_ids: Optional[Sequence[int]] = None,
                  temperature: float = 1.0, top_p: float = 1.0, top_k: int = -1, min_p: float = 0.0,
                  frequency_penalty: float = 0.0, presence_penalty: float = 0.0, ignore_eos: bool = False,
                  return_logprob: Optional[bool] = None, logprob_start_len: Optional[int] = None,
                  top_logprobs_num: Optional[int] = None, return_text_in_logprobs: Optional[bool] = None,
                  backend=None, num_threads: Union[str, int] = "auto", progress_bar: bool = False,
                  prefix_hint: bool = True):
        """Runs one program per item (a kwargs dict, or a tuple of positional arguments) on a
        thread pool; returns the states in order. A failing program keeps its error on its state;
        the others complete. The programs' common constant prefix (from tracing) is sent once first."""
        from radixlm.lang.interpreter import run_program_batch

        sampling = _sampling(dict(locals()))
        b = resolve_backend(backend)
        batch = [self._arguments(x, {}) if isinstance(x, (list, tuple)) else self._arguments((), dict(x))
                 for x in batch_kwargs]
        if prefix_hint and len(batch) > 1:
            self._send_prefix_hint(b, batch)
        return run_program_batch(self.func, b, batch, sampling, num_threads=num_threads,
                                 progress_bar=progress_bar, desc=self.func.__name__)

    def _send_prefix_hint(self, backend, batch: List[Dict[str, Any]]) -> Optional[str]:
        from radixlm.lang.tracer import common_prefix

        try:
            template = backend.get_chat_template()
            prefixes = [self.trace(backend=backend, _template=template, **args).constant_prefix()
                        for args in batch]
            prefix = common_prefix(prefixes)
            if len(prefix) > PREFIX_HINT_MIN_CHARS:
                backend.cache_prefix(prefix)
                return prefix
        except ConnectionError:
            raise
        except Exception as e:  # noqa: BLE001 - a hint only: the batch runs without it
            logger.warning("run_batch: no prefix hint (%s: %s)", type(e).__name__, e)
        return None

    def trace(self, *, backend=None, _template=None, **kwargs: Any):
        """The program's dataflow graph (a ProgramGraph); missing arguments are placeholders."""
        from radixlm.lang.tracer import trace_program

        template = _template
        if template is None:
            b = backend if backend is not None else _default_backend
            template = resolve_backend(b).get_chat_template() if b is not None else None
        return trace_program(self.func, self.func.__name__, self._arguments((), kwargs), self.arg_names,
                             self.arg_defaults, template)

    def cache(self, backend=None, **kwargs: Any) -> str:
        """Sends the program's constant prefix to the backend's cache; returns it."""
        b = resolve_backend(backend)
        prefix = self.trace(backend=b, **kwargs).constant_prefix()
        if prefix:
            b.cache_prefix(prefix)
        return prefix

    def __call__(self, *args: Any, **kwargs: Any):
        return self.run(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<radixlm.function {self.func.__name__}({', '.join(self.arg_names)})>"


def function(func: Optional[Callable] = None, *, num_api_spec_tokens: Optional[int] = None):
    """Decorator: `@function def prog(s, ...)` makes a program (the first parameter is the state)."""
    if func is None:
        return lambda f: SglFunction(f, num_api_spec_tokens=num_api_spec_tokens)
    return SglFunction(func, num_api_spec_tokens=num_api_spec_tokens)
