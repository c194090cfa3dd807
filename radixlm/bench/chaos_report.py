"""What the chaos benchmark (bench/chaos.py) makes of a run: each request's `Outcome`, the targets, the
router's and workers' log events, per-phase statistics, the seconds to recover, the targets' verdict, and
the report as a markdown table and an SVG plot. Pure functions of recorded data: no processes, no network.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

TARGETS = {"degraded_error_rate_max": 0.10, "errors_within_s_of_kill": 5.0, "steady_recovery_success_min": 0.99,
           "restart_to_serving_max_s": 30.0}


@dataclass
class Outcome:
    t_send: float                    # seconds since the open loop started
    t_done: float
    kind: str                        # ok | 4xx | 5xx | timeout | conn | bad (a 200 without a completion)
    status: int = 0
    error: str = ""

    @property
    def latency(self) -> float:
        return self.t_done - self.t_send


ANSI = re.compile(r"\x1b\[[0-9;]*m")
ROUTER_LOG_EVENTS = re.compile(r"unhealthy|circuit|breaker|removed|removing|failed|critical|timeout", re.I)


CB_OPENED = re.compile(r'smg_worker_cb_transitions_total\{worker="([^"]+)",from="\w+",to="open"\} (\d+)')


def breaker_openings(metrics: str) -> Dict[str, int]:
    """Times the router's circuit breaker opened, per worker (its Prometheus counters; an open breaker
    takes the worker out of routing just as 'unhealthy' does)."""
    out: Dict[str, int] = {}
    for url, n in CB_OPENED.findall(metrics):
        out[url] = out.get(url, 0) + int(n)
    return out


WORKER_EVENT = re.compile(r"abort|fail|error|timed out|timeout|dead|unavailable|traceback", re.I)
# uvicorn's answer to the router's start-up probe of each worker's connection mode: not an event
WORKER_NOISE = re.compile(r"Invalid HTTP request received")


def worker_log_events(text: str) -> Dict[str, Any]:
    """A worker's lines about failures (it runs at --log-level warning; e.g. a PD decode worker aborting
    the half of a request whose prefill peer died or was too slow): how many, and a few distinct ones."""
    n, samples = 0, {}
    for line in ANSI.sub("", text).splitlines():
        if WORKER_EVENT.search(line) and not WORKER_NOISE.search(line):
            n += 1
            key = re.sub(r"[0-9a-f]{8,}|\d+", "N", line)[-100:]
            if key not in samples and len(samples) < 4:
                samples[key] = line[:300]
    return {"warnings": n, "samples": list(samples.values())}


def router_log_events(text: str, urls: List[str]) -> Dict[str, Any]:
    """Counts the router's warnings per worker url; a few distinct messages kept as samples."""
    per_url = {u: 0 for u in urls}
    samples: Dict[str, str] = {}
    for line in ANSI.sub("", text).splitlines():
        if not ROUTER_LOG_EVENTS.search(line):
            continue
        for u in urls:
            if u in line:
                per_url[u] += 1
        msg = re.sub(r"^\S+ \S+\s+", "", line)  # date, time
        key = re.sub(r"\d+", "N", msg)[:80]
        if key not in samples and len(samples) < 8:
            samples[key] = msg[:300]
    return {"lines_per_worker": per_url, "samples": list(samples.values())}


# ------------------------------------------------------------------------------ analysis
PHASES = ("steady", "degraded", "restarting", "recovery")


def _pct(xs: List[float], q: float) -> Optional[float]:
    if not xs:
        return None
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, max(0, math.ceil(q * len(xs)) - 1))], 3)


def phase_stats(outs: List[Outcome], dropped: int = 0) -> Dict[str, Any]:
    kinds = {k: sum(o.kind == k for o in outs) for k in ("ok", "4xx", "5xx", "timeout", "conn", "bad")}
    lat = [o.latency for o in outs if o.kind == "ok"]
    return {"sent": len(outs), **kinds, "dropped_by_client": dropped,
            "success": round(kinds["ok"] / len(outs), 4) if outs else None,
            "p50_s": _pct(lat, 0.5), "p99_s": _pct(lat, 0.99)}


def bins(outs: List[Outcome], t_end: float, width: float = 1.0) -> List[Dict[str, Any]]:
    """Per `width` s of send time: requests, success rate, p99 latency of the successes."""
    n = max(1, math.ceil(t_end / width))
    groups: List[List[Outcome]] = [[] for _ in range(n)]
    for o in outs:
        groups[min(n - 1, int(o.t_send // width))].append(o)
    return [{"t": round(i * width, 2), "sent": len(g), "success": round(sum(o.kind == "ok" for o in g) / len(g), 4)
             if g else None, "p99_s": _pct([o.latency for o in g if o.kind == "ok"], 0.99)}
            for i, g in enumerate(groups)]


def seconds_to_success(series: List[Dict[str, Any]], t_kill: float, width: float, threshold: float = 0.95) -> float:
    """From the kill until every later 1 s bin (with requests) has >= threshold success: 0 when none dips."""
    bad = [b["t"] for b in series if b["t"] + width > t_kill and b["success"] is not None and b["success"] < threshold]
    return round(max(0.0, max(bad) + width - t_kill), 2) if bad else 0.0


def error_timing(outs: List[Outcome], t_kill: float, window: float) -> Dict[str, Any]:
    """When the client saw each error, relative to the kill."""
    rel = sorted(o.t_done - t_kill for o in outs if o.kind != "ok")
    return {"errors": len(rel), "first_after_kill_s": round(rel[0], 2) if rel else None,
            "last_after_kill_s": round(rel[-1], 2) if rel else None,
            "before_kill": sum(r < 0 for r in rel), "later_than_window": sum(r > window for r in rel)}


def evaluate(report: Dict[str, Any]) -> Dict[str, Any]:
    """Each target with the measured value and whether it is met."""
    ph, t = report["phases"], TARGETS
    deg = ph["degraded"]
    err_rate = None if not deg["sent"] else round(1 - deg["success"], 4)
    timing = report["error_timing"]
    restart = report["restart"]["serving_s"]
    survivors = report["survivors_marked_unhealthy_or_removed"]
    out = {
        "degraded_error_rate": {"value": err_rate, "target": f"<= {t['degraded_error_rate_max']}",
                                "met": err_rate is not None and err_rate <= t["degraded_error_rate_max"]},
        "errors_within_5s_of_kill": {"value": f"{timing['before_kill']} before, {timing['later_than_window']} later",
                                     "target": "all errors in [kill, kill + 5 s]",
                                     "met": timing["before_kill"] == 0 and timing["later_than_window"] == 0},
        "no_client_timeouts": {"value": report["totals"]["timeout"], "target": "0",
                               "met": report["totals"]["timeout"] == 0},
        "survivors_never_unhealthy_removed_or_broken": {"value": survivors, "target": "[]", "met": not survivors},
        "restart_to_serving_s": {"value": restart, "target": f"<= {t['restart_to_serving_max_s']}",
                                 "met": restart is not None and restart <= t["restart_to_serving_max_s"]},
        "kv_idle_at_end": {"value": all(w["idle"] for w in report["kv_at_end"].values()), "target": "True",
                           "met": all(w["idle"] for w in report["kv_at_end"].values())},
    }
    for name in ("steady", "recovery"):
        s = ph[name]["success"]
        out[f"{name}_success"] = {"value": s, "target": f">= {t['steady_recovery_success_min']}",
                                  "met": s is not None and s >= t["steady_recovery_success_min"]}
    return out


# ------------------------------------------------------------------------------ output
def markdown(report: Dict[str, Any]) -> str:
    c = report["config"]
    lines = [f"mode {c['mode']}, kill {report['victim']['role']} ({report['victim']['url']}), router "
             f"{c['policy']} preset {c['router_preset']}; capacity {report['capacity']['req_per_s']} req/s, "
             f"open loop {report['rate_req_per_s']} req/s",
             "", "| phase | s | sent | ok | 4xx | 5xx | timeouts | conn err | dropped | success | p50 | p99 |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    m = report["marks_s"]
    spans = {"steady": (0, m["kill"]), "degraded": (m["kill"], m["restart"]),
             "restarting": (m["restart"], m["recovery"]), "recovery": (m["recovery"], m["stop"])}
    for p in PHASES:
        s = report["phases"][p]
        a, b = spans[p]
        succ = "-" if s["success"] is None else f"{100 * s['success']:.1f}%"
        lines.append(f"| {p} | {b - a:.1f} | {s['sent']} | {s['ok']} | {s['4xx']} | {s['5xx'] + s['bad']} | "
                     f"{s['timeout']} | {s['conn']} | {s['dropped_by_client']} | {succ} | {_fmt(s['p50_s'])} | "
                     f"{_fmt(s['p99_s'])} |")
    r, et = report["restart"], report["error_timing"]
    lines += ["", f"- kill -> success back to >= 95% (1 s bins): {report['seconds_kill_to_95pct']} s; errors seen "
                  f"{et['first_after_kill_s']}..{et['last_after_kill_s']} s after the kill "
                  f"({et['before_kill']} before it, {et['later_than_window']} later than 5 s)",
              f"- router marked the victim unhealthy {report['router_marked_victim_unhealthy_s']} s after the kill; "
              f"survivors marked unhealthy, removed or breaker-opened: "
              f"{report['survivors_marked_unhealthy_or_removed'] or 'none'}; breaker openings "
              f"{report['router_breaker_openings']}",
              f"- restart: /health {r['health_s']} s, router healthy {r['router_healthy_s']} s, serving "
              f"{r['serving_s']} s after the relaunch",
              "- KV idle at the end: " + ", ".join(f"{u}: {w['idle']}" for u, w in report["kv_at_end"].items()),
              "- worker log lines about failures: " + ", ".join(f"{u}: {w['warnings']}" for u, w in
                                                          report.get("worker_logs", {}).items()),
              "", "| target | measured | wanted | met |", "|---|---|---|---|"]
    for name, t in report["targets"].items():
        lines.append(f"| {name} | {t['value']} | {t['target']} | {'yes' if t['met'] else '**no**'} |")
    return "\n".join(lines)


def _fmt(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.2f} s"


def svg_plot(report: Dict[str, Any], title: str = "") -> str:
    """Success rate and p99 latency per 1 s of send time, kill / relaunch / serving marked; plain SVG."""
    series, m = report["series"], report["marks_s"]
    w, h, left, top, ph = 760, 420, 60, 30, 150
    t_end = max(m["stop"], 1.0)

    def x(t):
        return left + (w - left - 20) * t / t_end

    p99s = [b["p99_s"] for b in series if b["p99_s"] is not None] or [1.0]
    ymax = max(p99s) * 1.1 or 1.0
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" '
           f'font-size="11"><rect width="100%" height="100%" fill="white"/>',
           f'<text x="{left}" y="16" font-size="13">{_esc(title)}</text>']
    for i, (name, key, lo, hi, fmt) in enumerate([("success rate", "success", 0.0, 1.0, "{:.0%}"),
                                                  ("p99 latency (s)", "p99_s", 0.0, ymax, "{:.2f}")]):
        y0 = top + i * (ph + 50)

        def y(v, y0=y0, lo=lo, hi=hi):
            return y0 + ph - ph * (v - lo) / (hi - lo)

        out.append(f'<rect x="{left}" y="{y0}" width="{w - left - 20}" height="{ph}" fill="none" stroke="#999"/>')
        out.append(f'<text x="{left + 4}" y="{y0 + 12}">{name}</text>')
        for v in (lo, (lo + hi) / 2, hi):
            out.append(f'<text x="{left - 4}" y="{y(v) + 4:.1f}" text-anchor="end">{fmt.format(v)}</text>')
        if key == "success":
            out.append(f'<line x1="{left}" x2="{w - 20}" y1="{y(0.95):.1f}" y2="{y(0.95):.1f}" stroke="#ccc" '
                       f'stroke-dasharray="2,2"/>')
        pts = [f"{x(min(b['t'] + 0.5, t_end)):.1f},{y(b[key]):.1f}" for b in series if b[key] is not None]
        out.append(f'<polyline fill="none" stroke="#1f77b4" stroke-width="1.5" points="{" ".join(pts)}"/>')
        for label, t, color in (("kill", m["kill"], "#d62728"), ("relaunch", m["restart"], "#ff7f0e"),
                                ("serving", m.get("serving"), "#2ca02c")):
            if t is not None:
                out.append(f'<line x1="{x(t):.1f}" x2="{x(t):.1f}" y1="{y0}" y2="{y0 + ph}" stroke="{color}" '
                           f'stroke-dasharray="4,3"/>')
                if i == 0:
                    out.append(f'<text x="{x(t) + 3:.1f}" y="{y0 + ph - 4}" fill="{color}">{label}</text>')
    yb = top + 2 * (ph + 50) - 30
    for t in range(0, int(t_end) + 1, max(5, int(t_end // 10) // 5 * 5 or 5)):
        out.append(f'<text x="{x(t):.1f}" y="{yb}" text-anchor="middle">{t}</text>')
    out.append(f'<text x="{w // 2}" y="{yb + 14}" text-anchor="middle">seconds (send time)</text></svg>')
    return "\n".join(out)


def _esc(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
