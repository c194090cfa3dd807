"""Triton test set-up shared by the kernel test modules: import this before anything imports triton.

Without CUDA, kernels must run in Triton's interpreter, and TRITON_INTERPRET=1 only takes effect
if set before the kernels are decorated (on their first import). Skips the importing module when
triton is not installed.
"""

from __future__ import annotations

import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

DEVICE = "cuda" if CUDA else "cpu"
gpu = pytest.mark.skipif(not CUDA, reason="needs CUDA")
