"""A memory-streaming matmul for one or two rows on the CPU (batch-1/2 decode): y = x W^T (+ b).

Owns one small C kernel, compiled on first use with the system C compiler (`cc -O3 -march=native
-fopenmp`) into a per-machine cache and loaded with ctypes; `layers/cpu_linear.py` routes a linear
layer's call here when `x` has at most `MAX_ROWS` rows and shares the weight's dtype (float32 or
bfloat16).

Why: at batch 1 a decode step reads every weight once, so its speed is the rate at which the
matmuls stream the weights. On the 2-core bench machine (~33 GB/s copy bandwidth) oneDNN's packed
one-row matmul read the 88M model's weights at ~20 GB/s in float32 and ~18-23 GB/s in bfloat16 (so
bf16, half the bytes, was not twice as fast). This kernel gives each thread one contiguous block of
W's rows and streams each row once against every row of x: float32 with AVX-512 FMAs; bfloat16 with
AVX512-BF16 `vdpbf16ps` (32 weights per instruction, no conversion), or, on CPUs without it, bf16
widened to float32 in registers (exact); plain loops that the compiler vectorises without AVX-512.
All accumulate in float32 (docs/benchmarks.md has the figures).

The reference is `F.linear` (tests/test_cpu_gemv.py compares them over shapes with tails, 1..
KERNEL_MAX_ROWS rows, bias or none, and the variants compiled without AVX512-BF16 / AVX-512).
Results differ from it by summation order and by the final rounding to bfloat16 (round to nearest
even, as PyTorch does). The kernel runs its threads in the OpenMP runtime torch already loaded (same
`libgomp.so.1`), with `torch.get_num_threads()` threads; ctypes releases the GIL for the call.
`RADIXLM_DISABLE_CPU_GEMV=1` turns it off; without a C compiler, or if the build fails, the layers
keep oneDNN (logged once). Under torch.compile the kernel is the opaque custom op `radixlm::cpu_gemv`.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from typing import Optional, Sequence

import torch

logger = logging.getLogger(__name__)

ENV_DISABLE = "RADIXLM_DISABLE_CPU_GEMV"
KERNEL_MAX_ROWS = 4  # what the kernel accepts
# what the linear layers send it: at 4 rows oneDNN's blocked matmul was as fast (float32) or faster
# (bfloat16: 6.3 vs 7.0 ms for the 88M model's linears, 2 threads); at 1-2 rows this kernel is 1.3-1.8x faster
MAX_ROWS = 2
BUILD_TIMEOUT_S = 120.0
_DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1}

_SOURCE = r"""
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, 4); return f;
}

static inline uint16_t f32_to_bf16(float f) {  /* round to nearest even; NaN stays NaN */
    uint32_t u; memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline float dot_f32(const float *x, const float *w, long K) {
    long k = 0;
#ifdef __AVX512F__
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
    for (; k + 64 <= K; k += 64) {
        a0 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k), _mm512_loadu_ps(w + k), a0);
        a1 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k + 16), _mm512_loadu_ps(w + k + 16), a1);
        a2 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k + 32), _mm512_loadu_ps(w + k + 32), a2);
        a3 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k + 48), _mm512_loadu_ps(w + k + 48), a3);
    }
    for (; k + 16 <= K; k += 16)
        a0 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k), _mm512_loadu_ps(w + k), a0);
    if (k < K) {
        __mmask16 m = (__mmask16)((1u << (K - k)) - 1u);
        a1 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, x + k), _mm512_maskz_loadu_ps(m, w + k), a1);
        k = K;
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
#else
    float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
    for (; k + 4 <= K; k += 4) {
        s0 += x[k] * w[k]; s1 += x[k + 1] * w[k + 1]; s2 += x[k + 2] * w[k + 2]; s3 += x[k + 3] * w[k + 3];
    }
    for (; k < K; k++) s0 += x[k] * w[k];
    return (s0 + s1) + (s2 + s3);
#endif
}

#ifdef __AVX512F__
static inline __m512 load_bf16(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}
static inline __m512 load_bf16_masked(const uint16_t *p, __mmask16 m) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}
#endif

static inline float dot_bf16(const float *x, const uint16_t *w, long K) {
    long k = 0;
#ifdef __AVX512F__
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
    for (; k + 64 <= K; k += 64) {
        a0 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k), load_bf16(w + k), a0);
        a1 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k + 16), load_bf16(w + k + 16), a1);
        a2 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k + 32), load_bf16(w + k + 32), a2);
        a3 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k + 48), load_bf16(w + k + 48), a3);
    }
    for (; k + 16 <= K; k += 16)
        a0 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k), load_bf16(w + k), a0);
    if (k < K) {
        __mmask16 m = (__mmask16)((1u << (K - k)) - 1u);
        a1 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, x + k), load_bf16_masked(w + k, m), a1);
        k = K;
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
#else
    float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
    for (; k + 4 <= K; k += 4) {
        s0 += x[k] * bf16_to_f32(w[k]); s1 += x[k + 1] * bf16_to_f32(w[k + 1]);
        s2 += x[k + 2] * bf16_to_f32(w[k + 2]); s3 += x[k + 3] * bf16_to_f32(w[k + 3]);
    }
    for (; k < K; k++) s0 += x[k] * bf16_to_f32(w[k]);
    return (s0 + s1) + (s2 + s3);
#endif
}

#if defined(__AVX512BF16__)
/* bfloat16 x and W: one vdpbf16ps per 32 weights (no conversion), W's row read once for all rows of x. */
static void row_bf16_dp(const uint16_t *x, const uint16_t *w, long M, long K, float *acc_out) {
    __m512 a[4][2];
    for (long m = 0; m < M; m++) { a[m][0] = _mm512_setzero_ps(); a[m][1] = _mm512_setzero_ps(); }
    long k = 0;
    for (; k + 64 <= K; k += 64) {
        __m512bh w0 = (__m512bh)_mm512_loadu_si512(w + k), w1 = (__m512bh)_mm512_loadu_si512(w + k + 32);
        for (long m = 0; m < M; m++) {
            a[m][0] = _mm512_dpbf16_ps(a[m][0], (__m512bh)_mm512_loadu_si512(x + m * K + k), w0);
            a[m][1] = _mm512_dpbf16_ps(a[m][1], (__m512bh)_mm512_loadu_si512(x + m * K + k + 32), w1);
        }
    }
    for (; k < K; k += 32) {
        long left = K - k;
        __mmask32 mk = left >= 32 ? (__mmask32)0xffffffffu : (__mmask32)((1u << left) - 1u);
        __m512bh w0 = (__m512bh)_mm512_maskz_loadu_epi16(mk, w + k);
        for (long m = 0; m < M; m++)
            a[m][0] = _mm512_dpbf16_ps(a[m][0], (__m512bh)_mm512_maskz_loadu_epi16(mk, x + m * K + k), w0);
    }
    for (long m = 0; m < M; m++) acc_out[m] = _mm512_reduce_add_ps(_mm512_add_ps(a[m][0], a[m][1]));
}
#endif

/* y[m, n] = sum_k x[m, k] * W[n, k] (+ b[n]) for m < M <= 4, n < N; all row-major and contiguous.
   dtype 0: float32 everywhere; 1: bfloat16 everywhere (float32 accumulation, one rounding).
   Returns 0, -1 when the bfloat16 scratch cannot be allocated, -2 for M > 4. */
int radixlm_gemv(const void *x, const void *w, const void *b, void *y,
                 long M, long N, long K, int dtype, int nthreads) {
    if (M > 4) return -2;
    float *xf = NULL;
    const float *xs = (const float *)x;
#if !defined(__AVX512BF16__)
    if (dtype == 1) {
        xf = (float *)malloc(sizeof(float) * (size_t)(M * K));
        if (!xf) return -1;
        const uint16_t *xh = (const uint16_t *)x;
        for (long i = 0; i < M * K; i++) xf[i] = bf16_to_f32(xh[i]);
        xs = xf;
    }
#endif
    if (nthreads < 1) nthreads = 1;
    #pragma omp parallel for num_threads(nthreads) schedule(static) if (nthreads > 1 && N >= 64)
    for (long n = 0; n < N; n++) {
        float acc[4];
        if (dtype == 1) {
#if defined(__AVX512BF16__)
            row_bf16_dp((const uint16_t *)x, (const uint16_t *)w + n * K, M, K, acc);
#else
            for (long m = 0; m < M; m++) acc[m] = dot_bf16(xs + m * K, (const uint16_t *)w + n * K, K);
#endif
            for (long m = 0; m < M; m++) {
                if (b) acc[m] += bf16_to_f32(((const uint16_t *)b)[n]);
                ((uint16_t *)y)[m * N + n] = f32_to_bf16(acc[m]);
            }
        } else {
            for (long m = 0; m < M; m++) {
                acc[m] = dot_f32(xs + m * K, (const float *)w + n * K, K);
                if (b) acc[m] += ((const float *)b)[n];
                ((float *)y)[m * N + n] = acc[m];
            }
        }
    }
    free(xf);
    return 0;
}
"""

_FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]
_lib = None
_load_failed = False
_off = False  # set only inside `turned_off()` (bench_one_batch's interleaved reference steps)
_load_lock = threading.Lock()


def _cpu_signature() -> str:
    """What -march=native depends on: the CPU's model and feature flags."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("flags", "model name", "vendor_id"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor() or platform.machine()


def _cache_dir() -> str:
    base = os.environ.get("RADIXLM_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "radixlm")
    return os.path.join(base, "cpu_gemv")


def _build(path: str, flags: Sequence[str]) -> None:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("no C compiler (cc/gcc) on PATH")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with tempfile.TemporaryDirectory(dir=os.path.dirname(path)) as tmp:
        src, out = os.path.join(tmp, "gemv.c"), os.path.join(tmp, "gemv.so")
        with open(src, "w") as f:
            f.write(_SOURCE)
        proc = subprocess.run([cc, *flags, src, "-o", out], capture_output=True, text=True,
                              timeout=BUILD_TIMEOUT_S)
        if proc.returncode != 0:
            raise RuntimeError(f"{cc} failed: {proc.stderr.strip()[-400:]}")
        os.replace(out, path)  # atomic: concurrent builders (TP ranks) each publish a whole file


def open_kernel(extra_flags: Sequence[str] = ()) -> ctypes.CDLL:
    """Builds (once per source, flags and CPU) and opens the kernel. `extra_flags` compile a variant,
    e.g. `-mno-avx512bf16` or `-mno-avx512f`: the paths other CPUs take, which the tests run here too."""
    flags = [*_FLAGS, *extra_flags]
    key = hashlib.sha256("\0".join([_SOURCE, " ".join(flags), _cpu_signature()]).encode()).hexdigest()[:16]
    path = os.path.join(_cache_dir(), f"gemv-{key}.so")
    if not os.path.exists(path):
        _build(path, flags)
    lib = ctypes.CDLL(path)
    lib.radixlm_gemv.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_long] * 3 + [ctypes.c_int] * 2
    lib.radixlm_gemv.restype = ctypes.c_int
    return lib


def load() -> Optional[ctypes.CDLL]:
    """The kernel for this process (built on first use, then cached per machine), or None when
    disabled or unavailable. Call it at model load: a first build takes ~1 s and must not stall a
    serving step."""
    global _lib, _load_failed
    if _lib is not None or _load_failed:
        return _lib
    if os.environ.get(ENV_DISABLE, "0") not in ("", "0"):
        return None
    with _load_lock:
        if _lib is not None or _load_failed:
            return _lib
        try:
            _lib = open_kernel()
        except (OSError, RuntimeError, subprocess.SubprocessError) as e:
            _load_failed = True
            logger.warning("CPU gemv kernel unavailable, linear layers keep oneDNN: %s", e)
    return _lib


def ready() -> bool:
    """Whether `load()` has succeeded in this process."""
    return _lib is not None and not _off


@contextlib.contextmanager
def turned_off():
    """Eager steps inside run on oneDNN as if the kernel were unavailable (a compiled graph keeps
    what it traced)."""
    global _off
    before, _off = _off, True
    try:
        yield
    finally:
        _off = before


def supports(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> bool:
    """Whether `gemv(x, weight, bias)` applies: few rows, one dtype, CPU, contiguous weight."""
    return (x.dim() == 2 and 0 < x.shape[0] <= KERNEL_MAX_ROWS and x.device.type == "cpu"
            and x.dtype in _DTYPE_CODE and weight.dtype == x.dtype and weight.dim() == 2
            and weight.shape[1] == x.shape[1] and weight.device.type == "cpu" and weight.is_contiguous()
            and (bias is None or (bias.dtype == x.dtype and bias.is_contiguous())))


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
         lib: Optional[ctypes.CDLL] = None) -> torch.Tensor:
    """F.linear(x, weight, bias) for x [M <= KERNEL_MAX_ROWS, K] on the compiled kernel (`lib`, or the
    one `load()` opened); `supports(...)` must hold."""
    x = x.contiguous()
    m, k = x.shape
    n = weight.shape[0]
    y = torch.empty((m, n), dtype=x.dtype)
    rc = (lib or _lib).radixlm_gemv(x.data_ptr(), weight.data_ptr(), 0 if bias is None else bias.data_ptr(),
                           y.data_ptr(), m, n, k, _DTYPE_CODE[x.dtype], torch.get_num_threads())
    if rc != 0:
        raise RuntimeError(f"cpu_gemv: kernel returned {rc} (-1: no memory for the bfloat16 scratch, -2: rows > 4)")
    return y


@torch.library.custom_op("radixlm::cpu_gemv", mutates_args=())
def cpu_gemv_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """`gemv` as an opaque op for torch.compile (engine/cpu_compile_runner.py)."""
    return gemv(x, weight, bias)


@cpu_gemv_op.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    return x.new_empty((x.shape[0], weight.shape[0]))
