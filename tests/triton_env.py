"""Triton test set-up shared by the kernel test modules: import this before anything imports triton.

Without CUDA, kernels must run in Triton's interpreter, and TRITON_INTERPRET=1 only takes effect
if set before the kernels are decorated (on their first import). Skips the importing module only
when triton is not installed at all (`require_triton`); a broken triton install fails.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def require_triton() -> None:
    """Skips the calling module only when triton is genuinely not installed (it is not a declared
    dependency: CPU-only torch wheels come without it), saying so. An installed triton that fails
    to import is an error, not a skip."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed (pip install triton); its kernel tests need it",
                    allow_module_level=True)
    import triton  # noqa: F401 - installed but broken: fail loudly


require_triton()

DEVICE = "cuda" if CUDA else "cpu"
gpu = pytest.mark.skipif(not CUDA, reason="needs CUDA")
