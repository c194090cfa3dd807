"""Starting a real radixlm server on loopback for tests, the way a user starts it."""

from __future__ import annotations

import glob
import subprocess
import threading
import time
from typing import Any, Callable, Dict, List, Tuple, Union

import requests

from radixlm.bench.launcher import LaunchedProcess, ServerProcess, free_port  # noqa: F401 (re-exported)


def _url(server: Union[str, "ServerProcess"]) -> str:
    return server if isinstance(server, str) else server.base_url


def server_info(server: Union[str, "ServerProcess"], timeout: float = 30.0) -> Dict[str, Any]:
    r = requests.get(_url(server) + "/get_server_info", timeout=timeout)
    assert r.status_code == 200, r.text
    return r.json()


def info_stat(info: Dict[str, Any], key: str) -> Any:
    """A live scheduler stat of /get_server_info: top level (SGLang merges scheduler_info there) or nested."""
    if key in info:
        return info[key]
    if key in info.get("scheduler_info", {}):
        return info["scheduler_info"][key]
    return info["internal_states"][0][key]


def wait_idle(server: Union[str, "ServerProcess"], timeout: float = 30.0) -> Dict[str, Any]:
    """Polls /get_server_info until nothing runs or waits; returns the last answer."""
    deadline = time.monotonic() + timeout
    while True:
        info = server_info(server)
        if info_stat(info, "num_running_reqs") == 0 and info_stat(info, "num_queue_reqs") == 0:
            return info
        assert time.monotonic() < deadline, f"server still busy: {info.get('scheduler_info')}"
        time.sleep(0.05)


# ------------------------------------------------------------------------------ processes
def children(pid: int) -> List[int]:
    kids: List[int] = []
    for f in glob.glob(f"/proc/{pid}/task/*/children"):
        try:
            with open(f) as fh:
                kids += [int(x) for x in fh.read().split()]
        except OSError:
            pass
    return sorted(set(kids))


def descendants(pid: int) -> List[int]:
    out, todo = [], [pid]
    while todo:
        for k in children(todo.pop()):
            if k not in out:
                out.append(k)
                todo.append(k)
    return out


def alive(pid: int) -> bool:
    """Running (not gone, not a zombie)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            state = fh.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def group_members(pgid: int) -> List[int]:
    out = []
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(stat) as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            out.append(int(stat.split("/")[2]))
    return out


def wait_until(cond, timeout: float, step: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(step)
    return cond()


def comm(pid: int) -> str:
    """A process's name (as set with prctl / setproctitle)."""
    try:
        with open(f"/proc/{pid}/comm") as fh:
            return fh.read().strip()
    except OSError:
        return ""


# ------------------------------------------------------------------------------ a runtime process dies
def start_inflight(base_url: str, body: Dict[str, Any]) -> Tuple[threading.Thread, Dict[str, Any]]:
    """A /generate in flight on a thread; its `status` (or `error`) lands in the returned dict."""
    out: Dict[str, Any] = {}

    def run():
        try:
            out["status"] = requests.post(base_url + "/generate", timeout=30, json=body).status_code
        except requests.RequestException as e:
            out["error"] = repr(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


def poll_until_unavailable(base_url: str, window: float, message_ok: Callable[[str], bool]) -> List[Any]:
    """New requests after a runtime process died: 503 (with an acceptable message) or the server gone,
    within `window` seconds. Returns the statuses seen."""
    t0, statuses = time.monotonic(), []
    while time.monotonic() - t0 < window:
        try:
            r = requests.post(base_url + "/generate", timeout=5,
                              json={"text": "are you there", "sampling_params": {"max_new_tokens": 2}})
            statuses.append(r.status_code)
            if r.status_code == 503:
                msg = r.json()["message"].lower()
                assert message_ok(msg), msg
                break
        except requests.ConnectionError:
            statuses.append("connection-error")
            break
        time.sleep(0.1)
    assert statuses and statuses[-1] in (503, "connection-error"), statuses
    return statuses


def assert_inflight_answered(t: threading.Thread, out: Dict[str, Any]) -> None:
    t.join(timeout=30)
    assert not t.is_alive(), "the in-flight request hung"
    assert out.get("status") == 503 or "error" in out, out


def assert_exits_with_children(proc: subprocess.Popen, timeout: float, what: str) -> None:
    """The server exits on its own, and no process of its group outlives it."""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the server did not exit within {timeout} s of {what}") from None
    assert wait_until(lambda: not group_members(proc.pid), 10), group_members(proc.pid)
