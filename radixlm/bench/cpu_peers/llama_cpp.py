"""llama.cpp as a benchmark peer: where `scripts/build_llama_server.sh` put the binary and the converter, GGUF
files converted once from an HF checkpoint (cached beside it), and `llama-server` launched on loopback.

Binary: $LLAMA_SERVER_BIN, else .peers/llama.cpp/build-*/bin/llama-server under the repository root (the newest).
Converter: $LLAMA_CPP_CONVERTER, else .peers/llama.cpp/src/*/vendor/llama.cpp/convert_hf_to_gguf.py.
"""

from __future__ import annotations

import glob
import os
import pathlib
import subprocess
import sys
from typing import List, Optional

import httpx

from radixlm.bench.launcher import LaunchedProcess, free_port

REPO_ROOT = pathlib.Path(__file__).resolve().parents[3]
PEERS_DIR = REPO_ROOT / ".peers" / "llama.cpp"
BUILD_HINT = "bash scripts/build_llama_server.sh (or: make peers-llama)"


def _newest(pattern: str) -> Optional[str]:
    hits = [p for p in glob.glob(pattern) if os.access(p, os.X_OK) or p.endswith(".py")]
    return max(hits, key=os.path.getmtime) if hits else None


def find_llama_server() -> Optional[str]:
    env = os.environ.get("LLAMA_SERVER_BIN")
    if env:
        return env if os.access(env, os.X_OK) else None
    return _newest(str(PEERS_DIR / "build-*" / "bin" / "llama-server"))


def find_converter() -> Optional[str]:
    env = os.environ.get("LLAMA_CPP_CONVERTER")
    if env:
        return env if os.path.isfile(env) else None
    return _newest(str(PEERS_DIR / "src" / "*" / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py"))


def gguf_path(model_dir: str, outtype: str) -> pathlib.Path:
    return pathlib.Path(model_dir) / f"model-{outtype}.gguf"


def ensure_gguf(model_dir: str, outtype: str, converter: Optional[str] = None, timeout: float = 600.0) -> str:
    """The checkpoint as GGUF `outtype` (f32/f16/bf16), converted once (a subprocess running the vendored
    converter through radixlm.bench.cpu_peers.convert_gguf) and reused while newer than the weights."""
    out = gguf_path(model_dir, outtype)
    weights = pathlib.Path(model_dir) / "model.safetensors"
    if out.is_file() and (not weights.exists() or out.stat().st_mtime >= weights.stat().st_mtime):
        return str(out)
    converter = converter or find_converter()
    if converter is None:
        raise FileNotFoundError(f"convert_hf_to_gguf.py not found: run {BUILD_HINT}")
    tmp = out.with_suffix(".gguf.part")
    cmd = [sys.executable, "-m", "radixlm.bench.cpu_peers.convert_gguf", str(model_dir), "--converter", converter,
           "--outtype", outtype, "--outfile", str(tmp)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if p.returncode != 0 or not tmp.is_file():
        raise RuntimeError(f"GGUF conversion failed ({' '.join(cmd)}):\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}")
    os.replace(tmp, out)
    return str(out)


class LlamaServerProcess(LaunchedProcess):
    """`llama-server -m GGUF` on a free loopback port with `threads` threads (generation and batch), ready when
    /health answers 200 (the model is loaded). `extra` are further llama-server flags (slots, cache reuse...)."""

    name = "llama-server"
    stop_timeout = 10.0

    def __init__(self, gguf: str, threads: int = 2, ctx_size: int = 8192, extra: Optional[List[str]] = None,
                 binary: Optional[str] = None, timeout: float = 120.0):
        binary = binary or find_llama_server()
        if binary is None:
            raise FileNotFoundError(f"llama-server not built: run {BUILD_HINT}")
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        super().__init__([binary, "-m", gguf, "--host", "127.0.0.1", "--port", str(self.port), "-t", str(threads),
                          "-tb", str(threads), "-c", str(ctx_size), "--no-webui", *(extra or [])], timeout)

    def ready(self) -> bool:
        return httpx.get(self.base_url + "/health", timeout=5).status_code == 200
