"""The HTTP server under stress and failure, on a real `python -m radixlm.launch_server` (loopback only).

* 64 concurrent streaming clients all complete correctly.
* 50 clients that disconnect mid-stream leave nothing behind: the scheduler goes idle, the cache
  flushes, and every KV slot is free again.
* The scheduler process dies (SIGKILL): requests get 503 (or the connection fails once the server has
  exited) and the server exits by itself instead of hanging.
* The server's main process dies (SIGKILL): its children follow.
* Ctrl-C (SIGINT) to the main process, or to the whole group: everything exits.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, Iterator, List, Optional

import pytest
import requests

from tests.conftest import random_prompts
from tests.server_utils import (
    ServerProcess,
    alive,
    assert_exits_with_children,
    assert_inflight_answered,
    children,
    descendants,
    group_members,
    info_stat,
    poll_until_unavailable,
    server_info,
    start_inflight,
    wait_idle,
    wait_until,
)

SPECIAL = (0, 1, 2)
VOCAB = 515
TIMEOUT = 60


class ShutdownHang(AssertionError):
    """The server did not exit in time."""


def socket_inodes(pid: int) -> set:
    out = set()
    for fd in glob.glob(f"/proc/{pid}/fd/*"):
        try:
            link = os.readlink(fd)
        except OSError:
            continue
        m = re.fullmatch(r"socket:\[(\d+)\]", link)
        if m:
            out.add(m.group(1))
    return out


def unix_socket_paths() -> Dict[str, str]:
    """inode -> bound path, from /proc/net/unix."""
    out = {}
    with open("/proc/net/unix") as fh:
        next(fh)
        for line in fh:
            parts = line.split()
            if len(parts) >= 8:
                out[parts[6]] = parts[7]
    return out


def find_scheduler(server_pid: int) -> Dict[str, Any]:
    """The scheduler child is the process that holds the socket bound to <ipc dir>/scheduler."""
    paths = unix_socket_paths()
    for kid in children(server_pid):
        for ino in socket_inodes(kid):
            p = paths.get(ino, "")
            if p.endswith("/scheduler") and "radixlm-ipc-" in p:
                return {"pid": kid, "ipc_dir": os.path.dirname(p)}
    raise AssertionError(f"no scheduler child among {children(server_pid)}")


@contextlib.contextmanager
def launched(model_path: str, extra_args: Optional[List[str]] = None) -> Iterator[ServerProcess]:
    """A server that is killed (whole group) and whose IPC directory is removed afterwards, whatever happens."""
    s = ServerProcess(model_path, extra_args)
    try:
        s.ipc_dir = find_scheduler(s.proc.pid)["ipc_dir"]
    except BaseException:
        hard_kill_group(s.proc)
        raise
    try:
        yield s
    finally:
        hard_kill_group(s.proc)
        shutil.rmtree(s.ipc_dir, ignore_errors=True)  # the server leaks it (see test_clean_shutdown_removes_ipc_dir)


def hard_kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


# ------------------------------------------------------------------------------ HTTP helpers
def ids_for(seed: int, n: int) -> List[int]:
    return random_prompts(seed, [n], VOCAB, avoid=SPECIAL)[0]


def stream_generate(base_url: str, body: Dict[str, Any]) -> List[Any]:
    events: List[Any] = []
    with requests.post(base_url + "/generate", json={**body, "stream": True}, stream=True, timeout=TIMEOUT) as r:
        assert r.status_code == 200, r.text
        for line in r.iter_lines(chunk_size=None):
            if not line:
                continue
            line = line.decode()
            assert line.startswith("data: "), line
            payload = line[6:]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
            assert len(events) < 1000
    return events


def open_and_drop_stream(port: int, body: Dict[str, Any], n_events: int) -> int:
    """Raw HTTP/1.1: start a streaming /generate, read n_events SSE events, then close the socket."""
    data = json.dumps({**body, "stream": True}).encode()
    req = (f"POST /generate HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
           f"Content-Length: {len(data)}\r\n\r\n").encode() + data
    s = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    try:
        s.sendall(req)
        buf = b""
        while buf.count(b"data: ") < n_events:
            chunk = s.recv(65536)
            assert chunk, f"server closed the stream early: {buf[-300:]!r}"
            buf += chunk
            assert len(buf) < 1 << 20
        assert buf.startswith(b"HTTP/1.1 200"), buf[:200]
        return buf.count(b"data: ")
    finally:
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        s.close()


@pytest.fixture(scope="module")
def model_path(model_factory):
    return model_factory("llama")


@pytest.fixture(scope="module")
def server(model_path):
    with launched(model_path, ["--max-running-requests", "64"]) as s:
        yield s


# ------------------------------------------------------------------------------ load
def test_64_concurrent_streaming_clients(server):
    n = 64
    prompts = random_prompts(100, [4 + (i % 13) for i in range(n)], VOCAB, avoid=SPECIAL)

    def client(i: int) -> List[Any]:
        return stream_generate(server.base_url, {"input_ids": prompts[i], "rid": f"load-{i}",
                                                 "sampling_params": {"temperature": 0, "max_new_tokens": 16,
                                                                     "ignore_eos": True}})

    t0 = time.monotonic()
    with ThreadPoolExecutor(n) as ex:
        results = list(ex.map(client, range(n), timeout=120))
    assert time.monotonic() - t0 < 120
    for i, events in enumerate(results):
        assert events[-1] == "[DONE]" and events.count("[DONE]") == 1, events[-3:]
        chunks = events[:-1]
        assert chunks and all(c["meta_info"]["id"] == f"load-{i}" for c in chunks)
        last = chunks[-1]
        assert last["meta_info"]["completion_tokens"] == 16
        assert len(last["output_ids"]) == 16
        assert last["meta_info"]["finish_reason"] == {"type": "length", "length": 16}
        assert last["meta_info"]["prompt_tokens"] == len(prompts[i])
        texts = [c["text"] for c in chunks]
        assert all(b.startswith(a) for a, b in zip(texts, texts[1:]))
    # batching must not change greedy results: spot-check a few against a lone request
    for i in (0, 17, 63):
        alone = requests.post(server.base_url + "/generate", timeout=TIMEOUT, json={
            "input_ids": prompts[i], "sampling_params": {"temperature": 0, "max_new_tokens": 16, "ignore_eos": True}})
        assert alone.json()["output_ids"] == results[i][-2]["output_ids"]
    wait_idle(server.base_url)


def test_mid_stream_disconnects_free_everything(server):
    wait_idle(server.base_url)
    before = info_stat(server_info(server.base_url), "generated_tokens")
    n, max_new = 50, 200

    def drop(i: int) -> int:
        body = {"input_ids": ids_for(200 + i, 5 + i % 20),
                "sampling_params": {"temperature": 0, "max_new_tokens": max_new, "ignore_eos": True}}
        return open_and_drop_stream(server.port, body, 1 + i % 2)

    with ThreadPoolExecutor(10) as ex:
        got = list(ex.map(drop, range(n), timeout=120))
    assert all(g >= 1 for g in got)
    info = wait_idle(server.base_url, timeout=60)
    generated = info_stat(info, "generated_tokens") - before
    # the disconnected requests were aborted, not run to max_new_tokens
    assert generated < n * max_new // 2, f"{generated} tokens generated for {n} dropped streams"
    assert info["num_in_flight_requests"] == 0
    r = requests.post(server.base_url + "/flush_cache", timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    info = server_info(server.base_url)
    s = info["scheduler_info"]
    assert s["free_kv_tokens"] == s["max_total_num_tokens"] == info["max_total_num_tokens"]
    assert s["evictable_kv_tokens"] == 0
    assert s["protected_kv_tokens"] == 0
    assert s["token_usage"] == 0.0
    # and the server still serves
    ok = requests.post(server.base_url + "/generate", timeout=TIMEOUT, json={
        "text": "after the storm", "sampling_params": {"temperature": 0, "max_new_tokens": 4, "ignore_eos": True}})
    assert ok.status_code == 200 and ok.json()["meta_info"]["completion_tokens"] == 4


# ------------------------------------------------------------------------------ process failures
def test_scheduler_death_gives_503_and_server_exits(server):
    """Runs last on the module's server (it kills it)."""
    s = server
    sched = find_scheduler(s.proc.pid)
    # a long request in flight when the scheduler dies must be answered, not left hanging
    t, inflight = start_inflight(s.base_url, {"input_ids": ids_for(300, 8), "sampling_params": {
        "temperature": 0, "max_new_tokens": 1800, "ignore_eos": True}})
    assert wait_until(lambda: info_stat(server_info(s.base_url), "num_running_reqs") == 1, 10)
    os.kill(sched["pid"], signal.SIGKILL)
    t0 = time.monotonic()
    poll_until_unavailable(s.base_url, 10, lambda msg: "unavailable" in msg or "scheduler" in msg)
    assert time.monotonic() - t0 < 10
    try:  # health checks report it too (while the server is still up)
        h = requests.get(s.base_url + "/health_generate", timeout=5).status_code
        assert h == 503, h
    except requests.ConnectionError:
        pass
    assert_inflight_answered(t, inflight)
    assert_exits_with_children(s.proc, 15, "its scheduler's death")


def test_parent_death_takes_children_down(model_path):
    with launched(model_path) as s:
        kids = descendants(s.proc.pid)
        assert len(kids) >= 2, kids  # scheduler + detokenizer (+ multiprocessing's resource tracker)
        os.kill(s.proc.pid, signal.SIGKILL)
        s.proc.wait(timeout=10)
        assert wait_until(lambda: not any(alive(k) for k in kids), 10), \
            f"children still alive 10 s after the server died: {[k for k in kids if alive(k)]}"


@pytest.fixture(scope="module")
def sigint_run(model_path):
    """Ctrl-C (SIGINT) to the main process of a server that has just served a request."""
    result: Dict[str, Any] = {}
    with launched(model_path) as s:
        ipc_dir = s.ipc_dir
        kids = descendants(s.proc.pid)
        with requests.Session() as sess:  # leaves an idle keep-alive connection open
            ok = sess.post(s.base_url + "/generate", timeout=TIMEOUT, json={
                "text": "hi", "sampling_params": {"max_new_tokens": 2}})
            assert ok.status_code == 200
            t0 = time.monotonic()
            os.kill(s.proc.pid, signal.SIGINT)
            try:
                s.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                pass
            wait_until(lambda: not group_members(s.proc.pid), max(0.0, 20 - (time.monotonic() - t0)))
            result = {"elapsed": time.monotonic() - t0, "returncode": s.proc.poll(),
                      "left": group_members(s.proc.pid), "kids_alive": [k for k in kids if alive(k)],
                      "ipc_dir": ipc_dir, "ipc_dir_exists": os.path.exists(ipc_dir)}
    return result


def test_sigint_stops_the_whole_group(sigint_run):
    assert sigint_run["returncode"] is not None, "main process still running 20 s after SIGINT"
    assert not sigint_run["left"], f"process group members left: {sigint_run['left']}"
    assert not sigint_run["kids_alive"]
    assert sigint_run["elapsed"] < 20


def test_clean_shutdown_removes_ipc_dir(sigint_run):
    assert not sigint_run["ipc_dir_exists"], sigint_run["ipc_dir"]


def test_sigint_with_a_stalled_stream_still_exits(model_path):
    """A streaming client that stops reading must not keep the server up after Ctrl-C."""
    with launched(model_path) as s:
        body = json.dumps({"text": "stall", "stream": True,
                           "sampling_params": {"max_new_tokens": 1500, "ignore_eos": True}})
        sock = socket.create_connection(("127.0.0.1", s.port), timeout=TIMEOUT)
        sock.sendall((f"POST /generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                      f"Content-Length: {len(body)}\r\n\r\n{body}").encode())
        buf = b""
        while b"data:" not in buf:  # the stream has started; from now on nobody reads it
            chunk = sock.recv(4096)
            if not chunk:
                break
            buf += chunk
        t0 = time.monotonic()
        os.kill(s.proc.pid, signal.SIGINT)
        exited = wait_until(lambda: s.proc.poll() is not None and not group_members(s.proc.pid), 20, 0.2)
        if not exited:
            sock.close()
            raise ShutdownHang(f"still running {time.monotonic() - t0:.0f} s after SIGINT: {group_members(s.proc.pid)}")
        sock.close()


def test_ctrl_c_to_the_whole_group(model_path):
    """A terminal's Ctrl-C reaches every process of the foreground group at once."""
    with launched(model_path) as s:
        ok = requests.post(s.base_url + "/generate", timeout=TIMEOUT, json={
            "text": "hi", "sampling_params": {"max_new_tokens": 2}})
        assert ok.status_code == 200
        os.killpg(s.proc.pid, signal.SIGINT)
        try:
            s.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pytest.fail("main process still running 20 s after a group-wide SIGINT")
        assert wait_until(lambda: not group_members(s.proc.pid), 10), group_members(s.proc.pid)
