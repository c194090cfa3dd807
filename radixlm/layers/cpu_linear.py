"""Prepacked oneDNN matmuls for linear layers on the CPU.

Owns the CPU fast path of every `x @ W^T (+ b)` in the model (q/k/v, o, gate/up, down, LM head):
`prepack_model(model)` reorders each weight once, after loading, into oneDNN's blocked layout
(`torch.ops.mkldnn._reorder_linear_weight`); the layers then call `packed_linear`, which runs
oneDNN on the packed weight instead of re-laying it out in every call. On the 2-core bench
machine a decode-sized matmul (64 x 768 -> 6144, float32) took 3.1 ms instead of 5.5 ms with
`F.linear`, a prefill-sized one (8192 rows) 419 instead of 467 ms. Calls of at most
`cpu_gemv.MAX_ROWS` rows (batch-1/2 decode) go instead to the row-streaming kernel of
layers/cpu_gemv.py on the plain weight, which `prepack_model` builds and loads. Same float32 arithmetic, other
summation order (differences ~1e-6). The reference is `F.linear` on the unpacked weight, which
stays in place (loading, tied embeddings and tests use it); `RADIXLM_DISABLE_CPU_PREPACK=1`
turns the fast path off. A no-op off the CPU, without oneDNN, or for dtypes other than
float32/bfloat16. Packed copies double the weights' host memory. Quantized layers (FP8, with a
`quant_method`) are skipped: their weights stay in their own format (layers/quantization/fp8.py),
unless they keep a dequantized copy (`fp8_dequant_cache`, RADIXLM_FP8_CPU_DEQUANT_CACHE=1): that
copy is what gets packed.
"""

from __future__ import annotations

import itertools
import logging
import os
import weakref
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from radixlm.layers import cpu_gemv

logger = logging.getLogger(__name__)

ENV_DISABLE = "RADIXLM_DISABLE_CPU_PREPACK"
_DTYPES = (torch.float32, torch.bfloat16)


def prepack_available() -> bool:
    ops = getattr(torch.ops, "mkldnn", None)
    return (os.environ.get(ENV_DISABLE, "0") in ("", "0") and torch.backends.mkldnn.is_available()
            and hasattr(ops, "_reorder_linear_weight") and hasattr(ops, "_linear_pointwise"))


def prepack_weight(weight: torch.Tensor) -> Optional[torch.Tensor]:
    """The weight in oneDNN's layout, or None when this weight cannot take the fast path."""
    if weight.device.type != "cpu" or weight.dtype not in _DTYPES or weight.dim() != 2:
        return None
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous())


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """F.linear(x, W, bias) computed on `packed` = prepack_weight(W); x: [..., in]."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    y = torch.ops.mkldnn._linear_pointwise(x2, packed, bias, "none", [], "")
    return y.reshape(*lead, y.shape[-1])


# Under torch.compile (engine/cpu_compile_runner.py) an opaque oneDNN tensor cannot be traced: the graph
# either traces the plain weight (inductor's freezing prepacks it: for float32 into MKL's packed gemm,
# the fastest for one row, 23.6 vs 29.7 ms for the 88M bench model's linears on one core), or, for
# float32 with several rows, where MKL's packed gemm is 1.5-2x slower than oneDNN's (4 rows: 45 vs 23 ms,
# 32 rows: 99 vs 65 ms), calls the custom op `radixlm::cpu_packed_linear` on this module's oneDNN weight,
# found by the key `register_packed` gave it (weakly held: a dropped model frees its weights).
_PACKED: "weakref.WeakValueDictionary[int, torch.Tensor]" = weakref.WeakValueDictionary()
_next_key = itertools.count()
COMPILED_PACKED_MIN_ROWS = 2  # float32 rows from which the compiled step calls oneDNN on the packed weight


def register_packed(packed: torch.Tensor) -> int:
    key = next(_next_key)
    _PACKED[key] = packed
    return key


@torch.library.custom_op("radixlm::cpu_packed_linear", mutates_args=())
def cpu_packed_linear(x: torch.Tensor, key: int, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """packed_linear on the weight registered under `key` (an opaque op for torch.compile)."""
    return packed_linear(x, _PACKED[key], bias)


@cpu_packed_linear.register_fake
def _(x: torch.Tensor, key: int, bias: Optional[torch.Tensor]) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], _PACKED[key].shape[0]))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
           packed: Optional[torch.Tensor], key: Optional[int] = None) -> torch.Tensor:
    """The layers' matmul: the packed fast path when prepared and `x` matches it, else F.linear.
    `key`: the packed weight's `register_packed` key (the compiled step's float32 path).
    A few rows (batch-1/2 decode) go to the row-streaming kernel of layers/cpu_gemv.py when
    `prepack_model` loaded it."""
    if (packed is not None and x.dim() == 2 and x.shape[0] <= cpu_gemv.MAX_ROWS and cpu_gemv.ready()
            and cpu_gemv.supports(x, weight, bias)):
        if torch.compiler.is_compiling():
            return cpu_gemv.cpu_gemv_op(x, weight, bias)
        return cpu_gemv.gemv(x, weight, bias)
    if torch.compiler.is_compiling():
        if (key is not None and packed is not None and x.dtype == torch.float32 == packed.dtype
                and x.device.type == "cpu" and x.dim() == 2 and x.shape[0] >= COMPILED_PACKED_MIN_ROWS):
            return cpu_packed_linear(x, key, bias)
        return F.linear(x, weight, bias)
    if packed is not None and x.device.type == "cpu" and x.dtype == packed.dtype:
        return packed_linear(x, packed, bias)
    return F.linear(x, weight, bias)


def prepack_model(model: nn.Module) -> int:
    """Prepacks every layer that declares `cpu_packed_weight` (see layers/linear.py and
    vocab_embedding.py); returns how many. Call once the weights are loaded."""
    if not prepack_available():
        return 0
    if any(p.device.type == "cpu" for p in model.parameters()):
        cpu_gemv.load()  # built here, at load time, never inside a serving step
    n = 0
    for module in model.modules():
        if hasattr(module, "cpu_packed_weight"):
            if getattr(module, "quant_method", None) is not None:
                cache = getattr(module, "fp8_dequant_cache", None)  # never a silent copy of an FP8 weight
                module.cpu_packed_weight = None if cache is None else prepack_weight(cache)
            else:
                module.cpu_packed_weight = prepack_weight(module.weight)
            n += module.cpu_packed_weight is not None
            module.cpu_packed_key = (None if module.cpu_packed_weight is None
                                     else register_packed(module.cpu_packed_weight))
    if n:
        logger.info("prepacked %d linear weights for oneDNN (CPU)", n)
    return n
