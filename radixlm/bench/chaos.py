"""The incident as a benchmark: one worker killed (`kill -9`) under load behind the real sglang-router,
then restarted. Does a dead node cost only the requests it held?

    python -m radixlm.bench.chaos --model-path models/demo-qwen2-small --workers 3          # data parallel
    python -m radixlm.bench.chaos --mode pd --kill prefill                                 # 2 prefill + 2 decode
    python -m radixlm.bench.chaos --router-preset defaults                                 # the router's defaults

What runs: N radixlm workers (`--mode dp`; or prefill and decode workers, `--mode pd`) and the real
`sglang_router.launch_router` in front of them, all on 127.0.0.1. A short closed-loop run through the
router measures the cluster's capacity (requests/s); then a bounded open-loop generator sends chat
completions (one shared system prompt, a different question each, `max_tokens` fixed) with Poisson
arrivals at `--load-fraction` of that capacity, each with a client timeout, through these phases:

    steady      all workers up
    degraded    from `kill -9` of the busiest worker of the `--kill` role (its whole process group)
    restarting  from relaunching it on the same port(s) until it has served a request again
    recovery    `--recovery-secs` more

Reported per phase (by send time): sent, ok, 4xx, 5xx, timeouts, connection errors, p50/p99 latency
of the successes; the seconds from the kill until every 1 s bin has >= 95% success again; when the
client saw errors relative to the kill; seconds from the relaunch to /health 200, to the router
marking the worker healthy, and to its first served request; whether the router ever marked a
surviving worker unhealthy or dropped it (its `/workers` list, polled every 0.25 s, and its log);
whether every live worker's KV is back to idle at the end. JSON (`--output`), a markdown table on
stdout and an SVG plot of success rate and p99 latency over time (`--plot`).
Targets are reported against (`targets` in the JSON), not assumed. This module owns the run (cluster,
load, kill, relaunch, watching the router); bench/chaos_report.py what is made of it (statistics,
verdict, table, plot).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shlex
import signal
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional

import httpx

from radixlm.bench.chaos_report import (
    ANSI,
    PHASES,
    TARGETS,
    Outcome,
    bins,
    breaker_openings,
    error_timing,
    evaluate,
    markdown,
    phase_stats,
    router_log_events,
    seconds_to_success,
    svg_plot,
    worker_log_events,
)
from radixlm.bench.launcher import RouterProcess, ServerProcess, free_port

# ------------------------------------------------------------------------------ router flags
# `defaults`: the router's own settings (health checks every 60 s, breaker at 10 failures, open 60 s).
# `tuned`: what contained a kill best here; docs/benchmarks.md ("Chaos") says why for each flag.
ROUTER_PRESETS: Dict[str, List[str]] = {
    "defaults": [],
    "tuned": ["--health-check-interval-secs", "1", "--health-failure-threshold", "2",
              "--health-success-threshold", "1", "--health-check-timeout-secs", "3",
              "--cb-failure-threshold", "2", "--cb-success-threshold", "1", "--cb-timeout-duration-secs", "2",
              "--cb-window-duration-secs", "10",
              "--retry-max-retries", "5", "--retry-initial-backoff-ms", "20", "--retry-max-backoff-ms", "500",
              "--balance-abs-threshold", "4", "--balance-rel-threshold", "1.2"],
    # PD: the router counts a failed pair against both workers' breakers, so a dead or slow prefill opens
    # healthy decode workers' breakers; here the breakers are off, fast health checks find a dead worker
    # and the retries' backoff (0.2 + 0.4 + 0.8 + 1 + 1 s) spans the time they take to do so.
    "tuned-pd": ["--health-check-interval-secs", "1", "--health-failure-threshold", "2",
                 "--health-success-threshold", "1", "--health-check-timeout-secs", "3", "--disable-circuit-breaker",
                 "--retry-max-retries", "5", "--retry-initial-backoff-ms", "200", "--retry-backoff-multiplier", "2",
                 "--retry-max-backoff-ms", "1000", "--balance-abs-threshold", "4", "--balance-rel-threshold", "1.2"],
}

WORDS = ["alpha", "river", "stone", "cloud", "maple", "orbit", "ember", "prism", "delta", "lumen", "quartz",
         "harbor", "violet", "tundra", "cobalt", "meadow", "signal", "anchor", "copper", "willow"]


@dataclass
class ChaosConfig:
    model_path: str
    mode: str = "dp"                 # dp | pd
    workers: int = 3                 # dp: number of workers
    prefill: int = 2                 # pd
    decode: int = 2                  # pd
    kill: str = "worker"             # the victim's role: worker (dp) | prefill | decode
    policy: str = "cache_aware"
    router_preset: str = "tuned"
    router_args: List[str] = field(default_factory=list)
    worker_args: List[str] = field(default_factory=list)
    steady_secs: float = 20.0
    degraded_secs: float = 15.0
    recovery_secs: float = 20.0
    restart_timeout: float = 90.0    # the relaunched worker must serve within this, or the run reports it did not
    probe_secs: float = 8.0          # closed-loop capacity run
    probe_concurrency: int = 0       # 0: 4 per worker (dp), 2 per decode worker (pd)
    load_fraction: float = 0.6
    max_rate: float = 50.0           # requests/s cap of the open loop
    max_inflight: int = 128          # arrivals beyond this many in flight are dropped by the client (counted)
    client_timeout: float = 30.0
    max_tokens: int = 16
    system_words: int = 200
    question_words: int = 12
    seed: int = 0
    launch_timeout: float = 180.0
    router_log_level: str = "warn"   # info logs every request (with its latency) too

    def __post_init__(self):
        if self.mode not in ("dp", "pd"):
            raise ValueError(f"mode: {self.mode!r}, choose dp or pd")
        roles = ("worker",) if self.mode == "dp" else ("prefill", "decode")
        if self.kill not in roles:
            raise ValueError(f"kill: {self.kill!r} is not a role of mode {self.mode} ({', '.join(roles)})")
        if self.router_preset not in ROUTER_PRESETS:
            raise ValueError(f"router_preset: {self.router_preset!r}, choose from {sorted(ROUTER_PRESETS)}")
        if not 0 < self.load_fraction <= 1:
            raise ValueError("load_fraction must be in (0, 1]")

    @property
    def router_flags(self) -> List[str]:
        return ROUTER_PRESETS[self.router_preset] + list(self.router_args)


# ------------------------------------------------------------------------------ the cluster
@dataclass
class WorkerSpec:
    role: str                        # worker | prefill | decode
    port: int
    bootstrap_port: Optional[int] = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def flags(self) -> List[str]:
        if self.role == "worker":
            return []
        out = ["--disaggregation-mode", self.role]
        if self.bootstrap_port is not None:
            out += ["--disaggregation-bootstrap-port", str(self.bootstrap_port)]
        return out


class Cluster:
    """The workers and the router; kill and relaunch a worker on its own port(s)."""

    def __init__(self, cfg: ChaosConfig):
        self.cfg = cfg
        if cfg.mode == "dp":
            self.specs = [WorkerSpec("worker", free_port()) for _ in range(cfg.workers)]
        else:
            self.specs = [WorkerSpec("prefill", free_port(), free_port()) for _ in range(cfg.prefill)]
            self.specs += [WorkerSpec("decode", free_port()) for _ in range(cfg.decode)]
        self.procs: Dict[str, ServerProcess] = {}
        self.dead: Dict[str, List[ServerProcess]] = {}  # killed processes, kept for their logs
        self.router: Optional[RouterProcess] = None

    def _launch(self, spec: WorkerSpec) -> ServerProcess:
        return ServerProcess(self.cfg.model_path, [*spec.flags(), *self.cfg.worker_args],
                             timeout=self.cfg.launch_timeout, port=spec.port)

    def router_workers(self) -> List[str]:
        if self.cfg.mode == "dp":
            return ["--worker-urls", *[s.url for s in self.specs]]
        out = ["--pd-disaggregation"]
        for s in self.specs:
            out += ["--prefill", s.url, str(s.bootstrap_port)] if s.role == "prefill" else ["--decode", s.url]
        return out

    def start(self) -> None:
        try:
            with ThreadPoolExecutor(len(self.specs)) as ex:
                for spec, proc in zip(self.specs, ex.map(self._launch, self.specs)):
                    self.procs[spec.url] = proc
            self.router = RouterProcess(self.router_workers(), policy=self.cfg.policy, extra=self.cfg.router_flags,
                                        timeout=self.cfg.launch_timeout, log_level=self.cfg.router_log_level)
        except BaseException:
            self.stop()
            raise

    def kill(self, spec: WorkerSpec) -> None:
        """`kill -9` of the worker's whole process group (server, scheduler, detokenizer): a node dies."""
        proc = self.procs[spec.url].proc
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)

    def relaunch(self, spec: WorkerSpec) -> ServerProcess:
        """Blocks until the relaunched worker answers /health (or raises after launch_timeout)."""
        self.dead.setdefault(spec.url, []).append(self.procs[spec.url])
        self.procs[spec.url] = proc = self._launch(spec)
        return proc

    def worker_logs(self) -> Dict[str, str]:
        return {u: "".join(p.output(tail=2_000_000) for p in [*self.dead.get(u, []), proc])
                for u, proc in self.procs.items()}

    def stop(self) -> None:
        if self.router is not None:
            self.router.stop()
        for p in self.procs.values():
            p.stop()


# ------------------------------------------------------------------------------ the load
class ChatLoad:
    """Chat completions sharing one system prompt; each asks a different question."""

    def __init__(self, cfg: ChaosConfig):
        rng = random.Random(cfg.seed)
        self.cfg, self.rng = cfg, rng
        words = " ".join(rng.choice(WORDS) for _ in range(cfg.system_words))
        self.system = "You are a terse assistant for the " + words

    def body(self) -> Dict[str, Any]:
        q = " ".join(self.rng.choice(WORDS) for _ in range(self.cfg.question_words))
        return {"model": "default", "max_tokens": self.cfg.max_tokens, "temperature": 0, "ignore_eos": True,
                "messages": [{"role": "system", "content": self.system},
                             {"role": "user", "content": f"{q} {self.rng.randrange(10**9)}?"}]}

    async def send(self, client: httpx.AsyncClient, url: str, t0: float) -> Outcome:
        t_send = time.monotonic() - t0
        try:
            r = await client.post(url + "/v1/chat/completions", json=self.body(), timeout=self.cfg.client_timeout)
        except httpx.TimeoutException as e:
            return Outcome(t_send, time.monotonic() - t0, "timeout", error=type(e).__name__)
        except httpx.HTTPError as e:
            return Outcome(t_send, time.monotonic() - t0, "conn", error=f"{type(e).__name__}: {e}"[:200])
        t_done = time.monotonic() - t0
        if r.status_code != 200:
            kind = "4xx" if 400 <= r.status_code < 500 else "5xx"
            return Outcome(t_send, t_done, kind, r.status_code, r.text[:200])
        try:
            ok = r.json()["usage"]["completion_tokens"] == self.cfg.max_tokens
        except (ValueError, KeyError, TypeError):
            ok = False
        return Outcome(t_send, t_done, "ok" if ok else "bad", 200, "" if ok else r.text[:200])


async def measure_capacity(load: ChatLoad, url: str, concurrency: int, seconds: float) -> Dict[str, Any]:
    """Closed loop: `concurrency` clients send back to back for `seconds`; completions per second."""
    t0 = time.monotonic()
    outs: List[Outcome] = []
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=concurrency + 4)) as client:
        for o in await asyncio.gather(*[load.send(client, url, t0) for _ in range(min(2, concurrency))]):
            if o.kind != "ok":  # warm-up (not counted)
                raise RuntimeError(f"the cluster does not answer before the run: {o}")
        t0 = time.monotonic()

        async def loop():
            while time.monotonic() - t0 < seconds:
                outs.append(await load.send(client, url, t0))

        await asyncio.gather(*[loop() for _ in range(concurrency)])
    elapsed = max(o.t_done for o in outs)
    ok = [o for o in outs if o.kind == "ok"]
    if len(ok) < len(outs):
        raise RuntimeError(f"errors while measuring capacity: {[o for o in outs if o.kind != 'ok'][:3]}")
    return {"concurrency": concurrency, "seconds": round(elapsed, 2), "requests": len(ok),
            "req_per_s": round(len(ok) / elapsed, 3),
            "p50_latency_s": round(statistics.median(o.latency for o in ok), 3)}


class OpenLoop:
    """Poisson arrivals at `rate` until `stop()`; at most `max_inflight` in flight (further arrivals are
    counted in `dropped`, not sent). `run()` returns when the last request has its outcome."""

    def __init__(self, load: ChatLoad, url: str, rate: float, max_inflight: int, seed: int):
        self.load, self.url, self.rate, self.max_inflight = load, url, rate, max_inflight
        self.rng = random.Random(seed + 1)
        self.outcomes: List[Outcome] = []
        self.dropped: List[float] = []
        self._stop = asyncio.Event()
        self.t0 = time.monotonic()

    def now(self) -> float:
        return time.monotonic() - self.t0

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        inflight: set = set()
        async with httpx.AsyncClient(limits=httpx.Limits(max_connections=self.max_inflight + 8)) as client:
            next_t = self.now()
            while not self._stop.is_set():
                delay = next_t - self.now()
                if delay > 0:
                    try:
                        await asyncio.wait_for(self._stop.wait(), delay)
                        break
                    except asyncio.TimeoutError:
                        pass
                if len(inflight) >= self.max_inflight:
                    self.dropped.append(self.now())
                else:
                    task = asyncio.create_task(self.load.send(client, self.url, self.t0))
                    task.add_done_callback(lambda t: self.outcomes.append(t.result()))
                    inflight.add(task)
                    task.add_done_callback(inflight.discard)
                next_t += self.rng.expovariate(self.rate)
            if inflight:  # each is bounded by the client timeout
                await asyncio.wait(inflight)


# ------------------------------------------------------------------------------ watching the router and workers
class RouterWatch:
    """Polls the router's /workers every `period` s: each url's health as the router sees it, and
    every change (url absent from the list = removed); once a second its load per worker and its
    Prometheus circuit-breaker counters (a breaker opening after the watch started is a change too)."""

    def __init__(self, router_url: str, urls: List[str], clock, period: float = 0.25,
                 metrics_url: Optional[str] = None):
        self.router_url, self.urls, self.clock, self.period = router_url, urls, clock, period
        self.metrics_url = metrics_url
        self.breakers: Optional[Dict[str, int]] = None  # openings so far (the first poll is the baseline)
        self.state: Dict[str, str] = {}
        self.changes: List[Dict[str, Any]] = []
        self.loads: List[Dict[str, Any]] = []  # the router's in-flight count per worker, once a second
        self.poll_errors = 0
        self._stop = asyncio.Event()

    async def poll_once(self, client: httpx.AsyncClient) -> None:
        try:
            r = await client.get(self.router_url + "/workers", timeout=2)
            listed = {w["url"]: w for w in r.json()["workers"]}
        except (httpx.HTTPError, ValueError, KeyError):
            self.poll_errors += 1
            return
        now = self.clock()
        if not self.loads or now - self.loads[-1]["t"] >= 1.0:
            self.loads.append({"t": round(now, 2), **{u: listed[u].get("load") for u in self.urls if u in listed}})
            await self._poll_breakers(client, now)
        for u in self.urls:
            s = "absent" if u not in listed else ("healthy" if listed[u].get("is_healthy", True) else "unhealthy")
            if self.state.get(u) != s:
                self.state[u] = s
                self.changes.append({"t": round(self.clock(), 2), "url": u, "state": s})

    async def _poll_breakers(self, client: httpx.AsyncClient, now: float) -> None:
        if self.metrics_url is None:
            return
        try:
            opened = breaker_openings((await client.get(self.metrics_url, timeout=2)).text)
        except httpx.HTTPError:
            self.poll_errors += 1
            return
        if self.breakers is not None:
            for u, n in opened.items():
                if n > self.breakers.get(u, 0):
                    self.changes.append({"t": round(now, 2), "url": u, "state": "breaker_opened"})
        self.breakers = opened

    def breaker_openings_since_start(self) -> Dict[str, int]:
        return {u: sum(c["url"] == u and c["state"] == "breaker_opened" for c in self.changes)
                for u in self.urls if any(c["url"] == u and c["state"] == "breaker_opened" for c in self.changes)}

    async def run(self) -> None:
        async with httpx.AsyncClient() as client:
            while not self._stop.is_set():
                await self.poll_once(client)
                try:
                    await asyncio.wait_for(self._stop.wait(), self.period)
                except asyncio.TimeoutError:
                    pass

    def stop(self) -> None:
        self._stop.set()

    def first(self, url: str, state: str, after: float) -> Optional[float]:
        return next((c["t"] for c in self.changes if c["url"] == url and c["state"] == state and c["t"] >= after),
                    None)


def worker_state(url: str, timeout: float = 10.0) -> Dict[str, Any]:
    info = httpx.get(url + "/get_server_info", timeout=timeout).json()
    st = info.get("scheduler_info", info)
    held = st["max_total_num_tokens"] - st["free_kv_tokens"] - st["evictable_kv_tokens"]
    return {"activity": st["prefill_new_tokens"] + st["prefill_cached_tokens"] + st["generated_tokens"],
            "generated_tokens": st["generated_tokens"], "running": st["num_running_reqs"],
            "queued": st["num_queue_reqs"], "in_flight": info.get("num_in_flight_requests", 0),
            "held_kv_tokens": held, "protected_kv_tokens": st.get("protected_kv_tokens", 0)}


def kv_idle(url: str, timeout: float = 30.0) -> Dict[str, Any]:
    """Polls until the worker holds no request and no KV outside its (evictable) radix cache."""
    deadline = time.monotonic() + timeout
    while True:
        s = worker_state(url)
        s["idle"] = not (s["running"] or s["queued"] or s["in_flight"] or s["held_kv_tokens"]
                         or s["protected_kv_tokens"])
        if s["idle"] or time.monotonic() > deadline:
            return s
        time.sleep(0.2)


# ------------------------------------------------------------------------------ the run
async def _serving_again(url: str, deadline: float) -> bool:
    """The relaunched worker has produced tokens for a routed request (its counters start at 0)."""
    async with httpx.AsyncClient() as client:
        while time.monotonic() < deadline:
            try:
                r = await client.get(url + "/get_server_info", timeout=5)
                st = r.json().get("scheduler_info", {})
                if st.get("generated_tokens", 0) > 0 or st.get("prefill_new_tokens", 0) > 0:
                    return True
            except (httpx.HTTPError, ValueError):
                pass
            await asyncio.sleep(0.1)
    return False


def _pick_victim(cluster: Cluster, role: str) -> WorkerSpec:
    """The busiest worker of `role` (most tokens processed): the one whose loss matters."""
    cands = [s for s in cluster.specs if s.role == role]
    return max(cands, key=lambda s: worker_state(s.url)["activity"])


async def _scenario(cfg: ChaosConfig, cluster: Cluster, rate: float) -> Dict[str, Any]:
    load = ChatLoad(cfg)
    loop_ = OpenLoop(load, cluster.router.url, rate, cfg.max_inflight, cfg.seed)
    watch = RouterWatch(cluster.router.url, [s.url for s in cluster.specs], loop_.now,
                        metrics_url=cluster.router.metrics_url)
    tasks = [asyncio.create_task(loop_.run()), asyncio.create_task(watch.run())]
    marks: Dict[str, Optional[float]] = {}
    try:
        await asyncio.sleep(cfg.steady_secs)
        victim = await asyncio.to_thread(_pick_victim, cluster, cfg.kill)
        marks["kill"] = loop_.now()
        await asyncio.to_thread(cluster.kill, victim)
        await asyncio.sleep(cfg.degraded_secs)
        marks["restart"] = loop_.now()
        await asyncio.to_thread(cluster.relaunch, victim)
        marks["health"] = loop_.now()
        deadline = time.monotonic() + max(1.0, cfg.restart_timeout - (marks["health"] - marks["restart"]))
        served = await _serving_again(victim.url, deadline)
        marks["serving"] = loop_.now() if served else None
        marks["recovery"] = loop_.now()
        await asyncio.sleep(cfg.recovery_secs)
    finally:
        marks["stop"] = loop_.now()
        loop_.stop()
        await tasks[0]
        watch.stop()
        await tasks[1]
    marks["end"] = loop_.now()
    return {"victim": victim, "marks": marks, "outcomes": loop_.outcomes, "dropped": loop_.dropped, "watch": watch}


def _phase_of(t: float, marks: Dict[str, Optional[float]]) -> str:
    if t < marks["kill"]:
        return "steady"
    if t < marks["restart"]:
        return "degraded"
    if t < marks["recovery"]:
        return "restarting"
    return "recovery"


def run_chaos(cfg: ChaosConfig, log=print) -> Dict[str, Any]:
    """Launches the cluster, runs the phases, stops everything it started; returns the report."""
    cluster = Cluster(cfg)
    t_launch = time.monotonic()
    cluster.start()
    try:
        log(f"cluster up in {time.monotonic() - t_launch:.1f} s: "
            f"{', '.join(f'{s.role} {s.url}' for s in cluster.specs)}; router {cluster.router.url} "
            f"{' '.join(cfg.router_flags)}")
        # PD: 2 per decode worker (more queues prefills past --disaggregation-timeout on a small machine)
        conc = cfg.probe_concurrency or (4 * cfg.workers if cfg.mode == "dp" else 2 * cfg.decode)
        cap = asyncio.run(measure_capacity(ChatLoad(cfg), cluster.router.url, conc, cfg.probe_secs))
        rate = min(cfg.max_rate, cfg.load_fraction * cap["req_per_s"])
        log(f"capacity {cap['req_per_s']} req/s (closed loop, {conc} clients); open loop at {rate:.2f} req/s")
        run = asyncio.run(_scenario(cfg, cluster, rate))
        victim, marks, watch = run["victim"], run["marks"], run["watch"]
        kv = {s.url: kv_idle(s.url) for s in cluster.specs}
        router_log = cluster.router.output(tail=2_000_000)
        worker_logs = {u: worker_log_events(text) for u, text in cluster.worker_logs().items()}
        try:
            metrics = httpx.get(cluster.router.metrics_url, timeout=5).text
        except httpx.HTTPError:
            metrics = ""
    finally:
        cluster.stop()
    report = build_report(cfg, cluster, cap, rate, victim, marks, run["outcomes"], run["dropped"], watch, kv,
                          router_log, metrics)
    report["worker_logs"] = worker_logs
    report["router_log_text"] = ANSI.sub("", router_log)
    return report


def build_report(cfg, cluster, cap, rate, victim, marks, outcomes, dropped, watch, kv, router_log,
                 metrics) -> Dict[str, Any]:
    by_phase: Dict[str, List[Outcome]] = {p: [] for p in PHASES}
    for o in outcomes:
        by_phase[_phase_of(o.t_send, marks)].append(o)
    drops = {p: sum(_phase_of(t, marks) == p for t in dropped) for p in PHASES}
    series = bins(outcomes, marks["stop"])
    survivors = [s.url for s in cluster.specs if s.url != victim.url]
    bad_survivors = sorted({c["url"] for c in watch.changes if c["url"] in survivors and c["state"] != "healthy"})
    rel = {k: (round(v, 2) if v is not None else None) for k, v in marks.items()}
    t_unhealthy = watch.first(victim.url, "unhealthy", marks["kill"])
    t_healthy = watch.first(victim.url, "healthy", marks["restart"])
    report = {
        "config": {**asdict(cfg), "router_flags": cfg.router_flags},
        "cluster": [{"role": s.role, "url": s.url, "bootstrap_port": s.bootstrap_port} for s in cluster.specs],
        "capacity": cap, "rate_req_per_s": round(rate, 3),
        "victim": {"role": victim.role, "url": victim.url},
        "marks_s": rel,
        "phases": {p: phase_stats(by_phase[p], drops[p]) for p in PHASES},
        "totals": phase_stats(outcomes, len(dropped)),
        "seconds_kill_to_95pct": seconds_to_success(series, marks["kill"], 1.0),
        "error_timing": error_timing(outcomes, marks["kill"], TARGETS["errors_within_s_of_kill"]),
        "errors_sample": [asdict(o) for o in outcomes if o.kind != "ok"][:5],
        "restart": {
            "health_s": round(marks["health"] - marks["restart"], 2),
            "router_healthy_s": round(t_healthy - marks["restart"], 2) if t_healthy is not None else None,
            "serving_s": round(marks["serving"] - marks["restart"], 2) if marks["serving"] is not None else None},
        "router_marked_victim_unhealthy_s": round(t_unhealthy - marks["kill"], 2) if t_unhealthy is not None else None,
        "survivors_marked_unhealthy_or_removed": bad_survivors,
        "router_worker_changes": watch.changes,
        "router_loads": watch.loads,
        "router_log": router_log_events(router_log, [s.url for s in cluster.specs]),
        "router_breaker_openings": watch.breaker_openings_since_start(),  # during the phases
        "router_breaker_openings_whole_run": breaker_openings(metrics),  # the capacity probe included
        "kv_at_end": kv,
        "series": series,
    }
    report["targets"] = evaluate(report)
    return report


# ------------------------------------------------------------------------------ CLI
def build_parser() -> argparse.ArgumentParser:
    d = ChaosConfig(model_path="")
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--model-path", default="models/demo-qwen2-small", help="made (qwen2, small) if missing")
    ap.add_argument("--mode", choices=["dp", "pd"], default=d.mode)
    ap.add_argument("--workers", type=int, default=d.workers, help="dp: number of workers")
    ap.add_argument("--prefill", type=int, default=d.prefill, help="pd: prefill workers")
    ap.add_argument("--decode", type=int, default=d.decode, help="pd: decode workers")
    ap.add_argument("--kill", default=None, help="role of the worker killed: worker (dp), prefill or decode (pd)")
    ap.add_argument("--policy", default=d.policy, help="router --policy")
    ap.add_argument("--router-preset", choices=sorted(ROUTER_PRESETS), default=d.router_preset)
    ap.add_argument("--router-args", default="", help="more router flags (after the preset's)")
    ap.add_argument("--worker-args", default="", help="more radixlm server flags for every worker")
    ap.add_argument("--router-log-level", choices=["debug", "info", "warn", "error"], default=d.router_log_level)
    ap.add_argument("--router-log", default=None, help="write the router's log here")
    for name in ("steady_secs", "degraded_secs", "recovery_secs", "restart_timeout", "probe_secs", "load_fraction",
                 "max_rate", "client_timeout"):
        ap.add_argument("--" + name.replace("_", "-"), type=float, default=getattr(d, name))
    for name in ("probe_concurrency", "max_inflight", "max_tokens", "system_words", "question_words", "seed"):
        ap.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(d, name))
    ap.add_argument("--output", default=None, help="write the JSON report here")
    ap.add_argument("--plot", default=None, help="write the SVG plot here")
    return ap


def config_from_args(args: argparse.Namespace) -> ChaosConfig:
    kw = {k: v for k, v in vars(args).items()
          if k not in ("output", "plot", "router_args", "worker_args", "kill", "router_log")}
    return ChaosConfig(**kw, kill=args.kill or ("worker" if args.mode == "dp" else "prefill"),
                       router_args=shlex.split(args.router_args), worker_args=shlex.split(args.worker_args))


def main(argv=None) -> Dict[str, Any]:
    args = build_parser().parse_args(argv)
    if not os.path.isdir(args.model_path):
        from radixlm.tools.make_tiny_model import make_tiny_model

        make_tiny_model(args.model_path, arch="qwen2", size="small")
    cfg = config_from_args(args)
    report = run_chaos(cfg)
    router_log = report.pop("router_log_text")
    print(markdown(report))
    if args.router_log:
        with open(args.router_log, "w") as f:
            f.write(router_log)
    if args.output:
        with open(args.output, "w") as f:
            json.dump(report, f, indent=1)
    if args.plot:
        with open(args.plot, "w") as f:
            f.write(svg_plot(report, f"chaos: {cfg.mode}, kill {report['victim']['role']}, router "
                                     f"{cfg.router_preset}"))
    return report


if __name__ == "__main__":
    main()
