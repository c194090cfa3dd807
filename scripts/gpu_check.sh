#!/usr/bin/env bash
# The one prepared command for the GPU machine: the GPU tests of the triton attention backend and
# of CUDA graphs, then the GPU benchmark (at most 200 + 370 s). Installs nothing. Output is tee'd to $OUT/ when OUT is set.
#   bash scripts/gpu_check.sh            (from the repository root)
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
if [ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ]; then PY=.venv/bin/python; fi
LOG_DIR="${OUT:-}"
run() {  # run NAME CMD...: tee to $OUT/NAME.log when OUT is set
  local name="$1"; shift
  echo "=== $name: $*"
  if [ -n "$LOG_DIR" ]; then "$@" 2>&1 | tee "$LOG_DIR/$name.log"; return "${PIPESTATUS[0]}"
  else "$@"; fi
}
unset TRITON_INTERPRET
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'triton', triton.__version__)"
run gpu_tests timeout 200 "$PY" -m pytest -m gpu tests/test_triton_kernels.py tests/test_cuda_graph.py tests/test_fused_kernels.py -q -x \
  -p no:cacheprovider
tests_rc=$?
run gpu_bench timeout 370 "$PY" -m radixlm.bench.gpu --time-budget 320
bench_rc=$?
echo "gpu_check: tests rc=$tests_rc bench rc=$bench_rc"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
