"""Starting a real radixlm server on loopback for tests, the way a user starts it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional, Union

import requests


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, model_path: str, extra_args: Optional[List[str]] = None, timeout: float = 120.0):
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "radixlm.launch_server", "--model-path", model_path, "--port", str(self.port),
               "--log-level", "warning", *(extra_args or [])]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited early:\n{self.proc.stdout.read()}")
            try:
                if requests.get(self.base_url + "/health", timeout=5).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError("server did not start in time")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


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
