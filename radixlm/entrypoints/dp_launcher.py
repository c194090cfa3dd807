"""`--dp-size N`: N radixlm replicas behind the real sglang-router, on the user's host and port.

Like SGLang's `python -m sglang_router.launch_server`: one command starts N replicas (each a plain
`python -m radixlm.launch_server` with the same flags, `--dp-size 1`, on a free 127.0.0.1 port),
waits until every replica answers `GET /health` (with a deadline), then starts
`python -m sglang_router.launch_router --worker-urls ... --policy <--router-policy> --host --port`
plus the `--router-args` string, and waits for the router's `/readiness`.

Process ownership: every child runs in its own process group (so a replica's scheduler and
detokenizer are signalled with it) and gets SIGTERM from the kernel if this process dies
(PR_SET_PDEATHSIG). Ctrl-C / SIGTERM stop all of them (SIGTERM, then SIGKILL after a grace period).
A replica that exits is reported; the router's health checks take it out of rotation and the rest
keep serving. When the router exits or no replica is left, everything stops and the exit status is 1.

Owns only processes; reads ServerArgs, imports nothing of the runtime (the replicas do).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import List, Optional, Sequence

from radixlm.server_args import ServerArgs, cli_fields

logger = logging.getLogger("radixlm.dp")

ROUTER_MODULE = "sglang_router.launch_router"
INSTALL_HINT = "pip install sglang-router"
REPLICA_STARTUP_TIMEOUT_S = 600.0  # model loading; the router's own default is far longer
ROUTER_STARTUP_TIMEOUT_S = 120.0
STOP_GRACE_S = 15.0
POLL_S = 0.5
ROUTER_LOG_LEVELS = {"debug": "debug", "info": "info", "warning": "warn", "error": "error", "critical": "error"}
# ServerArgs fields the launcher decides per replica (never copied from the user's command line)
_PER_REPLICA = {"dp_size", "port", "host", "router_policy", "router_args"}


class LaunchError(RuntimeError):
    pass


def router_available() -> bool:
    return importlib.util.find_spec("sglang_router") is not None


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def check_port_free(host: str, port: int) -> None:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise LaunchError(f"cannot serve on {host}:{port}: {e.strerror or e}") from None


def to_argv(args: ServerArgs, skip: Sequence[str] = ()) -> List[str]:
    """The launch_server flags that reproduce `args` (fields at their default are left out)."""
    out: List[str] = []
    for name, f in cli_fields().items():
        v = getattr(args, name)
        if name in skip or v == f.default:
            continue
        flag = "--" + name.replace("_", "-")
        if isinstance(v, bool) and f.default is None:  # a device-dependent default set either way
            out += [flag, "true" if v else "false"]
        elif isinstance(v, bool):
            out += [flag] if v else []
        elif v is None:
            raise LaunchError(f"{name}: cannot pass None to a replica")
        elif isinstance(v, tuple):  # nargs="+" flags (--lora-paths)
            out += [flag, *map(str, v)]
        else:
            out += [flag, str(v)]
    return out


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - not Linux: stop() and the signal handlers still apply
        pass


def _spawn(cmd: List[str]) -> subprocess.Popen:
    return subprocess.Popen(cmd, start_new_session=True, preexec_fn=_die_with_parent,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def _http_ok(url: str, timeout: float = 5.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


@dataclasses.dataclass
class Child:
    name: str
    proc: subprocess.Popen
    url: str
    reported: bool = False

    def alive(self) -> bool:
        return self.proc.poll() is None


class DPLauncher:
    """Starts, watches and stops the replicas and the router (see the module docstring)."""

    def __init__(self, args: ServerArgs):
        self.args = args
        self.replicas: List[Child] = []
        self.router: Optional[Child] = None
        self._stopping = False

    # -------------------------------------------------------------- start
    def replica_cmd(self, port: int) -> List[str]:
        return [sys.executable, "-m", "radixlm.launch_server", *to_argv(self.args, skip=_PER_REPLICA),
                "--host", "127.0.0.1", "--port", str(port)]

    def router_cmd(self) -> List[str]:
        a = self.args
        extra = shlex.split(a.router_args or "")
        cmd = [sys.executable, "-m", ROUTER_MODULE, "--host", a.host, "--port", str(a.port),
               "--worker-urls", *[r.url for r in self.replicas], "--policy", a.router_policy,
               "--log-level", ROUTER_LOG_LEVELS[a.log_level]]
        if not any(x.startswith("--prometheus-port") for x in extra):  # its default 29000 clashes between routers
            cmd += ["--prometheus-host", "127.0.0.1", "--prometheus-port", str(free_port())]
        if a.api_key is not None and not any(x.startswith("--api-key") for x in extra):
            cmd += ["--api-key", a.api_key]
        return cmd + extra

    def start(self) -> None:
        a = self.args
        check_port_free(a.host, a.port)
        for i in range(a.dp_size):
            port = free_port()
            self.replicas.append(Child(f"replica {i}", _spawn(self.replica_cmd(port)), f"http://127.0.0.1:{port}"))
            logger.info("dp: replica %d starting on 127.0.0.1:%d", i, port)
        self._wait_healthy(self.replicas, "/health", REPLICA_STARTUP_TIMEOUT_S)
        self.router = Child("router", _spawn(self.router_cmd()), f"http://{_connect_host(a.host)}:{a.port}")
        self._wait_healthy([self.router], "/readiness", ROUTER_STARTUP_TIMEOUT_S)
        logger.info("The server is fired up and ready to roll! http://%s:%d (sglang-router %s in front of %d "
                    "radixlm replicas: %s)", a.host, a.port, a.router_policy, len(self.replicas),
                    " ".join(r.url for r in self.replicas))

    def _wait_healthy(self, children: List[Child], path: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        pending = list(children)
        while pending:
            for c in list(pending):
                if not c.alive():
                    raise LaunchError(f"{c.name} ({c.url}) exited with code {c.proc.returncode} while starting")
                if _http_ok(c.url + path, timeout=2.0):
                    pending.remove(c)
            if self._stopping:
                raise LaunchError("stopped while starting")
            if pending and time.monotonic() > deadline:
                raise LaunchError(f"{', '.join(c.name for c in pending)} not healthy ({path}) within {timeout:g} s")
            if pending:
                time.sleep(POLL_S)

    # -------------------------------------------------------------- run
    def watch(self) -> int:
        """Until a signal, the router's exit, or the last replica's exit; returns the exit status."""
        while not self._stopping:
            for r in self.replicas:
                if not r.alive() and not r.reported:
                    r.reported = True
                    left = sum(x.alive() for x in self.replicas)
                    logger.error("dp: %s (%s) exited with code %s; %d of %d replicas left", r.name, r.url,
                                 r.proc.returncode, left, len(self.replicas))
            if self.router is not None and not self.router.alive():
                logger.error("dp: the router exited with code %s; stopping the replicas", self.router.proc.returncode)
                return 1
            if not any(r.alive() for r in self.replicas):
                logger.error("dp: no replica left; stopping the router")
                return 1
            time.sleep(POLL_S)
        return 0

    def request_stop(self, *_sig) -> None:
        self._stopping = True

    def stop(self) -> None:
        """SIGTERM to every child's process group (router first: no new requests), then SIGKILL."""
        children = ([self.router] if self.router else []) + self.replicas
        for c in children:
            _signal_group(c.proc, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        for c in children:
            try:
                c.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                logger.warning("dp: %s did not stop in %g s; killing it", c.name, STOP_GRACE_S)
            _signal_group(c.proc, signal.SIGKILL)  # also stragglers of an exited leader
            c.proc.wait()


def _connect_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "", "::") else host


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)  # the child leads its own group (start_new_session)
    except (ProcessLookupError, PermissionError):
        pass


def launch_dp(args: ServerArgs) -> int:
    """Runs the replicas and the router until Ctrl-C / SIGTERM; returns the process exit status."""
    logging.basicConfig(level=args.log_level.upper(), format="[%(asctime)s] %(message)s")
    if not router_available():
        print(f"radixlm: --dp-size {args.dp_size} runs {args.dp_size} replicas behind sglang-router, which is not "
              f"installed. Install it with: {INSTALL_HINT}", file=sys.stderr)
        return 2
    launcher = DPLauncher(args)
    old = {s: signal.signal(s, launcher.request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        launcher.start()
        return launcher.watch()
    except LaunchError as e:
        print(f"radixlm: {e}", file=sys.stderr)
        return 1
    finally:
        launcher.stop()
        for s, h in old.items():
            signal.signal(s, h)
