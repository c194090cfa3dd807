"""Launching the processes a benchmark (or a test) runs against, on loopback: a radixlm server, and the
real `sglang-router` in front of workers. Each runs in its own process group with its output in a
temporary file, is waited on with a deadline until it answers, and `stop` ends its whole group
(SIGTERM, then SIGKILL). tests/server_utils.py and tests/router_stub.py use these classes too."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional

import httpx

# what `ready()` may raise while a process is still coming up (requests' errors are OSErrors too)
NOT_YET = (OSError, httpx.HTTPError)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LaunchedProcess:
    """A command in its own process group, its output in a temporary file, waited on (with a
    deadline) until `ready()`; `stop` ends the whole group (SIGTERM, then SIGKILL)."""

    name = "process"
    stop_timeout = 20.0

    def __init__(self, cmd: List[str], timeout: float, env: Optional[Dict[str, str]] = None):
        self.cmd = cmd
        self.log = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited early ({' '.join(cmd)}):\n{self.output()}")
            try:
                if self.ready():
                    return
            except NOT_YET:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"{self.name} not ready in {timeout:.0f} s ({' '.join(cmd)}):\n{self.output()}")

    def ready(self) -> bool:
        raise NotImplementedError

    def output(self, tail: int = 6000) -> str:
        """The last of what the process printed."""
        self.log.seek(0)
        return self.log.read()[-tail:]

    def stop(self, sig: int = signal.SIGTERM) -> Optional[int]:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(timeout=self.stop_timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        return self.proc.returncode

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class ServerProcess(LaunchedProcess):
    """`python -m radixlm.launch_server` on a free loopback port (or `port`), ready when `ready_path`
    answers 200 (`/readiness` for `--dp-size N`: the router in front of the replicas)."""

    name = "server"

    def __init__(self, model_path: str, extra_args: Optional[List[str]] = None, timeout: float = 120.0,
                 ready_path: str = "/health", port: Optional[int] = None, env: Optional[Dict[str, str]] = None):
        self.port = port or free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.ready_path = ready_path
        super().__init__([sys.executable, "-m", "radixlm.launch_server", "--model-path", model_path, "--port",
                          str(self.port), "--log-level", "warning", *(extra_args or [])], timeout, env)

    def ready(self) -> bool:
        return httpx.get(self.base_url + self.ready_path, timeout=5).status_code == 200


class RouterProcess(LaunchedProcess):
    """The real `sglang_router.launch_router` on 127.0.0.1 in its own process group. `workers` are the
    worker arguments: `["--worker-urls", url, ...]` (regular mode; a plain list of urls means that) or
    `["--pd-disaggregation", "--prefill", url, port, "--decode", url, ...]`."""

    name = "router"
    stop_timeout = 10.0

    def __init__(self, workers: List[str], policy: str = "cache_aware", extra: Optional[List[str]] = None,
                 timeout: float = 60.0, log_level: str = "warn"):
        if workers and not workers[0].startswith("--"):
            workers = ["--worker-urls", *workers]
        self.port, metrics_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"  # the router's Prometheus exporter
        super().__init__([sys.executable, "-m", "sglang_router.launch_router", "--host", "127.0.0.1", "--port",
                          str(self.port), *workers, "--policy", policy, "--prometheus-host", "127.0.0.1",
                          "--prometheus-port", str(metrics_port), "--log-level", log_level, *(extra or [])],
                         timeout)

    def ready(self) -> bool:
        return httpx.get(self.url + "/readiness", timeout=2).status_code == 200
