"""radixlm as a worker of the real sglang-router, and `--dp-size N` (entrypoints/dp_launcher.py).

* Replay (runs everywhere, no router needed): every request the real sglang-router 0.3.2 sent to a
  worker, recorded in tests/fixtures/sglang_router_0.3.2.json (`python -m tests.router_stub --record
  ...`), is sent to a live radixlm server and must get a 2xx.
* The launcher without the router: a clear message naming `pip install sglang-router`; the replica
  and router command lines.
* Live (skipped when `sglang_router` is not importable): `--dp-size 2` in one command answers chat
  and /generate through the router; a shared-prefix workload through cache_aware caches more prompt
  tokens over the replicas than through round_robin; a dead replica is reported; SIGTERM (and
  SIGKILL) of the launcher leave no child behind.
All processes bind 127.0.0.1; loops are bounded; only process groups started here are signalled.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import time
from typing import Dict, List

import pytest
import requests

from radixlm.entrypoints import dp_launcher
from radixlm.launch_server import parse_args
from tests.server_utils import ServerProcess, alive, descendants, info_stat, server_info, wait_until

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "sglang_router_0.3.2.json"
RECORDED = json.loads(FIXTURE.read_text())
TIMEOUT = 60
has_router = pytest.mark.skipif(not dp_launcher.router_available(),
                                reason="sglang_router is not installed (pip install sglang-router)")


# ------------------------------------------------------------------------------ replay
def _replay(base_url: str, rec: Dict) -> requests.Response:
    headers = {k: v for k, v in rec["headers"].items() if k not in ("host", "content-length")}
    url = base_url + rec["path"] + ("?" + rec["query"] if rec["query"] else "")
    kw = {} if rec["body"] is None else {"data": json.dumps(rec["body"])}
    r = requests.request(rec["method"], url, headers=headers, timeout=TIMEOUT, **kw)
    r.content  # noqa: B018 - read a stream to its end
    return r


def _cases():
    for rec in RECORDED["requests"]:
        yield pytest.param(rec, id=rec["name"])


def test_fixture_covers_what_the_router_sends():
    seen = {(r["method"], r["path"]) for r in RECORDED["requests"]}
    assert {("GET", "/health"), ("GET", "/server_info"), ("GET", "/model_info"), ("GET", "/get_load"),
            ("POST", "/generate"), ("POST", "/v1/chat/completions")} <= seen
    assert RECORDED["router"] == "sglang-router 0.3.2"
    generate = next(r for r in RECORDED["requests"] if r["name"] == "generate")["body"]
    # SGLang GenerateReqInput fields the router adds to every forwarded /generate, at their defaults
    assert {k: generate[k] for k in ("model", "background", "no_logs", "return_bytes", "return_entropy",
                                     "return_hidden_states")} == {"model": None, "background": False,
                                                                  "no_logs": False, "return_bytes": False,
                                                                  "return_entropy": False,
                                                                  "return_hidden_states": False}


@pytest.mark.parametrize("rec", list(_cases()))
def test_replay_recorded_router_request(qwen2_server, rec):
    r = _replay(qwen2_server.base_url, rec)
    assert 200 <= r.status_code < 300, (rec["name"], r.status_code, r.text[:300])
    if rec["path"] == "/get_load":  # what the router's load monitor parses: a list with num_tokens
        loads = r.json()
        assert isinstance(loads, list) and isinstance(loads[0]["num_tokens"], int)
        assert set(loads[0]) == {"dp_rank", "num_reqs", "num_waiting_reqs", "num_tokens"}


def test_get_load_counts_in_flight_tokens(qwen2_server):
    import threading

    base = qwen2_server.base_url
    assert requests.get(base + "/get_load", timeout=TIMEOUT).json()[0]["num_reqs"] == 0
    body = {"input_ids": list(range(3, 200)), "sampling_params": {"max_new_tokens": 1800, "ignore_eos": True}}
    t = threading.Thread(target=requests.post, args=(base + "/generate",), kwargs={"json": body, "timeout": TIMEOUT})
    t.start()
    try:
        deadline, load = time.monotonic() + 10, {}
        while time.monotonic() < deadline:
            load = requests.get(base + "/get_load", timeout=TIMEOUT).json()[0]
            if load["num_reqs"]:
                break
        assert load["num_reqs"] == 1 and load["num_tokens"] >= 197, load
    finally:
        requests.post(base + "/abort_request", json={"abort_all": True}, timeout=TIMEOUT)
        t.join(TIMEOUT)


# ------------------------------------------------------------------------------ launcher, no router needed
def test_dp_without_router_says_how_to_install(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(dp_launcher, "router_available", lambda: False)
    args = parse_args(["--model-path", str(tmp_path), "--dp-size", "2"])
    assert dp_launcher.launch_dp(args) == 2
    err = capsys.readouterr().err
    assert "sglang-router" in err and "pip install sglang-router" in err


def test_dp_command_lines(tmp_path):
    args = parse_args(["--model-path", str(tmp_path), "--dp", "3", "--port", "4321", "--host", "0.0.0.0",
                       "--router-policy", "round_robin", "--router-args", "--cb-failure-threshold 7",
                       "--max-total-tokens", "999", "--chunked-prefill-size", "-1", "--disable-radix-cache",
                       "--api-key", "k"])
    launcher = dp_launcher.DPLauncher(args)
    cmd = launcher.replica_cmd(5555)
    assert cmd[1:3] == ["-m", "radixlm.launch_server"]
    flags = cmd[3:]
    for gone in ("--dp-size", "--dp", "--router-policy", "--router-args", "4321", "0.0.0.0"):
        assert gone not in flags
    assert flags[-4:] == ["--host", "127.0.0.1", "--port", "5555"]
    replica = parse_args(flags)  # the replica gets the user's settings back
    assert replica.replace(dp_size=3, port=4321, host="0.0.0.0", router_policy="round_robin",
                           router_args="--cb-failure-threshold 7") == args
    assert replica.dp_size == 1 and replica.resolved_chunked_prefill_size is None and replica.disable_radix_cache
    launcher.replicas = [dp_launcher.Child("replica 0", None, "http://127.0.0.1:1"),
                         dp_launcher.Child("replica 1", None, "http://127.0.0.1:2")]
    rc = launcher.router_cmd()
    assert rc[1:3] == ["-m", "sglang_router.launch_router"]
    i = rc.index("--worker-urls")
    assert rc[i + 1:i + 3] == ["http://127.0.0.1:1", "http://127.0.0.1:2"]
    assert rc[rc.index("--policy") + 1] == "round_robin" and rc[rc.index("--port") + 1] == "4321"
    assert rc[rc.index("--host") + 1] == "0.0.0.0" and rc[rc.index("--api-key") + 1] == "k"
    assert rc[-2:] == ["--cb-failure-threshold", "7"] and "--prometheus-port" in rc


def test_dp_port_in_use_is_a_clear_error(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        with pytest.raises(dp_launcher.LaunchError, match="cannot serve on 127.0.0.1"):
            dp_launcher.check_port_free("127.0.0.1", s.getsockname()[1])


# ------------------------------------------------------------------------------ live, with the real router
class DPServer(ServerProcess):
    """`python -m radixlm.launch_server --dp-size N` as a user runs it, in its own process group; ready
    when the router is and sees all N replicas."""

    name = "dp launch"
    stop_timeout = 40.0

    def __init__(self, model_path: str, dp: int = 2, policy: str = "cache_aware", timeout: float = 120.0):
        self.dp = dp
        super().__init__(model_path, ["--dp-size", str(dp), "--router-policy", policy, "--router-args",
                                      "--health-check-interval-secs 1 --health-failure-threshold 1"], timeout)

    def ready(self) -> bool:
        return requests.get(self.base_url + "/readiness", timeout=2).status_code == 200 and \
            len(self.workers()) == self.dp

    def workers(self) -> List[str]:
        return sorted(w["url"] for w in requests.get(self.base_url + "/workers", timeout=10).json()["workers"])

    def children(self) -> List[int]:
        """Every process below the launcher (replicas, their scheduler and detokenizer, the router)."""
        return descendants(self.proc.pid)


def _wait_gone(pids: List[int], timeout: float = 30.0) -> List[int]:
    """The pids still running after waiting up to `timeout` for them to go."""
    wait_until(lambda: not any(alive(p) for p in pids), timeout, step=0.2)
    return [p for p in pids if alive(p)]


WORDS = ["alpha", "river", "stone", "cloud", "maple", "orbit", "ember", "prism", "delta", "lumen", "quartz",
         "harbor", "violet", "tundra", "cobalt", "meadow"]


def _shared_prefix_chats(groups: int = 4, per_group: int = 4) -> List[Dict]:
    """groups x per_group chats; the chats of a group share a long system prompt; interleaved so a
    round-robin router spreads each group over both replicas."""
    chats = []
    for i in range(per_group):
        for g in (range(groups) if i % 2 == 0 else reversed(range(groups))):  # flips each group's parity
            system = " ".join(f"{WORDS[(g * 7 + k * 3) % len(WORDS)]}{g}" for k in range(120))
            chats.append({"model": "m", "max_tokens": 2, "temperature": 0,
                          "messages": [{"role": "system", "content": system},
                                       {"role": "user", "content": f"question {i} {WORDS[i]}"}]})
    return chats


def _cached_total(workers: List[str]) -> int:
    return sum(info_stat(server_info(w), "prefill_cached_tokens") for w in workers)


def _run_shared_prefix(srv: DPServer) -> int:
    workers = srv.workers()
    before = _cached_total(workers)
    for body in _shared_prefix_chats():
        r = requests.post(srv.base_url + "/v1/chat/completions", json=body, timeout=TIMEOUT)
        assert r.status_code == 200, r.text[:300]
    return _cached_total(workers) - before


@pytest.fixture(scope="module")
def dp_cache_aware(qwen2_path):
    if not dp_launcher.router_available():
        pytest.skip("sglang_router is not installed (pip install sglang-router)")
    srv = DPServer(qwen2_path, policy="cache_aware")
    yield srv
    srv.stop()
    srv.log.close()


@has_router
def test_dp2_one_command_chat(dp_cache_aware):
    srv = dp_cache_aware
    assert len(srv.workers()) == 2
    r = requests.post(srv.base_url + "/v1/chat/completions", timeout=TIMEOUT,
                      json={"model": "m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 4
    loads = requests.get(srv.base_url + "/get_loads", timeout=TIMEOUT).json()["workers"]
    assert len(loads) == 2 and all(isinstance(w["load"], int) and w["load"] >= 0 for w in loads)


@has_router
def test_dp2_one_command_generate(dp_cache_aware):
    r = requests.post(dp_cache_aware.base_url + "/generate", timeout=TIMEOUT,
                      json={"text": "Hello", "sampling_params": {"max_new_tokens": 4, "temperature": 0}})
    assert r.status_code == 200, r.text
    assert r.json()["meta_info"]["completion_tokens"] == 4


@has_router
@pytest.mark.slow
def test_dp2_cache_aware_beats_round_robin_and_children_die_with_the_launcher(dp_cache_aware, qwen2_path):
    cached_ca = _run_shared_prefix(dp_cache_aware)
    rr = DPServer(qwen2_path, policy="round_robin")
    try:
        cached_rr = _run_shared_prefix(rr)
        print(f"shared-prefix chats, cached prompt tokens over 2 replicas: cache_aware {cached_ca}, "
              f"round_robin {cached_rr}")
        assert cached_ca > cached_rr > 0
        # a replica that dies is reported; the launcher keeps serving with the other
        workers, kids = rr.workers(), rr.children()
        port = workers[0].rsplit(":", 1)[1]
        victim = next(p for p in kids if f" --port {port} " in
                      pathlib.Path(f"/proc/{p}/cmdline").read_text().replace("\0", " ") + " ")
        os.killpg(victim, signal.SIGKILL)
        deadline = time.monotonic() + 20
        while "exited with code" not in rr.output() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert "replica" in rr.output() and "exited with code" in rr.output(), rr.output()
        assert rr.proc.poll() is None
        # SIGKILL of the launcher itself: every child follows (PR_SET_PDEATHSIG, then the replicas' own watch)
        os.kill(rr.proc.pid, signal.SIGKILL)
        rr.proc.wait()
        assert _wait_gone(kids) == []
    finally:
        rr.stop()
        rr.log.close()
    # SIGTERM (what Ctrl-C does too): everything stops, exit status 0
    kids = dp_cache_aware.children()
    assert len(kids) >= 3
    assert dp_cache_aware.stop(signal.SIGTERM) == 0
    assert _wait_gone(kids) == []


# ------------------------------------------------------------------------------ bench_serving behind a router
def test_bench_server_stats_sum_over_router_workers(monkeypatch):
    from radixlm.bench import serving

    infos = {"http://r": {"router_manager": True},
             "http://a": {"model_path": "M", "tokenizer_path": "M", "prefill_cached_tokens": 10,
                          "prefill_new_tokens": 5},
             "http://b": {"model_path": "M", "tokenizer_path": "M", "prefill_cached_tokens": 1,
                          "prefill_new_tokens": 2}}

    def fake(base, path):
        if path == "/workers":
            return {"workers": [{"url": "http://a"}, {"url": "http://b"}]} if base == "http://r" else None
        return infos.get(base)

    monkeypatch.setattr(serving, "_get_json", fake)
    before = serving.server_stats("http://r")
    assert (before["prefill_cached_tokens"], before["prefill_new_tokens"], before["model_path"]) == (11, 7, "M")
    assert serving.server_stats("http://a") is infos["http://a"]  # a plain server: its own answer
    infos["http://b"] = {**infos["http://b"], "prefill_cached_tokens": 31, "prefill_new_tokens": 4}
    after = serving.server_stats("http://r")
    assert serving.per_worker_delta(before, after) == [
        {"worker": "http://a", "prefill_cached_tokens": 0, "prefill_new_tokens": 0},
        {"worker": "http://b", "prefill_cached_tokens": 30, "prefill_new_tokens": 2}]


def test_bench_router_settings_parse():
    from radixlm.bench import serving

    args = serving.build_parser().parse_args(["--compare", "cache_aware,round_robin", "--dp-size", "3"])
    assert args.dp_size == 3 and not args.send_text
    assert serving.SETTING_FLAGS["round_robin"] == ["--router-policy", "round_robin"]
