"""Per-request results and SGLang-style summaries (works on partial results, e.g. after Ctrl-C)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional

import numpy as np


@dataclass
class RequestResult:
    success: bool = False
    error: str = ""
    prompt_len: int = 0
    output_len: int = 0
    ttft: float = 0.0  # seconds, first non-empty chunk
    itl: List[float] = field(default_factory=list)  # seconds between chunks, spread over each chunk's tokens
    latency: float = 0.0  # end-to-end seconds, client side
    start_time: float = 0.0  # seconds since the benchmark started
    cached_tokens: int = 0
    server_e2e: Optional[float] = None  # meta_info.e2e_latency (native backend)
    output_ids: List[int] = field(default_factory=list)
    session: int = -1  # agent-multiturn
    turn: int = 0  # 1-based turn depth (agent-multiturn)
    is_retry: bool = False

    def to_json(self) -> Dict:
        d = asdict(self)
        d.pop("output_ids")
        return d


def _stats(xs: List[float], scale: float = 1000.0, pcts=(99,)) -> Dict[str, float]:
    if not xs:
        return {"mean": 0.0, "median": 0.0, "std": 0.0, **{f"p{p}": 0.0 for p in pcts}, "max": 0.0}
    a = np.asarray(xs, dtype=np.float64) * scale
    out = {"mean": float(a.mean()), "median": float(np.median(a)), "std": float(a.std())}
    for p in pcts:
        out[f"p{p}"] = float(np.percentile(a, p))
    out["max"] = float(a.max())
    return out


def cache_delta(before: Optional[Dict], after: Optional[Dict]) -> Optional[Dict]:
    """Server-side cache hit rate over the run from two /get_server_info snapshots."""
    if not before or not after or "prefill_cached_tokens" not in after:
        return None
    cached = after["prefill_cached_tokens"] - before.get("prefill_cached_tokens", 0)
    new = after["prefill_new_tokens"] - before.get("prefill_new_tokens", 0)
    total = cached + new
    return {"cached_tokens": cached, "new_tokens": new, "cache_hit_rate": cached / total if total else 0.0}


def summarize(results: List[RequestResult], duration: float, backend: str = "", dataset_name: str = "",
              request_rate: float = float("inf"), max_concurrency: Optional[int] = None,
              server_cache: Optional[Dict] = None) -> Dict:
    ok = [r for r in results if r.success]
    duration = max(duration, 1e-9)
    in_tok = sum(r.prompt_len for r in ok)
    out_tok = sum(r.output_len for r in ok)
    e2e = _stats([r.latency for r in ok], pcts=(90, 95, 99))
    ttft = _stats([r.ttft for r in ok])
    tpot = _stats([(r.latency - r.ttft) / (r.output_len - 1) for r in ok if r.output_len > 1])
    itl = _stats([x for r in ok for x in r.itl], pcts=(95, 99))
    m = {
        "backend": backend, "dataset_name": dataset_name,
        "request_rate": request_rate if request_rate != float("inf") else "inf",
        "max_concurrency": max_concurrency, "duration": duration,
        "completed": len(ok), "failed": len(results) - len(ok),
        "total_input_tokens": in_tok, "total_output_tokens": out_tok,
        "request_throughput": len(ok) / duration, "input_throughput": in_tok / duration,
        "output_throughput": out_tok / duration, "total_throughput": (in_tok + out_tok) / duration,
        "concurrency": sum(r.latency for r in ok) / duration,
        "total_cached_tokens": sum(r.cached_tokens for r in ok),
    }
    for name, st in (("e2e_latency", e2e), ("ttft", ttft), ("tpot", tpot), ("itl", itl)):
        for k, v in st.items():
            m[f"{k}_{name}_ms"] = v
    if server_cache is not None:
        m["server_cache_hit_rate"] = server_cache["cache_hit_rate"]
        m["server_cached_tokens"] = server_cache["cached_tokens"]
        m["server_new_tokens"] = server_cache["new_tokens"]
    srv = [(r.latency, r.server_e2e) for r in ok if r.server_e2e is not None]
    if srv:
        client, server = sum(c for c, _ in srv), sum(s for _, s in srv)
        m["mean_server_e2e_latency_ms"] = 1000 * server / len(srv)
        m["client_overhead_ratio"] = (client - server) / client if client else 0.0
    turns = sorted({r.turn for r in ok if r.turn > 0})
    if turns:
        m["per_turn"] = [per_turn_row(t, [r for r in ok if r.turn == t]) for t in turns]
        later = [r.ttft for r in ok if r.turn >= 2]
        m["mean_ttft_turn_ge2_ms"] = 1000 * float(np.mean(later)) if later else 0.0
        first = [r.ttft for r in ok if r.turn == 1]
        m["mean_ttft_turn1_ms"] = 1000 * float(np.mean(first)) if first else 0.0
    return m


def per_turn_row(turn: int, rs: List[RequestResult]) -> Dict:
    t = [r.ttft * 1000 for r in rs]
    return {"turn": turn, "requests": len(rs), "retries": sum(r.is_retry for r in rs),
            "mean_prompt_len": float(np.mean([r.prompt_len for r in rs])),
            "mean_cached_tokens": float(np.mean([r.cached_tokens for r in rs])),
            "mean_ttft_ms": float(np.mean(t)), "median_ttft_ms": float(np.median(t)),
            "p99_ttft_ms": float(np.percentile(t, 99))}


def format_summary(m: Dict, title: str = "Serving Benchmark Result") -> str:
    L = []

    def row(label, value, fmt="{:<10}"):
        L.append("{:<40} ".format(label) + fmt.format(value))

    def sec(name):
        L.append(name.center(50, "-"))

    L.append(f" {title} ".center(50, "="))
    row("Backend:", m["backend"])
    row("Traffic request rate:", m["request_rate"])
    row("Max request concurrency:", m["max_concurrency"] if m["max_concurrency"] else "not set")
    row("Successful requests:", m["completed"])
    if m.get("failed"):
        row("Failed requests:", m["failed"])
    row("Benchmark duration (s):", m["duration"], "{:<10.2f}")
    row("Total input tokens:", m["total_input_tokens"])
    row("Total generated tokens:", m["total_output_tokens"])
    row("Request throughput (req/s):", m["request_throughput"], "{:<10.2f}")
    row("Input token throughput (tok/s):", m["input_throughput"], "{:<10.2f}")
    row("Output token throughput (tok/s):", m["output_throughput"], "{:<10.2f}")
    row("Total token throughput (tok/s):", m["total_throughput"], "{:<10.2f}")
    row("Concurrency:", m["concurrency"], "{:<10.2f}")
    if "server_cache_hit_rate" in m:
        row("Server cache hit rate:", f"{100 * m['server_cache_hit_rate']:.2f}%")
    for i, w in enumerate(m.get("server_workers") or []):  # behind a router: each replica's share
        row(f"Replica {i} cached / new tokens:", f"{w['prefill_cached_tokens']} / {w['prefill_new_tokens']}")
    if "client_overhead_ratio" in m:
        row("Client overhead vs server E2E:", f"{100 * m['client_overhead_ratio']:.2f}%")
    sec("End-to-End Latency")
    for k in ("mean", "median", "p90", "p95", "p99"):
        row(f"{k.capitalize() if k in ('mean', 'median') else k.upper()} E2E Latency (ms):",
            m[f"{k}_e2e_latency_ms"], "{:<10.2f}")
    sec("Time to First Token")
    for k in ("mean", "median", "p99"):
        row(f"{k.capitalize() if k != 'p99' else 'P99'} TTFT (ms):", m[f"{k}_ttft_ms"], "{:<10.2f}")
    sec("Time per Output Token (excl. 1st token)")
    for k in ("mean", "median", "p99"):
        row(f"{k.capitalize() if k != 'p99' else 'P99'} TPOT (ms):", m[f"{k}_tpot_ms"], "{:<10.2f}")
    sec("Inter-Token Latency")
    for k in ("mean", "median", "p95", "p99", "max"):
        row(f"{k.capitalize() if k in ('mean', 'median', 'max') else k.upper()} ITL (ms):", m[f"{k}_itl_ms"],
            "{:<10.2f}")
    if m.get("per_turn"):
        sec("TTFT by Turn Depth")
        L.append("{:<6}{:>6}{:>8}{:>10}{:>10}{:>10}{:>10}".format(
            "turn", "reqs", "retry", "prompt", "cached", "mean ms", "p99 ms"))
        for r in m["per_turn"]:
            L.append("{:<6}{:>6}{:>8}{:>10.0f}{:>10.0f}{:>10.1f}{:>10.1f}".format(
                r["turn"], r["requests"], r["retries"], r["mean_prompt_len"], r["mean_cached_tokens"],
                r["mean_ttft_ms"], r["p99_ttft_ms"]))
        row("Mean TTFT at turns >= 2 (ms):", m["mean_ttft_turn_ge2_ms"], "{:<10.2f}")
    L.append("=" * 50)
    return "\n".join(L)
