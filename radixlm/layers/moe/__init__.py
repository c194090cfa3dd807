"""Mixture-of-Experts layers: router top-k, the expert computation in three interchangeable runners,
and the tensor-parallel expert weights.

    topk.select_experts(router_logits, top_k, renormalize)   -> (weights [T, k] f32, ids [T, k] i32)
    fused_moe.moe_reference(x, w13, w2, weights, ids)        plain loop over experts (the reference)
    fused_moe.moe_grouped(x, w13, w2, weights, ids)          tokens sorted by expert, one matmul per group
    triton_moe.fused_moe_triton(x, w13, w2, weights, ids)    Triton grouped GEMM (CUDA; CPU: TRITON_INTERPRET=1)
    layer.FusedMoE                                           the experts of one layer (weights + runner)

Expert weights are stored fused: w13 [E, 2*I, H] (gate rows then up rows of each expert) and
w2 [E, H, I]; with tensor parallelism I is this rank's share of the intermediate size (w13 split by
rows, w2 by columns, the partial outputs all-reduced). `tests/test_moe.py` compares the runners.
This package imports no triton: the Triton runner is imported on first use.
"""

from radixlm.layers.moe.fused_moe import MOE_RUNNER_BACKENDS, moe_grouped, moe_reference, run_experts
from radixlm.layers.moe.layer import FusedMoE, configure_moe_runner
from radixlm.layers.moe.topk import select_experts

__all__ = ["MOE_RUNNER_BACKENDS", "FusedMoE", "configure_moe_runner", "moe_grouped", "moe_reference",
           "run_experts", "select_experts"]
