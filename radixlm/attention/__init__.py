"""Attention backends behind one interface, chosen by name.

`create_attention_backend(name, ...)` imports lazily so that GPU-only backends never load on a
machine without them; an unknown name fails with the list of valid ones.
"""

from __future__ import annotations

from typing import Callable, Dict


def _torch_native():
    from radixlm.attention.torch_native import TorchNativeAttnBackend
    return TorchNativeAttnBackend


def _triton():
    from radixlm.attention.triton_backend import TritonAttnBackend
    return TritonAttnBackend


_REGISTRY: Dict[str, Callable[[], type]] = {"torch_native": _torch_native, "triton": _triton}


def available_backends():
    return sorted(_REGISTRY) + ["auto"]


def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend_name(name: str, device: str) -> str:
    """`auto`: Triton kernels on CUDA when Triton is installed, the torch reference elsewhere."""
    if name == "auto":
        return "triton" if str(device).startswith("cuda") and _triton_importable() else "torch_native"
    return name


def create_attention_backend(name: str, device: str, **kwargs):
    name = resolve_backend_name(name, device)
    if name not in _REGISTRY:
        raise ValueError(f"Unknown attention backend {name!r}. Valid: {', '.join(available_backends())}")
    return _REGISTRY[name]()(**kwargs)
