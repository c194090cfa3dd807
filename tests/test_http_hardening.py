"""Hardening of the HTTP surface and the IPC between radixlm's processes (issue 11).

* `/health` is cheap: it answers at once on a server saturated by long generations and queues no
  generation (`/health_generate` still runs the one-token check); 503 once the runtime is dead.
* The API key is compared with `hmac.compare_digest` and never returned by /get_server_info.
* CORS headers only with `--cors-allow-origins`, and then only for those origins.
* `/flush_cache` is POST only; Prometheus counters never go backwards across a cache flush.
* Request bodies over `--max-request-body-bytes` get 413 (JSON naming the limit) on every route, from
  Content-Length and while a chunked body streams in, before any JSON parsing.
* IPC: undecodable messages, foreign pickles, unexpected or malformed messages sent to the scheduler,
  the detokenizer and the tokenizer manager are logged and dropped; the server keeps serving. When the
  tokenizer manager's receive loop dies, waiting requests get 503, /health says 503, and the server exits.
  Control replies have a deadline and are matched by req_id.

One live server (loopback) for the module; the in-process tests build the app on an un-launched
TokenizerManager.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import pickle
import socket
import threading
import time
from typing import Any, Dict, List

import pytest
import requests

from radixlm.core import FinishReason, ReqOutput
from radixlm.managers.io_struct import (
    BatchStrOut,
    BatchTokenIDOut,
    DetokenizeParams,
    FlushCacheReq,
    FlushCacheReqOutput,
    GetInternalStateReq,
    SchedulerReady,
    StrOut,
    TokenizedGenerateReqInput,
    encode,
)
from tests.conftest import random_prompts
from tests.server_utils import children, info_stat
from tests.test_server_robustness import find_scheduler, launched

SPECIAL = (0, 1, 2)
VOCAB = 515
TIMEOUT = 60
KEY = "hardening-s3cret-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
LIMIT = 4096  # --max-request-body-bytes of the module's server
ORIGIN = "http://allowed.example"
GREEDY = {"temperature": 0, "max_new_tokens": 8, "ignore_eos": True}


@pytest.fixture(scope="module")
def model_path(model_factory):
    return model_factory("llama")


@pytest.fixture(scope="module")
def server(model_path):
    with launched(model_path, ["--api-key", KEY, "--enable-metrics", "--cors-allow-origins", ORIGIN,
                               "--max-request-body-bytes", str(LIMIT), "--max-running-requests", "2"]) as s:
        yield s


# ------------------------------------------------------------------------------ helpers
def get(server, path: str, **kw) -> requests.Response:
    return requests.get(server.base_url + path, headers={**AUTH, **kw.pop("headers", {})}, timeout=TIMEOUT, **kw)


def post(server, path: str, **kw) -> requests.Response:
    return requests.post(server.base_url + path, headers={**AUTH, **kw.pop("headers", {})}, timeout=TIMEOUT, **kw)


def generate(server, body: Dict[str, Any]) -> Dict[str, Any]:
    r = post(server, "/generate", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def info(server) -> Dict[str, Any]:
    r = get(server, "/get_server_info")
    assert r.status_code == 200, r.text
    return r.json()


def wait_idle(server, timeout: float = 60.0) -> Dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        i = info(server)
        if info_stat(i, "num_running_reqs") == 0 and info_stat(i, "num_queue_reqs") == 0:
            return i
        assert time.monotonic() < deadline, i["scheduler_info"]
        time.sleep(0.05)


def metrics(server) -> Dict[str, float]:
    r = requests.get(server.base_url + "/metrics", timeout=TIMEOUT)  # open route: no key needed
    assert r.status_code == 200, r.text
    vals = {}
    for line in r.text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            vals[name.split("{", 1)[0]] = float(value)
    return vals


def ids_for(seed: int, n: int) -> List[int]:
    return random_prompts(seed, [n], VOCAB, avoid=SPECIAL)[0]


def assert_error(r: requests.Response, status: int, *words: str) -> Dict[str, Any]:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert body["object"] == "error" and body["code"] == status, body
    for w in words:
        assert w.lower() in body["message"].lower(), (w, body["message"])
    return body


# ------------------------------------------------------------------------------ /health
def test_health_is_cheap_on_a_saturated_server(server):
    wait_idle(server)
    n, max_new = 4, 1900  # 2 running (--max-running-requests 2), 2 queued behind them
    done: Dict[int, Any] = {}

    def long_stream(i: int) -> None:
        body = {"input_ids": ids_for(10 + i, 8), "stream": True, "rid": f"saturate-{i}",
                "sampling_params": {"temperature": 0, "max_new_tokens": max_new, "ignore_eos": True}}
        last = None
        with requests.post(server.base_url + "/generate", json=body, headers=AUTH, stream=True, timeout=TIMEOUT) as r:
            for line in r.iter_lines(chunk_size=None):
                if line and line != b"data: [DONE]":
                    last = json.loads(line[6:])
        done[i] = last

    threads = [threading.Thread(target=long_stream, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + 30
        while True:
            i = info(server)
            if info_stat(i, "num_running_reqs") == 2 and info_stat(i, "num_queue_reqs") == 2:
                break
            assert time.monotonic() < deadline, i["scheduler_info"]
            time.sleep(0.05)
        before = metrics(server)["sglang:num_requests_total"]
        for _ in range(5):
            t0 = time.monotonic()
            r = requests.get(server.base_url + "/health", timeout=10)
            elapsed = time.monotonic() - t0
            assert r.status_code == 200
            assert elapsed < 2.0, f"/health took {elapsed:.2f} s on a busy server"
        assert metrics(server)["sglang:num_requests_total"] == before, "/health queued a generation"
        assert info_stat(info(server), "num_queue_reqs") <= 2
    finally:
        post(server, "/abort_request", json={"abort_all": True})
        for t in threads:
            t.join(timeout=TIMEOUT)
    assert not any(t.is_alive() for t in threads)
    assert len(done) == n
    assert all(d["meta_info"]["finish_reason"]["type"] == "abort" for d in done.values()), done
    wait_idle(server)
    # /health_generate is the one-token generation check
    before = metrics(server)["sglang:num_requests_total"]
    assert requests.get(server.base_url + "/health_generate", timeout=TIMEOUT).status_code == 200
    assert metrics(server)["sglang:num_requests_total"] == before + 1


# ------------------------------------------------------------------------------ API key, CORS
def test_server_info_never_returns_the_api_key(server):
    r = get(server, "/get_server_info")
    assert r.status_code == 200
    assert KEY not in r.text
    assert r.json()["api_key"] != KEY
    assert requests.get(server.base_url + "/get_server_info", timeout=TIMEOUT).status_code == 401
    r = requests.get(server.base_url + "/get_server_info", headers={"Authorization": f"Bearer {KEY}x"},
                     timeout=TIMEOUT)
    assert_error(r, 401, "api key")


def test_cors_only_for_the_allowed_origins(server):
    pre = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type,authorization"}
    r = requests.options(server.base_url + "/v1/chat/completions", headers={"Origin": ORIGIN, **pre},
                         timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    assert r.headers.get("access-control-allow-origin") == ORIGIN
    r = requests.options(server.base_url + "/v1/chat/completions",
                         headers={"Origin": "http://evil.example", **pre}, timeout=TIMEOUT)
    assert r.headers.get("access-control-allow-origin") not in ("*", "http://evil.example")
    r = get(server, "/get_model_info", headers={"Origin": ORIGIN})
    assert r.status_code == 200 and r.headers.get("access-control-allow-origin") == ORIGIN
    r = get(server, "/get_model_info", headers={"Origin": "http://evil.example"})
    assert "access-control-allow-origin" not in r.headers


def _app(model_path, **overrides):
    from radixlm.entrypoints.http_server import create_app
    from radixlm.managers.tokenizer_manager import TokenizerManager
    from radixlm.server_args import ServerArgs

    tm = TokenizerManager(ServerArgs(model_path=model_path, log_level="warning", **overrides))
    return tm, create_app(tm)


def test_load_shedding_is_503_with_retry_after(model_path):
    """Over --max-running-requests + --max-queued-requests in flight, a new request is shed with a 503
    that says when to come back (a router backs off instead of retrying at once); a dead runtime's
    503 carries no Retry-After (it is not transient)."""
    from starlette.testclient import TestClient

    tm, app = _app(model_path, max_running_requests=1, max_queued_requests=1)
    try:
        client = TestClient(app)  # no lifespan: the in-flight requests are placeholders
        tm.states.update({f"held-{i}": object() for i in range(2)})
        body = {"input_ids": ids_for(1, 4), "sampling_params": GREEDY}
        for path, b in (("/generate", body), ("/v1/completions", {"prompt": "hi", "max_tokens": 2})):
            r = client.post(path, json=b)
            assert_error(r, 503, "overloaded", "--max-queued-requests")
            assert r.headers["Retry-After"] == "1"
        tm.states.clear()
        tm.dead_reason = "scheduler exited"
        r = client.post("/generate", json=body)
        assert r.status_code == 503 and "Retry-After" not in r.headers
    finally:
        tm.states.clear()
        tm.shutdown()


def test_cors_is_off_by_default(model_path):
    from starlette.testclient import TestClient

    tm, app = _app(model_path)
    try:
        client = TestClient(app)  # no lifespan: nothing connects to a runtime
        r = client.options("/v1/chat/completions", headers={"Origin": "http://anyone.example",
                                                            "Access-Control-Request-Method": "POST"})
        assert "access-control-allow-origin" not in r.headers, dict(r.headers)
        r = client.get("/get_model_info", headers={"Origin": "http://anyone.example"})
        assert r.status_code == 200
        assert not any(h.startswith("access-control-") for h in r.headers), dict(r.headers)
    finally:
        tm.shutdown()


def test_api_key_is_compared_in_constant_time(model_path, monkeypatch):
    from starlette.testclient import TestClient

    calls = []
    real = hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    tm, app = _app(model_path, api_key="k3y")
    try:
        client = TestClient(app)
        assert client.get("/get_model_info", headers={"Authorization": "Bearer k3y"}).status_code == 200
        assert calls and all(b"k3y" in b for _, b in calls)
        calls.clear()
        r = client.get("/get_model_info", headers={"Authorization": "Bearer k3z"})
        assert r.status_code == 401 and r.json()["code"] == 401
        assert calls, "the key was not compared with hmac.compare_digest"
        assert client.get("/get_model_info").status_code == 401
        assert "k3y" not in r.text
    finally:
        tm.shutdown()


# ------------------------------------------------------------------------------ /flush_cache, metrics
def test_flush_cache_is_post_only(server):
    wait_idle(server)
    r = get(server, "/flush_cache")
    assert_error(r, 405)
    assert "POST" in r.headers.get("allow", ""), dict(r.headers)
    assert post(server, "/flush_cache", json={"empty_cache": True}).status_code == 200  # RuntimeEndpoint's body
    assert post(server, "/flush_cache").status_code == 200


def test_prometheus_counters_survive_a_cache_flush(server):
    counters = ("sglang:prompt_tokens_total", "sglang:cached_tokens_total", "sglang:generation_tokens_total",
                "sglang:num_requests_total", "sglang:num_retractions_total")
    prompt = ids_for(5, 30)
    wait_idle(server)
    m0 = metrics(server)
    generate(server, {"input_ids": prompt, "sampling_params": GREEDY})
    generate(server, {"input_ids": prompt, "sampling_params": GREEDY})  # a cache hit
    wait_idle(server)
    m1 = metrics(server)
    per_request = (m1["sglang:generation_tokens_total"] - m0["sglang:generation_tokens_total"]) / 2
    assert per_request >= 7 and m1["sglang:cached_tokens_total"] > m0["sglang:cached_tokens_total"]
    assert post(server, "/flush_cache").status_code == 200
    m2 = metrics(server)
    for c in counters:
        assert m2[c] >= m1[c], (c, m1[c], m2[c])
    generate(server, {"input_ids": prompt, "sampling_params": GREEDY})
    wait_idle(server)
    assert post(server, "/flush_cache").status_code == 200
    m3 = metrics(server)
    for c in counters:
        assert m3[c] >= m2[c], (c, m2[c], m3[c])
    assert m3["sglang:generation_tokens_total"] == m1["sglang:generation_tokens_total"] + per_request
    assert m3["sglang:prompt_tokens_total"] == m1["sglang:prompt_tokens_total"] + 30
    assert m3["sglang:num_requests_total"] == m1["sglang:num_requests_total"] + 1


# ------------------------------------------------------------------------------ body size limit
SMALL = {"text": "hi", "sampling_params": {"max_new_tokens": 1}}


@pytest.mark.parametrize("method,path", [("POST", "/generate"), ("POST", "/v1/chat/completions"),
                                         ("POST", "/v1/completions"), ("POST", "/abort_request"),
                                         ("POST", "/flush_cache"), ("GET", "/get_model_info")])
def test_oversized_body_is_413_on_every_route(server, method, path):
    body = b'{"text": "' + b"x" * LIMIT + b'"}'
    r = requests.request(method, server.base_url + path, data=body, timeout=TIMEOUT,
                         headers={**AUTH, "Content-Type": "application/json"})
    assert_error(r, 413, str(LIMIT), "max_request_body_bytes")


def test_body_at_the_limit_is_accepted(server):
    data = json.dumps(SMALL).encode()
    data = data[:-1] + b" " * (LIMIT - len(data)) + b"}"
    assert len(data) == LIMIT
    r = post(server, "/generate", data=data, headers={"Content-Type": "application/json"})
    assert r.status_code == 200, r.text
    assert r.json()["meta_info"]["completion_tokens"] == 1


def test_chunked_body_is_limited_while_streaming(server):
    def chunks(total: int):
        head = b'{"text": "'
        yield head
        left = total - len(head) - 2
        while left > 0:
            n = min(1000, left)
            yield b"y" * n
            left -= n
        yield b'"}'

    r = post(server, "/generate", data=chunks(LIMIT + 500), headers={"Content-Type": "application/json"})
    assert "content-length" not in {k.lower() for k in r.request.headers}
    assert r.request.headers.get("Transfer-Encoding") == "chunked"
    assert_error(r, 413, str(LIMIT))
    # a chunked body under the limit reaches the route intact
    small = json.dumps(SMALL).encode()
    r = post(server, "/generate", data=iter([small[:5], small[5:]]), headers={"Content-Type": "application/json"})
    assert r.status_code == 200, r.text
    assert r.json()["meta_info"]["completion_tokens"] == 1


def test_declared_length_is_refused_before_the_body_is_sent(server):
    """Content-Length over the limit: 413 at once, without waiting for (or reading) the body."""
    s = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    try:
        s.sendall((f"POST /generate HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n"
                   f"Content-Type: application/json\r\nContent-Length: {10 ** 9}\r\n\r\n").encode())
        buf = b""
        while b"\r\n\r\n" not in buf or not buf.rstrip().endswith(b"}"):
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
            assert len(buf) < 1 << 16
    finally:
        s.close()
    assert buf.startswith(b"HTTP/1.1 413"), buf[:200]
    assert str(LIMIT).encode() in buf


# ------------------------------------------------------------------------------ IPC robustness (in-process)
class _BrokenSocket:
    async def recv(self):
        raise RuntimeError("the socket broke")


def test_tokenizer_manager_drops_bad_messages_and_dies_loudly(model_path, monkeypatch):
    """Garbage, foreign pickles, unexpected and malformed messages are dropped; the loop keeps filling
    request states. When the loop itself fails: waiting requests get 503, /health 503, the server exits."""
    import httpx
    import zmq

    from radixlm.managers import tokenizer_manager as tmm

    monkeypatch.setattr(tmm, "EXIT_DELAY_S", 0.05)
    tm, app = _app(model_path)
    exited = threading.Event()
    tm.on_fatal = exited.set

    def msg(rid):
        return TokenizedGenerateReqInput(rid=rid, input_ids=[5, 6], sampling_params={"max_new_tokens": 1})

    def out(rid):
        return BatchStrOut([StrOut(rid, "hey", ReqOutput(rid, [7], FinishReason("length", length=1), 2, 1, 0))])

    async def scenario():
        tm.connect()
        ctx = zmq.Context()
        push = ctx.socket(zmq.PUSH)
        push.connect(tm.ipc.tokenizer_input)
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app")
        real_recv = tm.recv_sock
        try:
            assert (await client.get("/health")).status_code == 200
            first, second = tmm.ReqState(msg("first")), tmm.ReqState(msg("second"))
            tm.states.update({"first": first, "second": second})
            for data in (b"not a pickle", b"", pickle.dumps({"rid": "first"}), pickle.dumps(os.system),
                         encode(FlushCacheReq()), encode(SchedulerReady(True)),
                         encode(BatchStrOut([None])),  # type: ignore[list-item]
                         encode(FlushCacheReqOutput(True, "late", req_id=12345)), encode(out("first"))):
                push.send(data)
            await asyncio.wait_for(tm.wait_all([first]), 10)
            assert first.text == "hey" and first.output_ids == [7]
            assert tm.num_dropped_messages >= 7
            assert tm.unhealthy_reason() is None and (await client.get("/health")).status_code == 200
            # a control request the scheduler never answers: 503 after its deadline, nothing left waiting
            with pytest.raises(tmm.ServiceUnavailable, match="did not answer"):
                await tm._control(GetInternalStateReq(), timeout=0.2)
            assert not tm.control_waiters
            # the receive loop dies
            tm.recv_sock = _BrokenSocket()
            push.send(encode(out("nobody")))  # wakes the loop, whose next receive fails
            with pytest.raises(tmm.ServiceUnavailable):
                await asyncio.wait_for(tm.wait_all([second]), 10)
            assert "receive loop" in tm.dead_reason
            assert (await client.get("/health")).status_code == 503
            assert (await client.get("/health_generate")).status_code == 503
            r = await client.post("/generate", json={"text": "hi"})
            assert r.status_code == 503 and r.json()["code"] == 503
            for _ in range(100):
                if exited.is_set():
                    break
                await asyncio.sleep(0.02)
        finally:
            await client.aclose()
            push.close(linger=0)
            ctx.term()
            for t in tm._tasks:
                t.cancel()
            real_recv.close(linger=0)
            tm.send_sock.close(linger=0)

    try:
        asyncio.run(scenario())
    finally:
        tm.shutdown()
    assert exited.is_set(), "the server was not told to exit"


def test_detokenizer_survives_a_request_it_cannot_decode():
    from radixlm.managers.detokenizer_manager import DetokenizerManager

    class Tok:
        def decode(self, ids, **_):
            if 13 in ids:
                raise ValueError("cannot decode 13")
            return "".join(chr(ord("a") + i % 26) for i in ids)

    mgr = DetokenizerManager(Tok())
    outs = [ReqOutput("bad", [13], FinishReason("length", length=1), 1, 1, 0),
            ReqOutput("good", [0, 1], FinishReason("length", length=2), 1, 2, 0)]
    got = mgr.handle(BatchTokenIDOut(outs, [DetokenizeParams(), DetokenizeParams()]))
    assert [(i.rid, i.text_delta) for i in got.items] == [("bad", ""), ("good", "ab")]
    assert got.items[0].output.finished_reason.type == "length"  # its client is still answered
    assert not mgr.states


# ------------------------------------------------------------------------------ IPC robustness (live; last)
def test_garbage_on_every_ipc_socket_is_dropped(server):
    import zmq

    wait_idle(server)
    kids = children(server.proc.pid)
    sched_pid = find_scheduler(server.proc.pid)["pid"]
    reference = generate(server, {"input_ids": ids_for(7, 6), "sampling_params": GREEDY})
    common = [b"garbage", b"", b"\x80\x05N.", pickle.dumps({"not": "a message"}), pickle.dumps(os.system),
              encode(SchedulerReady(True))]
    per_socket = {
        "scheduler": [encode(TokenizedGenerateReqInput(rid="bad", input_ids=None, sampling_params={})),  # type: ignore
                      encode(TokenizedGenerateReqInput(rid="bad2", input_ids=[1], sampling_params={"bogus": 1})),
                      encode(BatchStrOut([]))],
        "detokenizer": [encode(BatchTokenIDOut([None], [DetokenizeParams()])),  # type: ignore[list-item]
                        encode(FlushCacheReq())],
        "tokenizer": [encode(BatchStrOut([None])), encode(FlushCacheReqOutput(True, "late", req_id=99999)),  # type: ignore
                      encode(FlushCacheReq())],
    }
    ctx = zmq.Context()
    try:
        for name, extra in per_socket.items():
            push = ctx.socket(zmq.PUSH)
            push.connect(f"ipc://{server.ipc_dir}/{name}")
            for data in common + extra:
                push.send(data)
            push.close(linger=5000)
    finally:
        ctx.term()
    time.sleep(0.5)  # let every process take its share
    assert server.proc.poll() is None, "the server died"
    assert children(server.proc.pid) == kids and find_scheduler(server.proc.pid)["pid"] == sched_pid
    assert requests.get(server.base_url + "/health", timeout=TIMEOUT).status_code == 200
    again = generate(server, {"input_ids": ids_for(7, 6), "sampling_params": GREEDY})
    assert again["output_ids"] == reference["output_ids"]
    assert again["text"] == reference["text"]
    i = wait_idle(server)
    assert i["num_in_flight_requests"] == 0
    assert post(server, "/flush_cache").status_code == 200
