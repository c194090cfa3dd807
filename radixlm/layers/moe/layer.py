"""FusedMoE: one layer's experts (fused weights, sharded for tensor parallelism) and the sparse block
around it (router + experts).

`FusedMoE` holds w13_weight [E, 2*I/tp, H] (this rank's rows of each expert's gate, then of its up
projection) and w2_weight [E, H, I/tp] (this rank's columns of down). Their `weight_loader(param,
tensor, expert_id, shard_id)` takes a full checkpoint tensor and copies this rank's shard:
  shard "w1" (gate) / "w3" (up): one expert's [I, H];  "w2" (down): one expert's [H, I];
  expert_id None: every expert at once, HF transformers 5's in-memory layout -- "w13" a
  gate_up_proj [E, 2*I, H] (gate rows first), "w2" a down_proj [E, H, I].
`SparseMoeBlock` routes (a replicated router `gate`, top-k with the checkpoint's normalisation), runs
the experts with the configured runner and all-reduces the partial sums across ranks.
`configure_moe_runner(model, name)` picks the runner (`--moe-runner-backend`) for every block.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from radixlm.distributed.parallel_state import get_tp_rank, get_tp_size, tp_all_reduce
from radixlm.layers.linear import default_weight_loader
from radixlm.layers.moe.fused_moe import resolve_backend, run_experts
from radixlm.layers.moe.topk import select_experts

_GATE_UP = {"w1": 0, "w3": 1}


class FusedMoE(nn.Module):
    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int,
                 params_dtype: Optional[torch.dtype] = None):
        super().__init__()
        tp = get_tp_size()
        if intermediate_size % tp:
            raise ValueError(f"expert intermediate size {intermediate_size} is not divisible by tp_size {tp}")
        self.num_experts, self.hidden_size = num_experts, hidden_size
        self.inter_per_rank = intermediate_size // tp
        dtype = params_dtype or torch.get_default_dtype()
        self.w13_weight = self._param(torch.empty(num_experts, 2 * self.inter_per_rank, hidden_size, dtype=dtype))
        self.w2_weight = self._param(torch.empty(num_experts, hidden_size, self.inter_per_rank, dtype=dtype))

    def _param(self, data: torch.Tensor) -> nn.Parameter:
        p = nn.Parameter(data, requires_grad=False)
        p.weight_loader = self.weight_loader  # type: ignore[attr-defined]
        return p

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, expert_id: Optional[int],
                      shard_id: str) -> None:
        size, start = self.inter_per_rank, get_tp_rank() * self.inter_per_rank
        full = size * get_tp_size()
        if expert_id is None:  # all experts at once (transformers 5 layout)
            if loaded.shape[0] != self.num_experts:
                raise ValueError(f"checkpoint has {loaded.shape[0]} experts, the model {self.num_experts}")
            for e in range(self.num_experts):
                if shard_id == "w13":
                    if loaded.shape[1] != 2 * full:
                        raise ValueError(f"gate_up_proj rows {loaded.shape[1]}, expected {2 * full}")
                    self.weight_loader(param, loaded[e, :full], e, "w1")
                    self.weight_loader(param, loaded[e, full:], e, "w3")
                else:
                    self.weight_loader(param, loaded[e], e, shard_id)
            return
        if not 0 <= expert_id < self.num_experts:
            raise ValueError(f"expert id {expert_id} out of range (num_experts {self.num_experts})")
        if shard_id in _GATE_UP:
            if tuple(loaded.shape) != (full, self.hidden_size):
                raise ValueError(f"expert {shard_id} shape {tuple(loaded.shape)}, expected {(full, self.hidden_size)}")
            param.data[expert_id].narrow(0, _GATE_UP[shard_id] * size, size).copy_(loaded.narrow(0, start, size))
        elif shard_id == "w2":
            if tuple(loaded.shape) != (self.hidden_size, full):
                raise ValueError(f"expert w2 shape {tuple(loaded.shape)}, expected {(self.hidden_size, full)}")
            param.data[expert_id].copy_(loaded.narrow(1, start, size))
        else:
            raise ValueError(f"unknown expert shard {shard_id!r}")

    def forward(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                backend: str) -> torch.Tensor:
        """This rank's partial sum of the experts' outputs (the caller all-reduces)."""
        if x.shape[0] == 0:
            return torch.zeros_like(x)
        return run_experts(backend, x, self.w13_weight, self.w2_weight, topk_weights, topk_ids)


class Router(nn.Module):
    """The replicated router: logits = x @ weight^T, weight [E, H] (HF's `gate.weight`)."""

    def __init__(self, num_experts: int, hidden_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size), requires_grad=False)
        self.weight.weight_loader = default_weight_loader  # type: ignore[attr-defined]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.weight)


class SparseMoeBlock(nn.Module):
    def __init__(self, num_experts: int, top_k: int, hidden_size: int, intermediate_size: int, renormalize: bool):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"num_experts_per_tok {top_k} must be in [1, num_experts={num_experts}]")
        self.top_k, self.renormalize = top_k, renormalize
        self.gate = Router(num_experts, hidden_size)
        self.experts = FusedMoE(num_experts, hidden_size, intermediate_size)
        self.runner = "auto"  # resolved on first use from the device, or set by configure_moe_runner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.runner == "auto":
            self.runner = resolve_backend("auto", x.device)
        weights, ids = select_experts(self.gate(x), self.top_k, self.renormalize)
        return tp_all_reduce(self.experts(x, weights, ids, self.runner))


def configure_moe_runner(model: nn.Module, name: str, device: torch.device | str) -> int:
    """Sets the expert runner of every SparseMoeBlock in `model` (auto: triton on CUDA, torch_grouped
    elsewhere); returns how many blocks. The triton runner on CPU needs TRITON_INTERPRET=1 (tests)."""
    resolved = resolve_backend(name, device)
    if resolved == "triton":
        from radixlm.layers import triton_ops

        if not triton_ops.triton_available():
            raise ValueError("moe_runner_backend triton needs triton installed")
        if torch.device(device).type != "cuda":
            from radixlm.attention.triton_kernels.common import INTERPRETED

            if not INTERPRETED:
                raise ValueError("moe_runner_backend triton needs CUDA (or TRITON_INTERPRET=1 on CPU, for tests)")
    n = 0
    for m in model.modules():
        if isinstance(m, SparseMoeBlock):
            m.runner = resolved
            n += 1
    return n
