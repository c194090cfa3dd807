"""Tracing: running a program's body without a model to get its dataflow graph.

`f.trace(**kwargs)` runs the body with a `TracerState`. Every `s += ...` becomes nodes (constant
text, role markers, gen, select, argument and variable references), `fork`/`join` become nodes
that open and close branches, and reading a variable returns a placeholder string that records,
wherever it is pasted into a later prompt, that the variable feeds that prompt. Arguments not
given to trace() are placeholders too. The result, a `ProgramGraph`, prints as a readable listing
and is inspectable (`nodes`, `gens()`, `edges`, `inputs_of(name)`, `constant_prefix()`).

`run_batch` traces every program with its real arguments and sends the common constant prefix
once (a prefill-only request) before the batch, so every program starts with a cache hit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import traceback as tb
from typing import Any, Dict, List, Optional, Sequence, Tuple

from radixlm.lang.chat_template import CHATML, ChatTemplate
from radixlm.lang.ir import (
    Constant,
    Expr,
    ExprList,
    ForkGroupSyntax,
    Gen,
    RoleBegin,
    RoleEnd,
    RoleSyntax,
    Select,
    VarScopeBegin,
    VarScopeEnd,
    to_expr,
)

_MARK_RE = re.compile("\x00rl:(arg|var):([^\x00]*)\x00")
CONSTANT_KINDS = ("text", "role_begin", "role_end")


class TracedValue(str):
    """Placeholder for a value the tracer does not know (an argument or a generated variable)."""

    def __new__(cls, kind: str, name: str):
        obj = super().__new__(cls, f"\x00rl:{kind}:{name}\x00")
        obj.kind, obj.ref_name = kind, name
        return obj


@dataclasses.dataclass
class TraceNode:
    id: int
    kind: str  # text | role_begin | role_end | arg | var_ref | gen | select | set_var | var_scope | fork | join
    branch: str  # "main", or e.g. "main/fork0[2]"
    text: str = ""
    name: Optional[str] = None
    params: Dict[str, Any] = dataclasses.field(default_factory=dict)
    inputs: List[str] = dataclasses.field(default_factory=list)  # variables in the prompt before this node
    arguments: List[str] = dataclasses.field(default_factory=list)  # placeholder arguments in that prompt
    branches: List[str] = dataclasses.field(default_factory=list)  # fork/join: the branches

    def describe(self) -> str:
        kind = f"{self.kind:<10}"
        if self.kind in CONSTANT_KINDS:
            t = self.text if len(self.text) <= 60 else self.text[:57] + "..."
            return f"{kind} {t!r}"
        if self.kind in ("arg", "var_ref"):
            return f"{kind} {self.name}"
        if self.kind in ("gen", "select"):
            extra = " ".join(f"{k}={v!r}" for k, v in self.params.items())
            feeds = ", ".join([f"${a}" for a in self.arguments] + self.inputs) or "constants only"
            return f"{kind} {self.name!s:<12} {extra}  <- {feeds}"
        if self.kind == "fork":
            return f"{kind} x{len(self.branches)} -> {', '.join(self.branches)}"
        if self.kind == "join":
            return f"{kind} gathers {self.params.get('variables')} from {len(self.branches)} branches"
        return f"{kind} {self.name or ''}"


class ProgramGraph:
    def __init__(self, name: str):
        self.name = name
        self.nodes: List[TraceNode] = []
        self.error: Optional[BaseException] = None
        self.error_traceback: Optional[str] = None

    # ------------------------------------------------------------------ building
    def add(self, kind: str, branch: str, **kw: Any) -> TraceNode:
        node = TraceNode(id=len(self.nodes), kind=kind, branch=branch, **kw)
        self.nodes.append(node)
        return node

    # ------------------------------------------------------------------ inspecting
    def gens(self) -> List[TraceNode]:
        return [n for n in self.nodes if n.kind in ("gen", "select")]

    def branches(self) -> List[str]:
        out: List[str] = []
        for n in self.nodes:
            if n.branch not in out:
                out.append(n.branch)
        return out

    def producers(self, var: str) -> List[TraceNode]:
        return [n for n in self.nodes if n.kind in ("gen", "select", "join", "set_var", "var_scope") and
                (n.name == var or var in n.params.get("variables", ()))]

    def inputs_of(self, var: str) -> List[str]:
        """Variables and $arguments whose values are in the prompt of the node producing `var`."""
        out: List[str] = []
        for n in self.producers(var):
            for x in [f"${a}" for a in n.arguments] + n.inputs:
                if x not in out:
                    out.append(x)
        return out

    @staticmethod
    def _visible(producer_branch: str, consumer_branch: str) -> bool:
        return consumer_branch == producer_branch or consumer_branch.startswith(producer_branch + "/")

    def _latest_producer(self, var: str, before: int, branch: str, exact: bool = False) -> Optional[TraceNode]:
        for p in reversed(self.nodes[:before]):
            ok = p.branch == branch if exact else self._visible(p.branch, branch)
            if ok and p in self.producers(var):
                return p
        return None

    @property
    def edges(self) -> List[Tuple[int, int, str]]:
        """Dataflow edges (producer node id, consumer node id, variable): each variable in a
        prompt comes from its latest producer in the same branch or an enclosing one; a join's
        inputs come from each of its branches."""
        out = []
        for n in self.nodes:
            if n.kind == "join":
                for br in n.branches:
                    for var in n.params.get("variables", ()):
                        p = self._latest_producer(var, n.id, br, exact=True)
                        if p is not None:
                            out.append((p.id, n.id, var))
            elif n.kind in ("gen", "select", "var_scope"):
                for var in n.inputs:
                    p = self._latest_producer(var, n.id, n.branch)
                    if p is not None:
                        out.append((p.id, n.id, var))
        return out

    def constant_prefix(self) -> str:
        """The text every run of this program starts with (up to its first non-constant node)."""
        out = []
        for n in self.nodes:
            if n.branch != "main":
                continue
            if n.kind not in CONSTANT_KINDS:
                break
            out.append(n.text)
        return "".join(out)

    def to_dict(self) -> Dict[str, Any]:
        return {"name": self.name, "nodes": [dataclasses.asdict(n) for n in self.nodes],
                "edges": self.edges, "error": repr(self.error) if self.error else None}

    def __str__(self) -> str:
        lines = [f"ProgramGraph {self.name}: {len(self.nodes)} nodes, {len(self.gens())} gen/select"]
        for br in self.branches():
            lines.append(f"  [{br}]")
            for n in self.nodes:
                if n.branch == br:
                    lines.append(f"    #{n.id:<3} {n.describe()}")
        if self.edges:
            lines.append("  dataflow:")
            for src, dst, var in self.edges:
                lines.append(f"    #{src} --{var}--> #{dst} ({self.nodes[dst].kind} {self.nodes[dst].name or ''})")
        prefix = self.constant_prefix()
        lines.append(f"  constant prefix: {len(prefix)} chars")
        if self.error is not None:
            lines.append(f"  tracing stopped: {type(self.error).__name__}: {self.error}")
        return "\n".join(lines)

    __repr__ = __str__


class TracerState(RoleSyntax):
    """Stands in for ProgramState while tracing."""

    def __init__(self, graph: ProgramGraph, branch: str, template: ChatTemplate, arguments: Dict[str, Any]):
        self.graph = graph
        self.branch = branch
        self.template = template
        self.arguments = arguments
        self.refs: List[str] = []  # variables pasted into / generated in this prompt so far
        self.arg_refs: List[str] = []
        self.text_ = ""
        self.seen_role = False
        self.cur_role: Optional[str] = None
        self.list_vars: Dict[str, int] = {}  # variables gathered by join -> branch count
        self.known_vars: List[str] = []
        self.n_forks = 0

    # ------------------------------------------------------------------ recording
    def __iadd__(self, other: Any) -> "TracerState":
        if other is None:
            raise TypeError("cannot append None to a program state")
        for leaf in to_expr(other).leaves():
            self._record(leaf)
        return self

    def _ref(self, kind: str, name: str) -> None:
        base = name.split("[", 1)[0]
        if kind == "arg":
            if base not in self.arg_refs:
                self.arg_refs.append(base)
            self.graph.add("arg", self.branch, name=base)
        else:
            if base not in self.refs:
                self.refs.append(base)
            self.graph.add("var_ref", self.branch, name=base)

    def _text(self, text: str) -> None:
        pos = 0
        for m in _MARK_RE.finditer(text):
            if m.start() > pos:
                self.graph.add("text", self.branch, text=text[pos:m.start()])
            self._ref(m.group(1), m.group(2))
            pos = m.end()
        if pos < len(text):
            self.graph.add("text", self.branch, text=text[pos:])
        self.text_ += text

    def _record(self, e: Expr) -> None:
        if isinstance(e, Constant):
            self._text(e.value)
        elif isinstance(e, Gen):
            self.graph.add("gen", self.branch, name=e.name, params=e.params(), inputs=list(self.refs),
                           arguments=list(self.arg_refs))
            self._produced(e.name)
        elif isinstance(e, Select):
            self.graph.add("select", self.branch, name=e.name, params={"choices": e.choices},
                           inputs=list(self.refs), arguments=list(self.arg_refs))
            self._produced(e.name)
        elif isinstance(e, RoleBegin):
            if self.cur_role is not None:
                raise ValueError(f"cannot begin role {e.role!r} inside role {self.cur_role!r}")
            text = self.template.begin_text(e.role, first_role=not self.seen_role)
            self.seen_role, self.cur_role = True, e.role
            self.graph.add("role_begin", self.branch, text=text, name=e.role)
            self.text_ += text
        elif isinstance(e, RoleEnd):
            text = self.template.suffix(e.role)
            self.cur_role = None
            self.graph.add("role_end", self.branch, text=text, name=e.role)
            self.text_ += text
        elif isinstance(e, VarScopeBegin):
            pass
        elif isinstance(e, VarScopeEnd):
            self.graph.add("var_scope", self.branch, name=e.name, inputs=list(self.refs),
                           arguments=list(self.arg_refs))
            self._produced(e.name)
        elif isinstance(e, ExprList):
            for x in e.exprs:
                self._record(x)
        else:
            self.graph.add(type(e).__name__.lower(), self.branch)

    def _produced(self, name: Optional[str]) -> None:
        if name is None:
            return
        if name not in self.refs:
            self.refs.append(name)  # the generated text is part of every later prompt
        if name not in self.known_vars:
            self.known_vars.append(name)
        self.text_ += TracedValue("var", name)

    # ------------------------------------------------------------------ ProgramState API
    def __getitem__(self, name: str) -> Any:
        return self.get_var(name)

    def __setitem__(self, name: str, value: Any) -> None:
        self.set_var(name, value)

    def __contains__(self, name: str) -> bool:
        return name in self.known_vars

    def get_var(self, name: str) -> Any:
        if name in self.list_vars:
            return [TracedValue("var", f"{name}[{i}]") for i in range(self.list_vars[name])]
        return TracedValue("var", name)

    def set_var(self, name: str, value: Any) -> None:
        self.graph.add("set_var", self.branch, name=name)
        if name not in self.known_vars:
            self.known_vars.append(name)

    def get_meta_info(self, name: str) -> Dict[str, Any]:
        return {}

    def text(self) -> str:
        return self.text_

    def messages(self) -> List[Dict[str, Any]]:
        return []

    def sync(self) -> "TracerState":
        return self

    def error(self) -> None:
        return None

    def text_iter(self, var_name: Optional[str] = None):
        return iter(())


    def fork(self, size: int = 1) -> "TracerGroup":
        labels = [f"{self.branch}/fork{self.n_forks}[{i}]" for i in range(size)]
        self.n_forks += 1
        self.graph.add("fork", self.branch, branches=labels, inputs=list(self.refs), arguments=list(self.arg_refs))
        kids = []
        for label in labels:
            k = TracerState(self.graph, label, self.template, self.arguments)
            k.refs, k.arg_refs, k.text_ = list(self.refs), list(self.arg_refs), self.text_
            k.seen_role, k.cur_role = self.seen_role, self.cur_role
            k.list_vars, k.known_vars = dict(self.list_vars), list(self.known_vars)
            kids.append(k)
        return TracerGroup(kids, self)

    @contextlib.contextmanager
    def copy(self):
        group = self.fork(1)
        yield group[0]
        group.join()


class TracerGroup(ForkGroupSyntax):
    def __init__(self, states: List[TracerState], parent: TracerState):
        self.states = states
        self.parent = parent

    def join(self, mode: str = "gather_variable") -> None:
        parent = self.parent
        new: List[str] = []
        for k in self.states:
            for v in k.known_vars:
                if v not in parent.known_vars and v not in new:
                    new.append(v)
        parent.graph.add("join", parent.branch, branches=[k.branch for k in self.states],
                         params={"variables": new}, inputs=list(new))
        for v in new:
            parent.list_vars[v] = len(self.states)
            parent.known_vars.append(v)


def trace_program(func, name: str, arguments: Dict[str, Any], arg_names: Sequence[str],
                  defaults: Dict[str, Any], template: Optional[ChatTemplate] = None) -> ProgramGraph:
    """Runs `func` with a TracerState; arguments not given (and without a default) are placeholders."""
    graph = ProgramGraph(name)
    args = dict(defaults)
    args.update(arguments)
    for a in arg_names:
        if a not in args:
            args[a] = TracedValue("arg", a)
    state = TracerState(graph, "main", template or CHATML, args)
    try:
        func(state, **args)
    except Exception as e:  # noqa: BLE001 - a body that needs real values: the graph stops there
        graph.error = e
        graph.error_traceback = "".join(tb.format_exception(type(e), e, e.__traceback__))
    return graph


def common_prefix(texts: Sequence[str]) -> str:
    if not texts:
        return ""
    lo, hi = min(texts), max(texts)
    i = 0
    while i < len(lo) and lo[i] == hi[i]:
        i += 1
    return lo[:i]
