"""The cpu_peers run: tools x workloads, back to back, then the table (see the package docstring)."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import shlex
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

from radixlm.bench import serving

DEFAULT_MODEL = "models/bench-llama-88m"
# the 88M Llama of issue 18: make_tiny_model's `medium` llama (hidden 768, 12 layers, 12/4 heads) narrowed
MODEL_OVERRIDES = {"vocab_size": 8000, "intermediate_size": 2048}
# llama-server's configuration for prompt caching and concurrency: 32 slots (every request of `concurrent` in
# flight at once; every agent session keeps its own slot: the llama-cpp backend pins sessions with `id_slot`)
# over one unified KV cache; `--no-cache-idle-slots`: idle slots keep their KV (by default, with a unified cache,
# they are moved to the host-memory prompt cache and cleared when a task starts, and a pinned slot then has
# nothing cached); prompt caching per request (`cache_prompt`). Measured with 3 interleaved sessions: stock
# settings reuse only the shared system prompt at every turn (the server's own slot choice hands a session to a
# slot that another session filled); this configuration reuses each session's whole history.
LLAMA_BEST_ARGS = "-np 32 --kv-unified --no-cache-idle-slots -c 32768"
LLAMA_STOCK_ARGS = "-c 32768"


@dataclass
class Tool:
    name: str
    kind: str  # hf | llama | radixlm
    dtype: str  # f32 / f16 (llama), float32 / bfloat16 (radixlm, hf)
    stock: bool = False


TOOLS = {
    "hf": Tool("hf", "hf", "float32"),
    "llama-f32": Tool("llama-f32", "llama", "f32"),
    "llama-f16": Tool("llama-f16", "llama", "f16"),
    "llama-f32-stock": Tool("llama-f32-stock", "llama", "f32", stock=True),
    "llama-f16-stock": Tool("llama-f16-stock", "llama", "f16", stock=True),
    "radixlm-fp32": Tool("radixlm-fp32", "radixlm", "float32"),
    "radixlm-bf16": Tool("radixlm-bf16", "radixlm", "bfloat16"),
}
DEFAULT_TOOLS = ("hf", "llama-f32", "llama-f16", "radixlm-fp32", "radixlm-bf16")
LABELS = {"hf": "HF fp32", "llama-f32": "llama-server f32", "llama-f16": "llama-server f16",
          "llama-f32-stock": "llama-server f32 (stock)", "llama-f16-stock": "llama-server f16 (stock)",
          "radixlm-fp32": "radixlm fp32", "radixlm-bf16": "radixlm bf16"}


@dataclass
class WorkloadSpec:
    name: str
    title: str
    full: List[str]  # bench_serving flags
    quick: List[str]
    metric: str  # decode_tok_s | mean_ttft_s | output_tok_s
    higher_is_better: bool
    hf_mode: str  # sequential | batched | agent
    notes: Dict[str, str] = field(default_factory=dict)


def _random(n, i, o, conc):
    return ["--dataset-name", "random", "--num-prompts", str(n), "--random-input-len", str(i),
            "--random-output-len", str(o), "--random-range-ratio", "1.0", "--max-concurrency", str(conc)]


def _gsp(n, sys_len, q, o):
    return ["--dataset-name", "generated-shared-prefix", "--gsp-num-groups", "1", "--gsp-prompts-per-group", str(n),
            "--gsp-system-prompt-len", str(sys_len), "--gsp-question-len", str(q), "--gsp-output-len", str(o),
            "--max-concurrency", "1"]


def _agent(s, t, sys_len, turn, o):
    return ["--dataset-name", "agent-multiturn", "--num-sessions", str(s), "--num-turns", str(t),
            "--system-prompt-len", str(sys_len), "--turn-len", str(turn), "--turn-output-len", str(o),
            "--retry-ratio", "0", "--max-concurrency", "1"]


WORKLOADS = {
    "decode": WorkloadSpec("decode", "single-stream decode, tok/s", _random(1, 32, 256, 1), _random(1, 32, 64, 1),
                           "decode_tok_s", True, "sequential"),
    "ttft": WorkloadSpec("ttft", "TTFT of a 2048-token prompt", _random(2, 2048, 2, 1), _random(1, 1024, 2, 1),
                         "mean_ttft_s", False, "sequential"),
    "concurrent": WorkloadSpec("concurrent", "32 requests (256 in, 64 out), 32 in flight, out tok/s",
                               _random(32, 256, 64, 32), _random(8, 128, 16, 8), "output_tok_s", True, "batched"),
    "shared": WorkloadSpec("shared", "1024 shared + 64 new, 16 sequential, mean TTFT", _gsp(16, 1024, 64, 8),
                           _gsp(4, 512, 32, 4), "mean_ttft_s", False, "sequential"),
    "agent": WorkloadSpec("agent", "agent-multiturn, 8 interleaved sessions x 4 turns, mean TTFT (turn 1 -> 4)",
                          _agent(8, 4, 1500, 150, 32), _agent(4, 3, 512, 64, 16), "mean_ttft_s", False, "agent"),
}
QUICK_TITLES = {"decode": "single-stream decode (64 tokens), tok/s", "ttft": "TTFT of a 1024-token prompt",
                "concurrent": "8 requests (128 in, 16 out), 8 in flight, out tok/s",
                "shared": "512 shared + 32 new, 4 sequential, mean TTFT",
                "agent": "agent-multiturn, 4 interleaved sessions x 3 turns, mean TTFT (turn 1 -> 3)"}


# ---------------------------------------------------------------------------------------------- model
def ensure_model(path: str, log: Callable[[str], None] = print) -> str:
    """The benchmark checkpoint at `path`, generated with make_tiny_model (seed 0) when it is missing."""
    p = pathlib.Path(path)
    if not (p / "config.json").is_file() or not (p / "model.safetensors").is_file():
        from radixlm.tools.make_tiny_model import make_tiny_model

        log(f"generating {path}: llama medium with {MODEL_OVERRIDES}")
        make_tiny_model(p, arch="llama", size="medium", **MODEL_OVERRIDES)
    return str(p)


def count_params(path: str) -> int:
    from safetensors import safe_open

    n = 0
    with safe_open(str(pathlib.Path(path) / "model.safetensors"), "pt") as f:
        for k in f.keys():
            n += _prod(f.get_slice(k).get_shape())
    return n


def _prod(xs) -> int:
    out = 1
    for x in xs:
        out *= int(x)
    return out


# ---------------------------------------------------------------------------------------------- metrics
def extract(spec: WorkloadSpec, m: Dict) -> Dict:
    """The workload's figures from a bench_serving summary."""
    out = {"mean_ttft_s": m["mean_ttft_ms"] / 1000, "output_tok_s": m["output_throughput"],
           "completed": m["completed"], "failed": m["failed"], "duration_s": m["duration"]}
    if m.get("mean_tpot_ms"):
        out["decode_tok_s"] = 1000.0 / m["mean_tpot_ms"]
    turns = m.get("per_turn") or []
    if turns:
        out["ttft_by_turn_s"] = [round(t["mean_ttft_ms"] / 1000, 4) for t in turns]
        out["mean_cached_by_turn"] = [round(t["mean_cached_tokens"], 1) for t in turns]
    return out


def fmt_value(spec: WorkloadSpec, r: Optional[Dict]) -> str:
    if r is None:
        return "-"
    if "error" in r:
        return "n/a"
    v = r.get(spec.metric)
    if v is None:
        return "-"
    s = f"{v:.1f}" if spec.metric != "mean_ttft_s" else f"{v:.2f} s"
    if spec.name == "agent" and r.get("ttft_by_turn_s"):
        t = r["ttft_by_turn_s"]
        s += f" ({t[0]:.2f} -> {t[-1]:.2f})"
    if r.get("hand_reused_mean_ttft_s") is not None:
        s += f" ({r['hand_reused_mean_ttft_s']:.2f} hand-reused)"
    return s


def ratio(spec: WorkloadSpec, a: Optional[Dict], b: Optional[Dict]) -> Optional[float]:
    """How many times better `a` is than `b` on the workload's metric (> 1: a is better)."""
    if not a or not b or "error" in a or "error" in b:
        return None
    x, y = a.get(spec.metric), b.get(spec.metric)
    if not x or not y:
        return None
    return x / y if spec.higher_is_better else y / x


RATIOS = (("radixlm-fp32", "llama-f32"), ("radixlm-bf16", "llama-f16"), ("radixlm-fp32", "hf"))


def markdown(report: Dict) -> str:
    tools = report["tools"]
    specs = [WORKLOADS[w] for w in report["workloads"]]
    res = report["results"]
    ratios = [(a, b) for a, b in RATIOS if a in tools and b in tools]
    head = ["workload"] + [LABELS[t] for t in tools] + [f"{LABELS[a]} vs {LABELS[b]}" for a, b in ratios]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for spec in specs:
        title = QUICK_TITLES[spec.name] if report["quick"] else spec.title
        cells = [title] + [fmt_value(spec, res.get(t, {}).get(spec.name)) for t in tools]
        for a, b in ratios:
            r = ratio(spec, res.get(a, {}).get(spec.name), res.get(b, {}).get(spec.name))
            cells.append("-" if r is None else f"{r:.2f}x")
        lines.append("| " + " | ".join(cells) + " |")
    if report.get("parity"):
        cells = ["greedy tokens equal to HF's (decode request, leading)"]
        for t in tools:
            p = report["parity"].get(t)
            cells.append("-" if p is None else f"{p[0]}/{p[1]}")
        lines.append("| " + " | ".join(cells + ["" for _ in ratios]) + " |")
    notes = ["", f"Ratios: > 1 means the first tool is better (higher tok/s, or lower TTFT). {report['threads']} "
                 f"threads per tool; model {report['model_path']} ({report['params'] / 1e6:.1f}M parameters).",
             f"Wall time {report['wall_s']:.0f} s; load average (1 min) before/after each tool: "
             + ", ".join(f"{t} {v['load_before'][0]:.2f}/{v['load_after'][0]:.2f}"
                         for t, v in report["per_tool"].items()) + "."]
    errs = [f"{t} {w}: {r['error']}" for t, ws in res.items() for w, r in ws.items() if "error" in r]
    errs += [f"{t}: {v['error']}" for t, v in report["per_tool"].items() if v.get("error")]
    if errs:
        notes.append("Not measured: " + "; ".join(e.splitlines()[0][:200] for e in errs))
    return "\n".join(lines + notes)


# ---------------------------------------------------------------------------------------------- runners
def _bench_args(spec: WorkloadSpec, quick: bool, backend: str, seed: int) -> argparse.Namespace:
    return serving.build_parser().parse_args((spec.quick if quick else spec.full) + [
        "--backend", backend, "--disable-tqdm", "--seed", str(seed), "--warmup-requests", "1"])


def llama_slots(llama_args: str) -> int:
    """The -np/--parallel of llama-server flags (0 when not given: the server's default, left to the server)."""
    a = shlex.split(llama_args)
    for flag in ("-np", "--parallel"):
        if flag in a and a.index(flag) + 1 < len(a):
            return int(a[a.index(flag) + 1])
    return 0


def run_server_tool(base_url: str, backend: str, specs: List[WorkloadSpec], quick: bool, tokenizer, seed: int,
                    log: Callable[[str], None], pin_slots: int = 0) -> Tuple[Dict[str, Dict], Dict[str, List[int]]]:
    """`pin_slots`: llama-server slots the agent sessions are pinned to (0: the server chooses)."""
    out, first_ids = {}, {}
    for spec in specs:
        args = _bench_args(spec, quick, backend, seed)
        args.flush_cache = backend == "radixlm"
        args.llama_exact_ids = spec.name in ("decode", "agent")  # the parity check; the agent's history
        args.llama_pin_slots = pin_slots if spec.name == "agent" else 0
        wl = serving.build_workload(args, tokenizer)
        try:
            m, results = serving.run_against_server(args, base_url, wl, tokenizer, label=spec.name)
        except Exception as e:  # noqa: BLE001 - one failed workload does not end the run
            out[spec.name] = {"error": f"{type(e).__name__}: {e}"}
            continue
        out[spec.name] = extract(spec, m)
        if m["failed"]:
            out[spec.name]["first_error"] = next((r.error for r in results if not r.success), "")
        if spec.name == "decode" and results:
            first_ids[spec.name] = results[0].output_ids
        log(f"  {spec.name}: {fmt_value(spec, out[spec.name])}")
    return out, first_ids


def run_hf_tool(model_path: str, specs: List[WorkloadSpec], quick: bool, tokenizer, seed: int,
                log: Callable[[str], None]) -> Tuple[Dict[str, Dict], Dict[str, List[int]]]:
    from radixlm.bench import hf_peer
    from radixlm.bench.metrics import summarize

    model = hf_peer.load_model(model_path)
    out, first_ids = {}, {}
    for spec in specs:
        args = _bench_args(spec, quick, "radixlm", seed)
        wl = serving.build_workload(args, tokenizer)
        extra = {}
        if spec.hf_mode == "agent":
            results, dur = hf_peer.run_agent(model_path, wl.sessions, model=model, mode="served",
                                             max_concurrency=args.max_concurrency)
        elif spec.hf_mode == "batched":
            results, dur = hf_peer.run_batched(model_path, wl.requests, None, model=model)
        else:
            results, dur = hf_peer.run_sequential(model_path, wl.requests, model=model)
            if spec.name == "shared":
                reused, rdur = hf_peer.run_sequential(model_path, wl.requests, model=model, reuse_prefix=True)
                extra["hand_reused_mean_ttft_s"] = summarize(reused, rdur)["mean_ttft_ms"] / 1000
        out[spec.name] = {**extract(spec, summarize(results, dur, backend="hf", dataset_name=wl.name)), **extra}
        if spec.name == "decode" and results:
            first_ids[spec.name] = results[0].output_ids
        log(f"  {spec.name}: {fmt_value(spec, out[spec.name])}")
    return out, first_ids


@contextlib.contextmanager
def _env(**kv):
    old = {k: os.environ.get(k) for k in kv}
    os.environ.update({k: str(v) for k, v in kv.items()})
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def parse_env(spec: str) -> Dict[str, str]:
    """`"A=1 B="` -> {"A": "1", "B": ""} (the --radixlm-env value)."""
    out = {}
    for item in shlex.split(spec):
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise SystemExit(f"--radixlm-env: {item!r} is not NAME=VALUE")
        out[key] = value
    return out


@contextlib.contextmanager
def launch(tool: Tool, model_path: str, threads: int, llama_args: str, radixlm_args: str,
           radixlm_env: Optional[Dict[str, str]] = None):
    """Starts the tool's server; yields (base_url, backend)."""
    if tool.kind == "llama":
        from radixlm.bench.cpu_peers.llama_cpp import LlamaServerProcess, ensure_gguf

        gguf = ensure_gguf(model_path, tool.dtype)
        extra = shlex.split(LLAMA_STOCK_ARGS if tool.stock else llama_args)
        ctx = 32768
        if "-c" in extra:
            i = extra.index("-c")
            ctx = int(extra[i + 1])
            del extra[i:i + 2]
        with LlamaServerProcess(gguf, threads=threads, ctx_size=ctx, extra=extra) as srv:
            yield srv.base_url, "llama-cpp"
    else:
        from radixlm.bench.launcher import ServerProcess

        with _env(OMP_NUM_THREADS=threads, **(radixlm_env or {})), \
                ServerProcess(model_path, ["--dtype", tool.dtype, *shlex.split(radixlm_args)], timeout=300.0) as srv:
            yield srv.base_url, "radixlm"


def leading_equal(a: List[int], b: List[int]) -> Tuple[int, int]:
    n = min(len(a), len(b))
    k = next((i for i in range(n) if a[i] != b[i]), n)
    return k, n


# ---------------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    from radixlm.bench import cpu_peers

    ap = argparse.ArgumentParser(prog="python -m radixlm.bench.cpu_peers", description=cpu_peers.__doc__,
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--model-path", default=DEFAULT_MODEL, help="HF checkpoint; generated (88M Llama) if missing")
    ap.add_argument("--tools", default=",".join(DEFAULT_TOOLS), help=f"comma list from {list(TOOLS)}")
    ap.add_argument("--workloads", default=",".join(WORKLOADS), help=f"comma list from {list(WORKLOADS)}")
    ap.add_argument("--quick", action="store_true", help="smaller workloads (a run of a few minutes)")
    ap.add_argument("--threads", type=int, default=2, help="threads per tool (torch, llama-server -t/-tb)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--llama-args", default=LLAMA_BEST_ARGS, help="llama-server flags of the llama-f32/f16 tools")
    ap.add_argument("--radixlm-args", default="", help="extra launch_server flags of the radixlm tools")
    ap.add_argument("--radixlm-env", default="",
                    help="environment of the radixlm servers only, e.g. 'OMP_WAIT_POLICY= GOMP_SPINCOUNT=2000' "
                         "(OpenMP threads poll briefly before sleeping, as llama-server's do)")
    ap.add_argument("--output-md", default=None, help="write the markdown table here")
    ap.add_argument("--output-json", default=None, help="write every figure here")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    wls = [w.strip() for w in args.workloads.split(",") if w.strip()]
    bad = [t for t in tools if t not in TOOLS] + [w for w in wls if w not in WORKLOADS]
    if bad:
        raise SystemExit(f"unknown tools/workloads {bad}; tools: {list(TOOLS)}; workloads: {list(WORKLOADS)}")

    def log(s: str) -> None:
        print(s, file=sys.stderr, flush=True)

    t_start = time.perf_counter()
    model_path = ensure_model(args.model_path, log)
    tokenizer = serving.load_tokenizer(model_path)
    specs = [WORKLOADS[w] for w in wls]
    import torch

    torch.set_num_threads(args.threads)  # the HF peer runs in this process
    report = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join([
        "python -m radixlm.bench.cpu_peers", *(argv if argv is not None else sys.argv[1:])]),
        "model_path": model_path, "params": count_params(model_path), "threads": args.threads,
        "quick": args.quick, "tools": tools, "workloads": wls, "llama_args": args.llama_args,
        "radixlm_args": args.radixlm_args, "radixlm_env": args.radixlm_env,
        "nproc": os.cpu_count(), "results": {}, "per_tool": {}}
    first_ids: Dict[str, List[int]] = {}
    for name in tools:
        tool = TOOLS[name]
        log(f"== {name} (load average {os.getloadavg()[0]:.2f})")
        info = {"load_before": list(os.getloadavg())}
        t0 = time.perf_counter()
        try:
            if tool.kind == "hf":
                res, ids = run_hf_tool(model_path, specs, args.quick, tokenizer, args.seed, log)
            else:
                with launch(tool, model_path, args.threads, args.llama_args, args.radixlm_args,
                            parse_env(args.radixlm_env)) as (url, backend):
                    pin = 0 if tool.kind != "llama" or tool.stock else llama_slots(args.llama_args)
                    res, ids = run_server_tool(url, backend, specs, args.quick, tokenizer, args.seed, log, pin)
        except (FileNotFoundError, RuntimeError, OSError) as e:
            log(f"  {name} not run: {e}")
            info["error"] = f"{type(e).__name__}: {e}".splitlines()[0]
            res, ids = {}, {}
        info["wall_s"] = time.perf_counter() - t0
        info["load_after"] = list(os.getloadavg())
        report["results"][name] = res
        report["per_tool"][name] = info
        if "decode" in ids:
            first_ids[name] = ids["decode"]
    if "hf" in first_ids:
        report["parity"] = {t: leading_equal(first_ids["hf"], ids) for t, ids in first_ids.items()}
    report["wall_s"] = time.perf_counter() - t_start
    md = markdown(report)
    print(md)
    if args.output_md:
        pathlib.Path(args.output_md).write_text(md + "\n")
    if args.output_json:
        pathlib.Path(args.output_json).write_text(json.dumps(report, indent=1) + "\n")
    return 0
