#!/usr/bin/env bash
# The one prepared command for the GPU machine: every test marked `gpu` (Triton attention, CUDA graphs,
# fused kernels, fused MoE, FP8 block GEMM, LoRA SGMV, the allocator's no-wait path), then the GPU benchmark
# (at most 240 + 330 s). Installs nothing. Output is tee'd to $OUT/ when OUT is set.
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
run gpu_tests timeout 240 "$PY" -m pytest -m gpu tests -q -p no:cacheprovider --durations=15
tests_rc=$?
run gpu_bench timeout 330 "$PY" -m radixlm.bench.gpu --time-budget 285
bench_rc=$?
echo "gpu_check: tests rc=$tests_rc bench rc=$bench_rc"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
