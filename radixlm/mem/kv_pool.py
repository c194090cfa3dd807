"""KV memory: the token-to-KV pool (per-layer K and V buffers) and the request-to-token table.

Owns the big tensors. `MHATokenToKVPool` maps a slot index to K/V vectors for every layer;
`ReqToTokenPool` maps (request row, position) to a slot index. Which slots are free is the
allocator's business (`allocator.py`), and which are shared is the radix cache's.
"""

from __future__ import annotations

from typing import List, Optional

import torch


class MHATokenToKVPool:
    def __init__(self, num_slots: int, num_layers: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: str | torch.device):
        self.num_slots = num_slots
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        shape = (num_slots, num_kv_heads, head_dim)
        self.k_buffer = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v_buffer = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]

    @staticmethod
    def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    def set_kv_buffer(self, layer_id: int, loc: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k_buffer[layer_id][loc] = k.to(self.dtype)
        self.v_buffer[layer_id][loc] = v.to(self.dtype)

    def get_kv_buffer(self, layer_id: int):
        return self.k_buffer[layer_id], self.v_buffer[layer_id]


class ReqToTokenPool:
    """Rows of slot indices, one row per running request, `max_context_len` wide.

    The last row, `padding_row`, is never handed out: it stays all zeros, i.e. it points at slot 0
    of the allocator's padding page (which the allocator never hands out either). The padding rows
    of a CUDA-graph decode bucket use it (seq_len 1), so they read and write only slot 0. Hence
    `size` rows hold `size - 1` requests; the model runner makes `max_running_requests + 1`."""

    def __init__(self, size: int, max_context_len: int, device: str | torch.device):
        if size < 2:
            raise ValueError(f"ReqToTokenPool needs at least 2 rows (one is the padding row), got {size}")
        self.size = size
        self.max_context_len = max_context_len
        self.padding_row = size - 1
        self.req_to_token = torch.zeros((size, max_context_len), dtype=torch.int64, device=device)
        self._free: List[int] = list(range(size - 2, -1, -1))

    def available_size(self) -> int:
        return len(self._free)

    def alloc(self) -> Optional[int]:
        return self._free.pop() if self._free else None

    def free(self, idx: int) -> None:
        if idx in self._free or not (0 <= idx < self.padding_row):
            raise RuntimeError(f"req_to_token row {idx} freed twice, out of range or the padding row")
        self._free.append(idx)

    def write(self, idx: int, start: int, slots: torch.Tensor) -> None:
        self.req_to_token[idx, start:start + len(slots)] = slots
