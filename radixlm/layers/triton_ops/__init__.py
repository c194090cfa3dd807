"""Fused Triton kernels for the layers, and the switch that decides when the layers use them.

    kernels.rmsnorm(x, weight, eps)                       RMSNorm       (layers/layernorm.py)
    kernels.fused_add_rmsnorm(x, residual, weight, eps)   residual add + RMSNorm, one pass
    kernels.silu_and_mul(x)                               SiluAndMul    (layers/activation.py)
    kernels.rotary_embedding(positions, q, k, cos, sin)   NeoX rotary   (layers/rotary_embedding.py)

The torch code of each layer (its `forward_native`) is the reference: the kernels reproduce its
float32 math and its casts, and `tests/test_fused_kernels.py` compares them (CPU: Triton's
interpreter, TRITON_INTERPRET=1, small shapes; GPU: `-m gpu`, real shapes).

When the layers use them: `use_fused(x)` is true only for a CUDA tensor of float16/bfloat16/float32,
with triton importable, fused kernels enabled, and the layer built with `fused=True` (the default).
CPU tensors always take the torch reference, so CPU outputs never change.
Switch for A/B runs on CUDA: set RADIXLM_DISABLE_FUSED_KERNELS=1 in the environment (read once,
when this module is imported) or call `set_fused_kernels_enabled(False)` at run time (the layers
check it on every call; a CUDA graph keeps whatever path it was captured with).

This module imports no triton: `ops()` imports `radixlm.layers.triton_ops.kernels` (which
decorates the kernels) on first use, so the package stays importable without triton.
"""

from __future__ import annotations

import importlib.util
import os
from types import ModuleType
from typing import Optional

import torch

ENV_DISABLE = "RADIXLM_DISABLE_FUSED_KERNELS"
FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _env_disabled() -> bool:
    return os.environ.get(ENV_DISABLE, "0").strip().lower() not in ("", "0", "false", "no", "off")


_enabled: bool = not _env_disabled()
_triton_available: Optional[bool] = None
_kernels: Optional[ModuleType] = None


def fused_kernels_enabled() -> bool:
    return _enabled


def set_fused_kernels_enabled(enabled: bool) -> bool:
    """Turns the fused path on or off for every layer (CUDA only); returns the previous setting."""
    global _enabled
    prev, _enabled = _enabled, bool(enabled)
    return prev


def triton_available() -> bool:
    global _triton_available
    if _triton_available is None:
        try:
            _triton_available = importlib.util.find_spec("triton") is not None
        except (ImportError, ValueError):  # a broken or blocked install counts as absent
            _triton_available = False
    return _triton_available


def use_fused(x: torch.Tensor) -> bool:
    """Whether a layer given `x` should run its Triton kernel instead of its torch reference."""
    return _enabled and x.is_cuda and x.dtype in FUSED_DTYPES and triton_available()


def ops() -> ModuleType:
    """The kernels module (imports triton and decorates the kernels on first call)."""
    global _kernels
    if _kernels is None:
        import radixlm.layers.triton_ops.kernels as k
        _kernels = k
    return _kernels
