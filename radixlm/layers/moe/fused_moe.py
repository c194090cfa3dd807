"""The experts' computation for routed tokens, in torch: the reference and the grouped path.

In: hidden x [T, H]; fused expert weights w13 [E, 2*I, H] (gate rows, then up rows) and w2 [E, H, I];
router output weights [T, k] (float32) and ids [T, k]. Out: [T, H] in x's dtype,
    out[t] = sum_j weights[t, j] * w2[e] @ (silu(w13[e, :I] @ x[t]) * (w13[e, I:] @ x[t])),  e = ids[t, j]
(a partial sum under tensor parallelism: the caller all-reduces).

`moe_reference` loops over the experts and gathers each one's tokens (what HF transformers does);
`moe_grouped` sorts the (token, slot) pairs by expert once, runs one matmul pair per non-empty
expert on a contiguous slice, and scatters the weighted rows back with one index_add. Both leave
the device once per call for the group sizes (.tolist()/nonzero), so neither can be captured in a
CUDA graph; the Triton runner (triton_moe.py) can. `run_experts(backend, ...)` dispatches by name.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# --moe-runner-backend choices (server_args.py); auto = triton on CUDA, torch_grouped elsewhere
MOE_RUNNER_BACKENDS = ("auto", "triton", "torch_grouped", "torch_reference")


def _expert_mlp(x: torch.Tensor, w13_e: torch.Tensor, w2_e: torch.Tensor) -> torch.Tensor:
    inter = w13_e.shape[0] // 2
    gate_up = F.linear(x, w13_e)
    return F.linear(F.silu(gate_up[:, :inter]) * gate_up[:, inter:], w2_e)


def moe_reference(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                  topk_ids: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(x.shape[0], w2.shape[1], dtype=torch.float32, device=x.device)
    for e in range(w13.shape[0]):
        tokens, slots = torch.nonzero(topk_ids == e, as_tuple=True)
        if tokens.numel() == 0:
            continue
        y = _expert_mlp(x[tokens], w13[e], w2[e])
        out.index_add_(0, tokens, y.float() * topk_weights[tokens, slots, None])
    return out.to(x.dtype)


def moe_grouped(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                topk_ids: torch.Tensor) -> torch.Tensor:
    num_tokens, top_k = topk_ids.shape
    flat_ids = topk_ids.reshape(-1)
    order = torch.argsort(flat_ids, stable=True)  # (token, slot) pairs grouped by expert
    token_of = order // top_k
    counts = torch.bincount(flat_ids, minlength=w13.shape[0]).tolist()
    xs = x[token_of]
    ys = torch.empty(xs.shape[0], w2.shape[1], dtype=x.dtype, device=x.device)
    start = 0
    for e, n in enumerate(counts):
        if n:
            ys[start:start + n] = _expert_mlp(xs[start:start + n], w13[e], w2[e])
            start += n
    weighted = ys.float() * topk_weights.reshape(-1)[order, None]
    out = torch.zeros(num_tokens, w2.shape[1], dtype=torch.float32, device=x.device)
    out.index_add_(0, token_of, weighted)
    return out.to(x.dtype)


def resolve_backend(name: str, device: torch.device | str) -> str:
    if name not in MOE_RUNNER_BACKENDS:
        raise ValueError(f"moe_runner_backend {name!r} is not supported. Valid: {', '.join(MOE_RUNNER_BACKENDS)}")
    if name == "auto":
        return "triton" if torch.device(device).type == "cuda" else "torch_grouped"
    return name


def run_experts(backend: str, x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                topk_ids: torch.Tensor) -> torch.Tensor:
    """The experts' output by the named runner (a resolved name: not auto)."""
    if backend == "triton":
        from radixlm.layers.moe.triton_moe import fused_moe_triton

        return fused_moe_triton(x, w13, w2, topk_weights, topk_ids)
    if x.is_cuda and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(f"moe_runner_backend {backend!r} syncs with the host and cannot run in a CUDA graph: "
                           "use --moe-runner-backend triton or --disable-cuda-graph")
    if backend == "torch_grouped":
        return moe_grouped(x, w13, w2, topk_weights, topk_ids)
    if backend == "torch_reference":
        return moe_reference(x, w13, w2, topk_weights, topk_ids)
    raise ValueError(f"unknown moe runner {backend!r}")
