"""SGLang's own frontend (`sglang==0.5.23`, `sglang.RuntimeEndpoint`) against a radixlm server: the 7
basic programs (a single gen, multi-turn chat, regex gen, select, fork/join, run_batch, streaming).

Skips (with the reason) when `sglang` is not importable. To install just the frontend:
    pip install --no-deps sglang==0.5.23 && pip install psutil pybase64 pillow msgspec ipython
(`import sglang` needs those; the frontend talks HTTP only).

The frontend talks to the server through a recording proxy; with RADIXLM_RECORD_FRONTEND=1 the
requests it sent are written to tests/fixtures/sglang_frontend_0.5.23.json, which
tests/test_sglang_fields.py replays against a radixlm server in CI (without the package).
"""

from __future__ import annotations

import json
import os
import pathlib
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Dict, List

import pytest
import requests

from tests.server_utils import ServerProcess

try:
    import sglang as sgl
except Exception as e:  # noqa: BLE001 - ImportError, or a missing module of its import chain
    pytest.skip(f"sglang is not importable ({type(e).__name__}: {e}); pip install --no-deps sglang==0.5.23 "
                "plus psutil pybase64 pillow msgspec ipython", allow_module_level=True)

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "sglang_frontend_0.5.23.json"


class RecordingProxy:
    """Forwards every request to `upstream` and logs (method, path, JSON body)."""

    def __init__(self, upstream: str):
        self.log: List[Dict[str, Any]] = []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def _forward(self):
                n = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(n) if n else b""
                body = json.loads(raw) if raw else None
                entry = {"method": self.command, "path": self.path, "body": body, "status": 599}  # 599: no answer
                proxy.log.append(entry)
                r = requests.request(self.command, upstream + self.path, data=raw or None, timeout=120,
                                     headers={"Content-Type": self.headers.get("Content-Type", "application/json")})
                entry.update(status=r.status_code, reply=r.text[:300])
                self.send_response(r.status_code)
                self.send_header("Content-Type", r.headers.get("Content-Type", "application/json"))
                self.send_header("Content-Length", str(len(r.content)))
                self.end_headers()
                self.wfile.write(r.content)

            do_GET = do_POST = do_PUT = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def backend(qwen2_path):
    with ServerProcess(qwen2_path) as srv:
        proxy = RecordingProxy(srv.base_url)
        try:
            yield sgl.RuntimeEndpoint(proxy.url), proxy
        finally:
            proxy.close()
            if os.environ.get("RADIXLM_RECORD_FRONTEND"):
                FIXTURE.write_text(json.dumps({
                    "client": "sglang 0.5.23 RuntimeEndpoint",
                    "how": "RADIXLM_RECORD_FRONTEND=1 pytest tests/test_sglang_frontend.py (through a recording proxy)",
                    "requests": [{k: q[k] for k in ("method", "path", "body")} for q in proxy.log]}, indent=1)
                    + "\n")
            bad = [q for q in proxy.log if not 200 <= q["status"] < 300]
            assert not bad, bad[:3]


@sgl.function
def single_gen(s, q):
    s += "Q: " + q + "\nA:" + sgl.gen("answer", max_tokens=8, temperature=0)


@sgl.function
def multi_turn(s, q1, q2):
    s += sgl.system("You are terse.")
    s += sgl.user(q1)
    s += sgl.assistant(sgl.gen("a1", max_tokens=6, temperature=0))
    s += sgl.user(q2)
    s += sgl.assistant(sgl.gen("a2", max_tokens=6, temperature=0))


@sgl.function
def regex_gen(s):
    s += "IP: " + sgl.gen("ip", max_tokens=24, temperature=0, regex=r"(\d{1,3}\.){3}\d{1,3}")


@sgl.function
def choose(s):
    s += "The sky is " + sgl.select("color", choices=["blue", "green", "red"])


@sgl.function
def fork_join(s):
    s += "Tips:\n"
    forks = s.fork(2)
    for i, f in enumerate(forks):
        f += f"{i + 1}." + sgl.gen("tip", max_tokens=6, temperature=0, stop="\n")
    s += "1." + forks[0]["tip"] + "\n2." + forks[1]["tip"] + "\n"
    s += "Summary:" + sgl.gen("summary", max_tokens=6, temperature=0)


@sgl.function
def batch_item(s, topic):
    s += "A long shared preamble that the batch caches once before running every program. " * 2
    s += "Topic: " + topic + "\n" + sgl.gen("text", max_tokens=5, temperature=0)


def test_single_gen(backend):
    st = single_gen.run(q="What is 2+2?", backend=backend[0])
    assert isinstance(st["answer"], str)
    assert st.get_meta_info("answer")["completion_tokens"] >= 1


def test_multi_turn_chat(backend):
    st = multi_turn.run(q1="Hi", q2="Bye", backend=backend[0])
    assert isinstance(st["a1"], str) and isinstance(st["a2"], str)
    assert len(st.messages()) == 5


def test_regex_gen(backend):
    import re

    st = regex_gen.run(backend=backend[0])
    assert re.fullmatch(r"(\d{1,3}\.){3}\d{1,3}", st["ip"]), st["ip"]


def test_select(backend):
    st = choose.run(backend=backend[0])
    assert st["color"] in ("blue", "green", "red")


def test_fork_join(backend):
    st = fork_join.run(backend=backend[0])
    assert isinstance(st["summary"], str)
    assert "1." in st.text() and "2." in st.text()


def test_run_batch(backend):
    states = batch_item.run_batch([{"topic": t} for t in ("cats", "dogs", "owls")], backend=backend[0])
    assert len(states) == 3 and all(isinstance(s["text"], str) for s in states)


def test_streaming(backend):
    st = single_gen.run(q="Count", backend=backend[0], stream=True)
    pieces = list(st.text_iter("answer"))
    assert "".join(pieces) == st["answer"]


def test_the_frontend_sent_stop_regex(backend):
    """Why 4 of 7 programs failed before: the frontend puts `stop_regex` into sampling_params."""
    gens = [q for q in backend[1].log if q["path"] == "/generate" and isinstance(q["body"], dict)]
    assert any("stop_regex" in (q["body"].get("sampling_params") or {}) for q in gens)


def test_flush_cache_and_server_info(backend):
    backend[0].flush_cache()
    info = backend[0].get_server_info()
    assert "max_total_num_tokens" in info
