"""Triton kernels for the `triton` attention backend, over radixlm's paged KV pool.

    kv_store.store_kv             writes the step's new K/V rows at `out_cache_loc`
    extend_attention.extend_attention_fwd
                                  ragged prefill/extend: cached prefix (gathered through
                                  req_to_token) + the new tokens causally, online softmax
    decode_attention.decode_attention_fwd
                                  flash-decoding: split-KV partials per (request, kv head, split)
                                  with a GQA group's q heads together, then a reduction

`reference` holds a plain-PyTorch reference for every kernel (the tests compare against them and
against the torch_native backend). `python -m radixlm.attention.triton_kernels.compile_check`
compiles every configuration for sm_90 on a machine without a GPU (shared memory, MMA use).

Importing this package imports triton and decorates the kernels, so on a machine without a GPU
TRITON_INTERPRET=1 must be set *before* the first import (the backend does this for CPU tensors).
"""

from radixlm.attention.triton_kernels.common import INTERPRETED
from radixlm.attention.triton_kernels.decode_attention import decode_attention_fwd
from radixlm.attention.triton_kernels.extend_attention import extend_attention_fwd
from radixlm.attention.triton_kernels.kv_store import store_kv

__all__ = ["INTERPRETED", "store_kv", "extend_attention_fwd", "decode_attention_fwd"]
