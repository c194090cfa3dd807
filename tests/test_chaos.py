"""The chaos benchmark (radixlm/bench/chaos.py): its arithmetic on made-up outcomes, and one shortened
live run (slow): 2 workers behind the real sglang-router, one killed with `kill -9` under open-loop
load and relaunched; what a user of the cluster sees must hold. Processes bind 127.0.0.1, every wait
has a deadline, and the run stops only the processes it started."""

from __future__ import annotations

import pytest

from radixlm.bench import chaos, chaos_report
from radixlm.bench.chaos import ChaosConfig
from radixlm.bench.chaos_report import Outcome
from radixlm.entrypoints import dp_launcher


def _outs():
    # steady: 10 ok; kill at 10 s: two errors seen 0.2 and 0.9 s later; then ok again
    outs = [Outcome(t, t + 0.1, "ok", 200) for t in range(10)]
    outs += [Outcome(9.9, 10.2, "5xx", 500), Outcome(10.5, 10.9, "conn"), Outcome(10.6, 10.8, "ok", 200)]
    outs += [Outcome(11 + t / 2, 11.3 + t / 2, "ok", 200) for t in range(10)]
    return outs


def test_phase_stats_counts_and_percentiles():
    s = chaos_report.phase_stats(_outs(), dropped=2)
    assert (s["sent"], s["ok"], s["5xx"], s["conn"], s["timeout"], s["dropped_by_client"]) == (23, 21, 1, 1, 0, 2)
    assert s["success"] == round(21 / 23, 4) and s["p50_s"] == 0.2 and s["p99_s"] == 0.3


def test_seconds_to_95_and_error_timing():
    series = chaos_report.bins(_outs(), 16.0)
    assert series[10]["success"] == pytest.approx(0.5) and series[9]["success"] == 0.5  # the 9.9 s send failed
    assert chaos_report.seconds_to_success(series, 10.0, 1.0) == 1.0  # bin [10, 11) is the last under 95%
    assert chaos_report.seconds_to_success(chaos_report.bins(_outs()[:10], 10.0), 10.0, 1.0) == 0.0
    t = chaos_report.error_timing(_outs(), 10.0, 5.0)
    assert t == {"errors": 2, "first_after_kill_s": 0.2, "last_after_kill_s": 0.9, "before_kill": 0,
                 "later_than_window": 0}
    assert chaos_report.error_timing(_outs(), 10.5, 5.0)["before_kill"] == 1


def test_router_breaker_metrics_and_log_parse():
    metrics = ('smg_worker_cb_transitions_total{worker="http://a:1",from="closed",to="open"} 2\n'
               'smg_worker_cb_transitions_total{worker="http://a:1",from="half_open",to="open"} 1\n'
               'smg_worker_cb_transitions_total{worker="http://b:2",from="open",to="half_open"} 1\n')
    assert chaos_report.breaker_openings(metrics) == {"http://a:1": 3}
    log = ("\x1b[2m2026-12-05 05:02:21\x1b[0m WARN smg: HTTP health check failed for http://a:1/health\n"
           "2026-12-05 05:02:22 INFO smg: started processing request\n")
    ev = chaos_report.router_log_events(log, ["http://a:1", "http://b:2"])
    assert ev["lines_per_worker"] == {"http://a:1": 1, "http://b:2": 0} and len(ev["samples"]) == 1


def test_config_and_cli():
    with pytest.raises(ValueError, match="kill"):
        ChaosConfig(model_path="m", mode="dp", kill="prefill")
    args = chaos.build_parser().parse_args(["--mode", "pd", "--router-args", "--cb-failure-threshold 4",
                                            "--steady-secs", "2"])
    cfg = chaos.config_from_args(args)
    assert cfg.kill == "prefill" and cfg.steady_secs == 2.0
    assert cfg.router_flags[-2:] == ["--cb-failure-threshold", "4"]
    c = chaos.Cluster(cfg)
    roles = [s.role for s in c.specs]
    assert roles == ["prefill", "prefill", "decode", "decode"]
    r = c.router_workers()
    assert r[0] == "--pd-disaggregation" and r.count("--prefill") == 2 and r.count("--decode") == 2
    assert c.specs[0].flags() == ["--disaggregation-mode", "prefill", "--disaggregation-bootstrap-port",
                                  str(c.specs[0].bootstrap_port)]


@pytest.mark.slow
@pytest.mark.skipif(not dp_launcher.router_available(), reason="sglang_router is not installed")
def test_worker_killed_under_load_costs_only_its_requests(qwen2_path, tmp_path):
    # round_robin: the relaunched worker gets traffic as soon as the router takes it back (cache_aware keeps
    # a shared prefix on the survivor until the load is unbalanced, which a light load never is)
    cfg = ChaosConfig(model_path=qwen2_path, workers=2, policy="round_robin", steady_secs=3, degraded_secs=3,
                      recovery_secs=3,
                      probe_secs=2, probe_concurrency=4, load_fraction=0.3, max_tokens=4, system_words=60,
                      restart_timeout=40, client_timeout=20, launch_timeout=90)
    report = chaos.run_chaos(cfg)
    print(chaos_report.markdown(report))
    ph = report["phases"]
    assert ph["steady"]["sent"] > 0 and ph["degraded"]["sent"] > 0 and ph["recovery"]["sent"] > 0
    assert ph["steady"]["success"] >= 0.99 and ph["recovery"]["success"] >= 0.99, ph
    assert report["totals"]["timeout"] == 0  # no request hangs to its client timeout
    timing = report["error_timing"]
    assert timing["before_kill"] == 0 and timing["later_than_window"] == 0, timing  # errors only near the kill
    assert report["survivors_marked_unhealthy_or_removed"] == [], report["router_worker_changes"]
    assert report["restart"]["serving_s"] is not None  # the relaunched worker serves again
    assert all(w["idle"] for w in report["kv_at_end"].values()), report["kv_at_end"]
    (tmp_path / "chaos.svg").write_text(chaos_report.svg_plot(report, "ci"))
    assert "<polyline" in (tmp_path / "chaos.svg").read_text()


def test_router_watch_records_health_changes_and_breaker_openings_after_its_start():
    import asyncio

    import httpx

    polls = {"n": 0}

    def handler(req: httpx.Request) -> httpx.Response:
        if req.url.path == "/workers":
            polls["n"] += 1
            b_healthy = polls["n"] < 2
            return httpx.Response(200, json={"workers": [{"url": "http://a:1", "is_healthy": True, "load": 3},
                                                         {"url": "http://b:2", "is_healthy": b_healthy}]})
        opened = 1 if polls["n"] < 2 else 2  # one opening before the watch (baseline), one during it
        return httpx.Response(200, text=f'smg_worker_cb_transitions_total{{worker="http://a:1",from="closed",'
                                        f'to="open"}} {opened}\n')

    clock = iter(range(100))
    watch = chaos.RouterWatch("http://r", ["http://a:1", "http://b:2"], lambda: next(clock),
                              metrics_url="http://r/metrics")

    async def go():
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            await watch.poll_once(client)
            await watch.poll_once(client)

    asyncio.run(go())
    states = [(c["url"], c["state"]) for c in watch.changes]
    assert states == [("http://a:1", "healthy"), ("http://b:2", "healthy"), ("http://a:1", "breaker_opened"),
                      ("http://b:2", "unhealthy")]
    assert watch.breaker_openings_since_start() == {"http://a:1": 1}
    assert watch.loads[0]["http://a:1"] == 3
