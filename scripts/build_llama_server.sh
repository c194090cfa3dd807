#!/usr/bin/env bash
# Build llama.cpp's `llama-server` (CPU only, native arch) from the llama-cpp-python source package, the peer that
# `python -m radixlm.bench.cpu_peers` measures radixlm against.
#
#   bash scripts/build_llama_server.sh          # or: make peers-llama
#
# Idempotent and cached under .peers/llama.cpp/ (gitignored): the sdist is fetched once with `pip download` (the only
# network access), unpacked once, and cmake/ninja rebuild only what changed. Only the llama-server target is built,
# with -j2 by default (JOBS=N to change). The last line printed is the binary's path.
# Environment: LLAMA_CPP_PYTHON_VERSION (default 0.3.36), PEERS_DIR (default .peers/llama.cpp), PY (a python with
# pip; default the project's .venv, then python3), JOBS (default 2).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
PEERS_DIR="${PEERS_DIR:-$ROOT/.peers/llama.cpp}"
JOBS="${JOBS:-2}"
if [[ -z "${PY:-}" ]]; then
    if [[ -x "$ROOT/.venv/bin/python" ]]; then PY="$ROOT/.venv/bin/python"; else PY="python3"; fi
fi

SDIST_DIR="$PEERS_DIR/sdist"
SRC_PARENT="$PEERS_DIR/src"
SRC="$SRC_PARENT/llama_cpp_python-$VERSION"
LLAMA_SRC="$SRC/vendor/llama.cpp"
BUILD="$PEERS_DIR/build-$VERSION"
BIN="$BUILD/bin/llama-server"

for tool in cmake ninja; do
    command -v "$tool" >/dev/null || { echo "build_llama_server: '$tool' is not installed" >&2; exit 1; }
done
mkdir -p "$SDIST_DIR" "$SRC_PARENT"

TARBALL="$SDIST_DIR/llama_cpp_python-$VERSION.tar.gz"
if [[ ! -f "$TARBALL" ]]; then
    echo "build_llama_server: downloading the llama-cpp-python==$VERSION sdist"
    "$PY" -m pip download --quiet --no-deps --no-binary :all: --no-build-isolation \
        "llama-cpp-python==$VERSION" -d "$SDIST_DIR" 2>/dev/null \
    || "$PY" -m pip download --quiet --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$SDIST_DIR"
fi
if [[ ! -f "$LLAMA_SRC/CMakeLists.txt" ]]; then
    echo "build_llama_server: unpacking $TARBALL"
    tar -xzf "$TARBALL" -C "$SRC_PARENT"
fi

if [[ ! -f "$BUILD/build.ninja" ]]; then
    # No network at build time: no prebuilt web UI download, no curl/openssl (the server is reached over plain HTTP
    # on 127.0.0.1); no tests/examples; static so the binary runs from the build tree alone.
    cmake -S "$LLAMA_SRC" -B "$BUILD" -G Ninja \
        -DCMAKE_BUILD_TYPE=Release \
        -DBUILD_SHARED_LIBS=OFF \
        -DGGML_NATIVE=ON \
        -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_VULKAN=OFF -DGGML_OPENMP=ON \
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON \
        -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
        -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF -DLLAMA_LLGUIDANCE=OFF
fi
start=$(date +%s)
cmake --build "$BUILD" --target llama-server -j "$JOBS"
echo "build_llama_server: built in $(( $(date +%s) - start )) s"
[[ -x "$BIN" ]] || { echo "build_llama_server: $BIN was not produced" >&2; exit 1; }
# Where the converter lives (convert_hf_to_gguf.py + its gguf-py), for radixlm.bench.cpu_peers.
echo "build_llama_server: converter $LLAMA_SRC/convert_hf_to_gguf.py"
echo "$BIN"
