"""Start-up time: from `python -m radixlm.launch_server` to the first 200 on /health and to the first
completed /generate, N launches per model, with the server's own start-up timeline per phase.

    python -m radixlm.bench.startup --num-runs 5
    python -m radixlm.bench.startup --model-path models/demo-qwen2-small --variant old=/tmp/old --num-runs 5

Without --model-path: the demo model (models/demo-qwen2-small, made if missing) and a tiny qwen2
written to a temporary directory. `--variant LABEL=DIR` adds a checkout to compare (e.g. `git worktree
add /tmp/old SHA`): its server runs with cwd and PYTHONPATH set to DIR; launches alternate between
the variants so that both see the same machine load. The phases come from the "start-up timeline"
lines the server logs at --log-level info (seconds since the server process started; a checkout
that predates them reports none).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional, Tuple

import httpx

from radixlm.bench.launcher import free_port

TIMELINE = re.compile(r"start-up timeline \(s since launch\): (.*)$")
MARK = re.compile(r"([\w.]+)=([\d.]+)")


def parse_timeline(log: str) -> Dict[str, float]:
    """Every `name=seconds` of the log's start-up timeline lines (main process and children)."""
    marks: Dict[str, float] = {}
    for line in log.splitlines():
        m = TIMELINE.search(line)
        if m:
            marks.update((k, float(v)) for k, v in MARK.findall(m.group(1)))
    return marks


def launch_once(model_path: str, cwd: Optional[str] = None, extra_args: Optional[List[str]] = None,
                timeout: float = 300.0, prompt: str = "Hello") -> Dict:
    """One launch: seconds to /health 200 and to the first /generate, the timeline, then stop."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if cwd is not None:
        env["PYTHONPATH"] = cwd + os.pathsep + env.get("PYTHONPATH", "") if env.get("PYTHONPATH") else cwd
    cmd = [sys.executable, "-m", "radixlm.launch_server", "--model-path", os.path.abspath(model_path),
           "--port", str(port), "--log-level", "info", *(extra_args or [])]
    with tempfile.TemporaryFile(mode="w+") as log:
        t0 = time.time()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True, cwd=cwd,
                                start_new_session=True, env=env)
        try:
            deadline = t0 + timeout
            with httpx.Client(timeout=5.0) as client:
                health = None
                while health is None:
                    if proc.poll() is not None:
                        log.seek(0)
                        raise RuntimeError(f"server exited early ({' '.join(cmd)}):\n{log.read()[-4000:]}")
                    if time.time() > deadline:
                        raise RuntimeError(f"no /health 200 within {timeout:.0f} s")
                    try:
                        if client.get(url + "/health").status_code == 200:
                            health = time.time() - t0
                            break
                    except httpx.HTTPError:
                        pass
                    time.sleep(0.05)
                r = client.post(url + "/generate", timeout=max(1.0, deadline - time.time()), json={
                    "text": prompt, "sampling_params": {"max_new_tokens": 1, "temperature": 0}})
                r.raise_for_status()
                first_token = time.time() - t0
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
        log.seek(0)
        return {"health_s": health, "first_token_s": first_token, "timeline": parse_timeline(log.read())}


def summary(values: List[float]) -> Dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarize(runs: List[Dict]) -> Dict:
    marks: Dict[str, List[float]] = {}
    for r in runs:
        for k, v in r["timeline"].items():
            marks.setdefault(k, []).append(v)
    timeline = {k: statistics.median(v) for k, v in sorted(marks.items(), key=lambda kv: statistics.median(kv[1]))}
    return {"runs": len(runs), "health_s": summary([r["health_s"] for r in runs]),
            "first_token_s": summary([r["first_token_s"] for r in runs]), "timeline_median_s": timeline}


def phases(timeline: Dict[str, float]) -> List[Tuple[str, float, float]]:
    """(mark, seconds since launch, seconds since the process's previous mark) in time order; a
    mark's "previous" is the latest earlier mark of the same process (main, scheduler, ...) or, for
    a child's first mark, children.started."""
    out, last = [], {}
    for k, t in timeline.items():
        proc = k.split(".")[0]
        prev = last.get(proc, timeline.get("children.started", 0.0) if proc not in ("main", "children") else
                        last.get("main", 0.0))
        out.append((k, t, t - prev))
        last[proc] = t
        if proc == "children":
            last["main"] = t
    return out


def report(results: Dict[str, Dict[str, Dict]]) -> str:
    lines = []
    for model, by_variant in results.items():
        lines.append(f"model {model}")
        lines.append(f"  {'variant':<10} {'runs':>4}  {'health median (min-max) s':<28} "
                     f"{'first token median (min-max) s':<30}")
        for label, s in by_variant.items():
            h, f = s["health_s"], s["first_token_s"]
            lines.append(f"  {label:<10} {s['runs']:>4}  {h['median']:6.2f} ({h['min']:.2f}-{h['max']:.2f}){'':<13}"
                         f" {f['median']:6.2f} ({f['min']:.2f}-{f['max']:.2f})")
        for label, s in by_variant.items():
            if s["timeline_median_s"]:
                lines.append(f"  {label} timeline (median s since launch; +s since the process's previous mark):")
                lines.extend(f"    {k:<24} {t:6.2f}  {d:+.2f}" for k, t, d in phases(s["timeline_median_s"]))
    return "\n".join(lines)


def default_models(tmp: str) -> List[str]:
    from radixlm.tools.make_tiny_model import make_tiny_model

    demo = "models/demo-qwen2-small"
    if not os.path.isdir(demo):
        make_tiny_model(demo, arch="qwen2", size="small")
    return [demo, str(make_tiny_model(os.path.join(tmp, "tiny-qwen2"), arch="qwen2", size="tiny"))]


def main(argv: Optional[List[str]] = None) -> Dict:
    p = argparse.ArgumentParser(prog="radixlm.bench.startup", description=__doc__.split("\n\n")[0])
    p.add_argument("--model-path", action="append", default=None,
                   help="repeatable; default: the demo model and a tiny qwen2")
    p.add_argument("--num-runs", "-n", type=int, default=3)
    p.add_argument("--variant", action="append", default=[], metavar="LABEL=DIR",
                   help="another checkout to launch, alternating with this one")
    p.add_argument("--label", default="current", help="the label of this checkout's launches")
    p.add_argument("--timeout", type=float, default=300.0, help="per launch, seconds")
    p.add_argument("--output-json", default=None)
    p.add_argument("server_args", nargs=argparse.REMAINDER, help="after --: extra launch_server flags")
    a = p.parse_args(argv)
    variants: List[Tuple[str, Optional[str]]] = [(a.label, None)]
    for v in a.variant:
        label, sep, path = v.partition("=")
        if not sep or not os.path.isdir(path):
            p.error(f"--variant {v!r}: LABEL=DIR with an existing DIR")
        variants.append((label, os.path.abspath(path)))
    extra = [x for x in a.server_args if x != "--"]
    with tempfile.TemporaryDirectory(prefix="radixlm-startup-") as tmp:
        models = a.model_path or default_models(tmp)
        results: Dict[str, Dict[str, Dict]] = {}
        for model in models:
            runs: Dict[str, List[Dict]] = {label: [] for label, _ in variants}
            for i in range(a.num_runs):
                order = variants if i % 2 == 0 else variants[::-1]  # alternate who goes first
                for label, cwd in order:
                    r = launch_once(model, cwd, extra, a.timeout)
                    runs[label].append(r)
                    print(f"[{model} {label} run {i + 1}] health {r['health_s']:.2f} s, first token "
                          f"{r['first_token_s']:.2f} s", file=sys.stderr, flush=True)
            results[model] = {label: summarize(rs) for label, rs in runs.items()}
    print(report(results))
    if a.output_json:
        with open(a.output_json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
