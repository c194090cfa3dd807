"""`Runtime`: starts `python -m radixlm.launch_server` as a child process, waits until
/health_generate answers 200, and exposes a `RuntimeEndpoint` to it (`.endpoint`, `.url`).

    rt = rl.Runtime(model_path="models/demo-qwen2-small", log_level="warning")
    rl.set_default_backend(rt)
    ...
    rt.shutdown()

Keyword arguments become command-line flags: `mem_fraction_static=0.5` -> `--mem-fraction-static
0.5`, `True` -> a bare flag, `False`/`None` -> omitted, a list -> several values.
"""

from __future__ import annotations

import atexit
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional

from radixlm.lang.backend.runtime_endpoint import RuntimeEndpoint


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def server_args_to_argv(kwargs: Dict[str, Any]) -> List[str]:
    argv: List[str] = []
    for k, v in kwargs.items():
        flag = "--" + k.replace("_", "-")
        if v is None or v is False:
            continue
        if v is True:
            argv.append(flag)
        elif isinstance(v, (list, tuple)):
            argv += [flag, *map(str, v)]
        else:
            argv += [flag, str(v)]
    return argv


class Runtime:
    def __init__(self, model_path: Optional[str] = None, host: str = "127.0.0.1", port: Optional[int] = None,
                 launch_timeout: float = 300.0, api_key: Optional[str] = None, log_path: Optional[str] = None,
                 **server_args: Any):
        self.host = host
        self.port = port or _free_port(host)
        self.url = f"http://{host}:{self.port}"
        self.api_key = api_key
        args = {"model_path": model_path, **server_args, "host": host, "port": self.port, "api_key": api_key}
        cmd = [sys.executable, "-m", "radixlm.launch_server", *server_args_to_argv(args)]
        if log_path is None:
            fd, log_path = tempfile.mkstemp(prefix="radixlm-runtime-", suffix=".log")
            os.close(fd)
        self.log_path = log_path
        self._log = open(log_path, "w")
        self.pid = None
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.pid = self.proc.pid
        atexit.register(self.shutdown)
        try:
            self._wait_ready(launch_timeout)
            self.endpoint = RuntimeEndpoint(self.url, api_key=api_key)
        except BaseException:
            self.shutdown()
            raise

    def _wait_ready(self, timeout: float) -> None:
        import requests

        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the radixlm server exited during start-up (code {self.proc.returncode}):\n"
                                   f"{self.log_tail()}")
            try:
                if requests.get(self.url + "/health_generate", timeout=5).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"the radixlm server did not become healthy within {timeout:.0f} s:\n{self.log_tail()}")

    def log_tail(self, n: int = 4000) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()[-n:]
        except OSError:
            return ""

    # ------------------------------------------------------------------ conveniences
    def generate(self, prompt, sampling_params: Optional[Dict[str, Any]] = None, **kw) -> Any:
        body = {"text": prompt, "sampling_params": sampling_params or {}, **kw}
        return self.endpoint._generate(body)

    def get_server_info(self) -> Dict[str, Any]:
        return self.endpoint.get_server_info()

    def flush_cache(self) -> str:
        return self.endpoint.flush_cache()

    def shutdown(self) -> None:
        proc = getattr(self, "proc", None)
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            except ProcessLookupError:
                pass
        log = getattr(self, "_log", None)
        if log is not None and not log.closed:
            log.close()

    def __enter__(self) -> "Runtime":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def __repr__(self) -> str:
        return f"Runtime({self.url!r})"
