"""LoRA layers: wrappers around the base model's (packed) linear layers.

`LoRALinear` holds the base layer (QKVParallelLinear, MergedColumnParallelLinear, RowParallelLinear)
and its slot buffers (A [S, P*R, in], B [S, out, R]); its forward calls the base layer and adds the
batch's LoRA delta for the rows whose request uses an adapter. The step's `LoRABatchInfo` (adapter
slot of every row, as segments) comes from the forward context (attention/forward_context.py), set
up by the model runner. `wrap_model` puts the wrappers in place after the weights are loaded; the
base layers themselves are not changed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple, Union

import torch
from torch import nn

from radixlm.attention import forward_context
from radixlm.lora.adapter import PACKED_PIECES
from radixlm.lora.ops import lora_delta_grouped


@dataclass
class LoRABatchInfo:
    """Which adapter slot each row of one step uses. Rows come in segments (one per request, adjacent
    requests of the same slot merged); slot -1 is the base model."""

    seg_lens: List[int]
    seg_slots: List[int]
    seg_indptr: torch.Tensor  # int32 [G+1] on the device
    seg_slots_t: torch.Tensor  # int32 [G] on the device
    groups: List[Tuple[int, Union[torch.Tensor, slice]]]  # (slot, its rows: int64 indices or one range)
    backend: str = "torch"  # torch | triton

    @property
    def row_slots(self) -> List[int]:
        return [s for s, n in zip(self.seg_slots, self.seg_lens) for _ in range(n)]

    @classmethod
    def build(cls, slots: List[int], lens: List[int], device, backend: str = "torch") -> "LoRABatchInfo":
        seg_slots, seg_lens = [], []
        for s, n in zip(slots, lens):
            if n == 0:
                continue
            if seg_slots and seg_slots[-1] == s:
                seg_lens[-1] += n
            else:
                seg_slots.append(s)
                seg_lens.append(n)
        indptr = [0]
        for n in seg_lens:
            indptr.append(indptr[-1] + n)
        rows: Dict[int, List[int]] = {}
        for s, a, b in zip(seg_slots, indptr, indptr[1:]):
            if s >= 0:
                rows.setdefault(s, []).extend(range(a, b))
        groups = [(s, slice(r[0], r[-1] + 1) if r[-1] - r[0] + 1 == len(r) else
                   torch.tensor(r, dtype=torch.long, device=device)) for s, r in rows.items()]
        return cls(seg_lens, seg_slots, torch.tensor(indptr, dtype=torch.int32, device=device),
                   torch.tensor(seg_slots, dtype=torch.int32, device=device), groups, backend)


def current_lora_info() -> Optional[LoRABatchInfo]:
    fb = forward_context._current
    return None if fb is None else getattr(fb, "lora", None)


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Module, packed_name: str, piece_sizes: List[int], in_features: int,
                 num_slots: int, max_rank: int, dtype: torch.dtype, device):
        super().__init__()
        self.base = base
        self.packed_name = packed_name
        self.piece_names = PACKED_PIECES[packed_name]
        offs = [sum(piece_sizes[:i]) for i in range(len(piece_sizes))]
        self.pieces = list(zip(offs, piece_sizes))
        self.max_rank = max_rank
        p = len(piece_sizes)
        self.lora_A = torch.zeros(num_slots, p * max_rank, in_features, dtype=dtype, device=device)
        self.lora_B = torch.zeros(num_slots, sum(piece_sizes), max_rank, dtype=dtype, device=device)

    def set_slot(self, slot: int, weights: Dict[str, Tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Copies an adapter's (A, scaled B) per piece name into `slot` (zeros where it has none)."""
        R = self.max_rank
        self.lora_A[slot].zero_()
        self.lora_B[slot].zero_()
        for p, name in enumerate(self.piece_names):
            if name not in weights:
                continue
            a, b = weights[name]
            r = a.shape[0]
            off, size = self.pieces[p]
            self.lora_A[slot, p * R:p * R + r].copy_(a)
            self.lora_B[slot, off:off + size, :r].copy_(b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        info = current_lora_info()
        if info is None or not info.groups:
            return y
        if info.backend == "triton":
            from radixlm.lora.triton_ops import lora_delta_triton

            return lora_delta_triton(x, self.lora_A, self.lora_B, self.pieces, info.seg_indptr, info.seg_slots_t,
                                     y.contiguous())
        return lora_delta_grouped(x, self.lora_A, self.lora_B, self.pieces, info.groups, y)


def wrap_model(model: nn.Module, model_config, modules: set, num_slots: int, max_rank: int,
               device) -> List[Tuple[int, LoRALinear]]:
    """Replaces each decoder layer's packed linears that hold a targeted module with a LoRALinear;
    returns [(layer index, wrapper)]."""
    from radixlm.lora.adapter import module_shapes

    shapes = module_shapes(model_config)
    wrapped = []
    for i, layer in enumerate(model.model.layers):
        for parent, attr in ((layer.self_attn, "qkv_proj"), (layer.self_attn, "o_proj"),
                             (layer.mlp, "gate_up_proj"), (layer.mlp, "down_proj")):
            names = PACKED_PIECES[attr]
            if not set(names) & modules:
                continue
            base = getattr(parent, attr)
            w = LoRALinear(base, attr, [shapes[n][1] for n in names], shapes[names[0]][0], num_slots, max_rank,
                           base.weight.dtype, device)
            setattr(parent, attr, w)
            wrapped.append((i, w))
    return wrapped
