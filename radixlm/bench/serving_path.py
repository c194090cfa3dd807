"""The CPU serving path, measured: what the server adds per token on top of the model step, and what a
burst of arrivals does to the requests already running. Server settings run interleaved, repeated
(`--repeats`), each in a fresh server, so that noise on a shared machine hits all of them alike.

    python -m radixlm.bench.serving_path --model-path /tmp/m88 \
        --setting "before=OMP_WAIT_POLICY= --chunked-prefill-size 8192 --enable-mixed-chunk false \
--disable-overlap-schedule false" --setting "after=" --repeats 2

For each setting and repeat:
* single: `--single-requests` sequential streaming requests (`--input-len` in, `--output-len` out,
  greedy, ignore_eos) through the native /generate SSE route: median inter-token latency, and the CPU
  time each server process (main = HTTP + tokenizer manager, detokenizer, scheduler) spent per output
  token, from /proc (less sensitive to other load than wall time), and the cores busy on average.
* burst: `--burst` requests sent at once: output tok/s, TTFT mean / max, ITL median / p99, and the
  longest gap any request saw between two of its tokens.
* gsp: `--gsp-requests` requests sharing a `--gsp-prefix`-token prefix sent at once: seconds until
  the first one finishes, and until all do.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shlex
import statistics
import time
from typing import Dict, List, Optional, Tuple

import httpx

from radixlm.bench.client import request_native
from radixlm.bench.launcher import ServerProcess


def _children(pid: int) -> List[int]:
    kids: List[int] = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/children") as f:
            kids += [int(x) for x in f.read().split()]
    return kids


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1])


def _server_procs(server: ServerProcess) -> Dict[str, int]:
    """Pids (Linux /proc): main, scheduler (the child holding the model: largest RSS) and detokenizer."""
    kids = sorted(_children(server.proc.pid), key=_rss, reverse=True)
    out = {"main": server.proc.pid}
    if kids:
        out["scheduler"] = kids[0]
    if len(kids) > 1:
        out["detokenizer"] = kids[1]
    return out


def _cpu(procs: Dict[str, int]) -> Dict[str, float]:
    """CPU seconds (user + system) each process used so far."""
    res = {}
    for name, pid in procs.items():
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        res[name] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return res


def _pct(xs: List[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(int(q * len(xs)), len(xs) - 1)]


async def _run(url: str, prompts: List[List[int]], output_len: int, concurrent: bool):
    t0 = time.perf_counter()
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0)) as client:
        if concurrent:
            res = await asyncio.gather(*[request_native(client, url, p, output_len, t0) for p in prompts])
        else:
            res = [await request_native(client, url, p, output_len, t0) for p in prompts]
    wall = time.perf_counter() - t0
    bad = [r.error for r in res if not r.success]
    if bad:
        raise RuntimeError(f"{len(bad)} requests failed: {bad[0]}")
    return res, wall


# py-spy profile categories, by markers in a frame (the first category matching a frame wins);
# "idle" is a process waiting for work (epoll, a blocking receive), the rest is time spent per token
IDLE_LEAVES = ("select (selectors", "poll (selectors", "Socket.recv (", "Poller.poll (", "_AsyncSocket", "sleep")
CATEGORIES = (("model forward", ("forward_and_sample", "_forward_worker", "run_forward")),
              ("build batch", ("DecodeBuilder.build", "PrefillBuilder")),
              ("process outputs", ("_process_decode", "_advance_decoding", "output_processor.py", "Scheduler._complete",
                                   "_process_prefill")),
              ("emit / send (pickle + zmq)", ("SchedulerLoop.emit", ".send (", "encode (")),
              ("receive (zmq + unpickle)", ("decode_or_drop", "recv")),
              ("detokenize", ("DetokenizerManager", "IncrementalDetokenizer")),
              ("stream / SSE / HTTP", ("native_routes.py", "starlette", "uvicorn", "h11", "httptools", "anyio")),
              ("tokenizer manager", ("tokenizer_manager.py", "req_state.py")),
              ("event loop", ("asyncio",)))


def _categorize(raw: str) -> Dict[str, int]:
    out: Dict[str, int] = {}
    for line in raw.splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        leaf = stack.rsplit(";", 1)[-1]
        if any(m in leaf for m in IDLE_LEAVES):
            continue  # waiting for work
        # the deepest frame that names a category decides (a forked child's stack starts in its parent's frames)
        cat = next((c for fr in reversed(stack.split(";")) for c, marks in CATEGORIES if any(m in fr for m in marks)),
                   "other")
        out[cat] = out.get(cat, 0) + int(n)
    return out


def _start_py_spy(procs: Dict[str, int], out_dir: str, rate: int, tag: str):
    import shutil
    import subprocess
    import sys

    exe = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
    return {k: subprocess.Popen([exe, "record", "--pid", str(p), "--rate", str(rate), "--format", "raw",
                                 "--nonblocking", "-o", f"{out_dir}/{tag}-{k}.txt"], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL) for k, p in procs.items()}


def _stop_py_spy(spies, out_dir: str, rate: int, ntok: int, tag: str) -> Dict[str, float]:
    import signal

    res = {}
    for k, sp in spies.items():
        sp.send_signal(signal.SIGINT)
        sp.wait(timeout=60)
        try:
            with open(f"{out_dir}/{tag}-{k}.txt") as f:
                cats = _categorize(f.read())
        except OSError:
            continue
        for c, n in cats.items():
            res[f"spy_ms_per_tok_{k}:{c}"] = n / rate / ntok * 1e3  # sampled wall time (idle excluded)
    return res


def measure_single(server: ServerProcess, vocab: int, a) -> Dict[str, float]:
    rng = random.Random(a.seed)
    prompts = [[rng.randrange(10, vocab) for _ in range(a.input_len)] for _ in range(a.single_requests)]
    asyncio.run(_run(server.base_url, prompts[:1], 4, False))  # warm-up
    procs = _server_procs(server)
    spies = _start_py_spy(procs, a.py_spy, a.py_spy_rate, a.tag) if a.py_spy else None
    c0 = _cpu(procs)
    res, wall = asyncio.run(_run(server.base_url, prompts, a.output_len, False))
    c1 = _cpu(procs)
    ntok = sum(r.output_len for r in res)
    itl = [x for r in res for x in r.itl]
    out = {"itl_median_ms": statistics.median(itl) * 1e3, "itl_mean_ms": statistics.mean(itl) * 1e3,
           "ttft_median_ms": statistics.median(r.ttft for r in res) * 1e3,
           "cores_busy": sum(c1[k] - c0[k] for k in c0) / wall}
    for k in c0:
        out[f"cpu_ms_per_tok_{k}"] = (c1[k] - c0[k]) / ntok * 1e3
    if spies is not None:
        out.update(_stop_py_spy(spies, a.py_spy, a.py_spy_rate, ntok, a.tag))
    return out


def measure_burst(server: ServerProcess, vocab: int, a) -> Dict[str, float]:
    rng = random.Random(a.seed + 1)
    prompts = [[rng.randrange(10, vocab) for _ in range(a.input_len)] for _ in range(a.burst)]
    res, wall = asyncio.run(_run(server.base_url, prompts, a.output_len, True))
    itl = [x for r in res for x in r.itl]
    return {"out_tok_s": sum(r.output_len for r in res) / wall,
            "ttft_mean_s": statistics.mean(r.ttft for r in res), "ttft_max_s": max(r.ttft for r in res),
            "itl_median_ms": statistics.median(itl) * 1e3, "itl_p99_ms": _pct(itl, 0.99) * 1e3,
            "max_gap_s": max(itl), "wall_s": wall}


def measure_gsp(server: ServerProcess, vocab: int, a) -> Dict[str, float]:
    rng = random.Random(a.seed + 2)
    prefix = [rng.randrange(10, vocab) for _ in range(a.gsp_prefix)]
    prompts = [prefix + [rng.randrange(10, vocab) for _ in range(a.gsp_question)] for _ in range(a.gsp_requests)]
    httpx.post(server.base_url + "/flush_cache", timeout=30)
    res, wall = asyncio.run(_run(server.base_url, prompts, a.gsp_output_len, True))
    ends = sorted(r.start_time + r.latency for r in res)
    return {"first_finish_s": ends[0], "first_token_s": min(r.start_time + r.ttft for r in res),
            "all_finish_s": wall, "out_tok_s": sum(r.output_len for r in res) / wall}


def run_setting(name: str, flags: str, vocab: int, a) -> Dict[str, Dict[str, float]]:
    words = shlex.split(flags)
    env = dict(w.split("=", 1) for w in words if "=" in w and w.split("=", 1)[0].isupper())  # VAR=value
    extra = ["--max-running-requests", str(max(a.burst, a.gsp_requests)),
             *[w for w in words if not ("=" in w and w.split("=", 1)[0].isupper())]]
    with ServerProcess(a.model_path, extra, timeout=300, env=env) as server:
        out = {}
        for part in a.parts:
            out[part] = {"single": measure_single, "burst": measure_burst, "gsp": measure_gsp}[part](server, vocab, a)
            print(json.dumps({"setting": name, "part": part, **{k: round(v, 4) for k, v in out[part].items()}}),
                  flush=True)
        return out


def main(argv: Optional[List[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-path", required=True)
    ap.add_argument("--setting", action="append", default=[],
                    help="NAME=launch_server flags, VAR=value words among them set the server's environment "
                         "(repeatable)")
    ap.add_argument("--parts", nargs="+", default=["single", "burst", "gsp"], choices=("single", "burst", "gsp"))
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--single-requests", type=int, default=3)
    ap.add_argument("--input-len", type=int, default=256)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--burst", type=int, default=32)
    ap.add_argument("--gsp-requests", type=int, default=100)
    ap.add_argument("--gsp-prefix", type=int, default=1024)
    ap.add_argument("--gsp-question", type=int, default=64)
    ap.add_argument("--gsp-output-len", type=int, default=32)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--py-spy", default=None, metavar="DIR",
                    help="profile the server processes with py-spy during the single part (raw stacks in DIR; "
                         "needs `pip install py-spy` and ptrace rights)")
    ap.add_argument("--py-spy-rate", type=int, default=250)
    a = ap.parse_args(argv)
    with open(f"{a.model_path}/config.json") as f:
        vocab = min(json.load(f)["vocab_size"], 2048)  # ids every tiny tokenizer decodes
    if a.py_spy:
        os.makedirs(a.py_spy, exist_ok=True)
    settings: List[Tuple[str, str]] = [tuple(s.split("=", 1)) for s in a.setting] or [("default", "")]
    results: Dict[str, List[Dict]] = {n: [] for n, _ in settings}
    for rep in range(a.repeats):
        for name, flags in settings:
            a.tag = f"{name}-{rep}"
            results[name].append(run_setting(name, flags, vocab, a))
    names = [n for n, _ in settings]
    print("\nmedian over repeats:")
    for part in a.parts:
        keys = list(dict.fromkeys(k for n in names for r in results[n] for k in r[part]))
        print(f"{part:44s} " + " ".join(f"{n:>12s}" for n in names))
        for k in keys:
            vals = [[r[part][k] for r in results[n] if k in r[part]] for n in names]
            print(f"  {k:42s} " + " ".join(f"{statistics.median(v):12.3f}" if v else f"{'-':>12s}" for v in vals))

if __name__ == "__main__":
    main()
