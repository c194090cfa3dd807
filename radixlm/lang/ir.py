"""The expressions of the frontend language: what `s += ...` appends to a program state.

Owns the expression classes (constant text, gen, select, roles, variable scopes), the sampling
parameters a program carries (`SamplingDefaults`, merged with each gen's own settings) and the
dtype -> regex rules of `gen(dtype=...)`. Expressions are plain data: the interpreter
(`interpreter.py`, `program_state.py`, `executor.py`) executes them against a backend and the
tracer (`tracer.py`) records them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import warnings
from typing import Any, Dict, List, Optional, Sequence, Union

# dtype -> regex (the generated text of gen(dtype=int) etc. is constrained to these)
REGEX_INT = r"[-+]?[0-9]+[ \n]*"
REGEX_FLOAT = r"[-+]?[0-9]*\.?[0-9]+[ \n]*"
REGEX_BOOL = r"(True|False)"
REGEX_STR = r"\"[\w\d\s]*\""

_DTYPE_REGEX = {int: REGEX_INT, float: REGEX_FLOAT, bool: REGEX_BOOL, str: REGEX_STR,
                "int": REGEX_INT, "float": REGEX_FLOAT, "bool": REGEX_BOOL, "str": REGEX_STR}
_NUMERIC = (int, float, "int", "float")


@dataclasses.dataclass
class SamplingDefaults:
    """A program's sampling settings (from `f.run(...)`); a gen's own non-None values override them."""

    max_new_tokens: int = 128
    min_new_tokens: int = 0
    stop: Union[str, Sequence[str], None] = ()
    stop_token_ids: Sequence[int] = ()
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    ignore_eos: bool = False
    return_logprob: Optional[bool] = None
    logprob_start_len: Optional[int] = None
    top_logprobs_num: Optional[int] = None
    return_text_in_logprobs: Optional[bool] = None
    regex: Optional[str] = None
    json_schema: Optional[str] = None
    dtype: Any = None

    def merged(self, gen: "Gen", extra_stop: Sequence[str] = ()) -> "SamplingDefaults":
        """This program's defaults overridden by a gen's explicit settings; the chat template's
        stop strings are appended to the stop list."""
        out = dataclasses.replace(self)
        for f in dataclasses.fields(self):
            v = getattr(gen, f.name, None)
            if v is not None:
                setattr(out, f.name, v)
        stops = [out.stop] if isinstance(out.stop, str) else list(out.stop or ())
        if out.dtype is not None:
            regex = _DTYPE_REGEX.get(out.dtype)
            if regex is None:
                raise ValueError(f"gen: unsupported dtype {out.dtype!r} (use int, float, bool or str)")
            if out.regex is not None:
                warnings.warn("gen: both dtype and regex are set; dtype wins", stacklevel=2)
            out.regex, out.json_schema = regex, None
            if out.dtype in _NUMERIC:
                stops += [" ", "\n"]
        for s in extra_stop:
            if s and s not in stops:
                stops.append(s)
        out.stop = stops
        out.stop_token_ids = list(out.stop_token_ids or ())
        return out

    def to_native(self) -> Dict[str, Any]:
        """The `sampling_params` of a native /generate request (the fields SGLang's frontend sends)."""
        d: Dict[str, Any] = {
            "skip_special_tokens": True,
            "spaces_between_special_tokens": True,
            "max_new_tokens": self.max_new_tokens,
            "stop": list(self.stop or []),
            "stop_token_ids": list(self.stop_token_ids or []),
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "min_p": self.min_p,
            "frequency_penalty": self.frequency_penalty,
            "presence_penalty": self.presence_penalty,
            "ignore_eos": self.ignore_eos,
            "regex": self.regex,
        }
        if self.min_new_tokens:
            d["min_new_tokens"] = self.min_new_tokens
        if self.json_schema is not None:
            d["json_schema"] = self.json_schema
        return d

    def logprob_fields(self) -> Dict[str, Any]:
        """Request-level logprob fields, only those that are set (as SGLang's frontend does)."""
        out = {}
        for k in ("return_logprob", "logprob_start_len", "top_logprobs_num", "return_text_in_logprobs"):
            v = getattr(self, k)
            if v is not None:
                out[k] = v
        return out


# ------------------------------------------------------------------------------------ expressions
class Expr:
    """Base of everything `s += ...` accepts besides plain strings. `a + b` concatenates."""

    def __add__(self, other: Any) -> "ExprList":
        return ExprList([self, to_expr(other)])

    def __radd__(self, other: Any) -> "ExprList":
        return ExprList([to_expr(other), self])

    def leaves(self) -> List["Expr"]:
        return [self]


class Constant(Expr):
    def __init__(self, value: str):
        self.value = value

    def __repr__(self) -> str:
        return f"Constant({self.value!r})"


class ExprList(Expr):
    def __init__(self, exprs: List[Expr]):
        self.exprs = exprs

    def leaves(self) -> List[Expr]:
        out: List[Expr] = []
        for e in self.exprs:
            out.extend(e.leaves())
        return out

    def __repr__(self) -> str:
        return f"ExprList({self.exprs!r})"


class Gen(Expr):
    """A generation; its text is stored in the variable `name` and appended to the prompt."""

    _fields = ("max_new_tokens", "min_new_tokens", "stop", "stop_token_ids", "temperature", "top_p", "top_k",
               "min_p", "frequency_penalty", "presence_penalty", "ignore_eos", "return_logprob",
               "logprob_start_len", "top_logprobs_num", "return_text_in_logprobs", "regex", "json_schema", "dtype")

    def __init__(self, name: Optional[str] = None, **params: Any):
        self.name = name
        for f in self._fields:
            setattr(self, f, params.pop(f, None))
        if params:
            raise TypeError(f"gen: unexpected argument(s) {sorted(params)}")

    def params(self) -> Dict[str, Any]:
        return {f: getattr(self, f) for f in self._fields if getattr(self, f) is not None}

    def __repr__(self) -> str:
        return f"Gen({self.name!r}, {self.params()})"


class Select(Expr):
    """A choice among fixed strings, scored by the backend; the decision is appended."""

    def __init__(self, name: Optional[str], choices: Sequence[str], temperature: float, choices_method: Any):
        self.name = name
        self.choices = list(choices)
        self.temperature = temperature
        self.choices_method = choices_method

    def __repr__(self) -> str:
        return f"Select({self.name!r}, {self.choices!r})"


class RoleBegin(Expr):
    def __init__(self, role: str):
        self.role = role

    def __repr__(self) -> str:
        return f"RoleBegin({self.role!r})"


class RoleEnd(Expr):
    def __init__(self, role: str):
        self.role = role

    def __repr__(self) -> str:
        return f"RoleEnd({self.role!r})"


class VarScopeBegin(Expr):
    def __init__(self, name: str):
        self.name = name


class VarScopeEnd(Expr):
    def __init__(self, name: str):
        self.name = name


def to_expr(x: Any) -> Expr:
    if isinstance(x, Expr):
        return x
    if isinstance(x, str):
        return Constant(x)
    if x is None:
        raise TypeError("cannot append None to a program state")
    if isinstance(x, (list, tuple)):
        return ExprList([to_expr(e) for e in x])
    return Constant(str(x))


# ------------------------------------------------------------------------------------ constructors
def _check_regex(regex: Optional[str]) -> None:
    if regex is not None:
        try:
            re.compile(regex)
        except re.error as e:
            raise ValueError(f"gen: invalid regex {regex!r}: {e}") from None


def _schema_text(schema: Any) -> Optional[str]:
    if schema is None or isinstance(schema, str):
        return schema
    try:
        return json.dumps(schema)
    except TypeError:  # a pydantic model class
        if hasattr(schema, "model_json_schema"):
            return json.dumps(schema.model_json_schema())
        raise

class RoleSyntax:
    """`s.user(expr)`, `with s.user():`, `s.var_scope(name)`: shared by running and tracing states,
    which both accept `+=` of expressions."""

    def _role(self, role: str, expr: Any = None):
        if expr is None:
            return self._role_scope(role)
        self += ExprList([RoleBegin(role), to_expr(expr), RoleEnd(role)])
        return None

    @contextlib.contextmanager
    def _role_scope(self, role: str):
        self += RoleBegin(role)
        yield
        self += RoleEnd(role)

    def system(self, expr: Any = None):
        return self._role("system", expr)

    def user(self, expr: Any = None):
        return self._role("user", expr)

    def assistant(self, expr: Any = None):
        return self._role("assistant", expr)

    @contextlib.contextmanager
    def var_scope(self, name: str):
        self += VarScopeBegin(name)
        yield
        self += VarScopeEnd(name)


class ForkGroupSyntax:
    """Indexing, iteration and `+=` of the states that `s.fork(n)` returns: `+=` takes an expression
    (for every branch), a list (one item per branch) or a callable `i -> expression`."""

    states: List[Any]

    def __getitem__(self, i: int):
        return self.states[i]

    def __len__(self) -> int:
        return len(self.states)

    def __iter__(self):
        return iter(self.states)

    def __iadd__(self, other: Any):
        if callable(other) and not isinstance(other, Expr):
            for i, st in enumerate(self.states):
                st += other(i)
        elif isinstance(other, (list, tuple)):
            if len(other) != len(self.states):
                raise ValueError(f"fork group of {len(self.states)}: got {len(other)} items")
            for st, item in zip(self.states, other):
                st += item
        else:
            for st in self.states:
                st += other
        return self
