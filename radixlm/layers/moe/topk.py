"""Router top-k: which experts each token goes to, and with what weight.

In: router logits [T, E] (any float dtype). Out: weights [T, k] float32 and expert ids [T, k] int32.
Softmax over all experts in float32, top-k of the probabilities, then, with `renormalize`, division
by their sum. Mixtral always renormalises (equivalent to a softmax over the top-k logits); Qwen3-MoE
only when its config sets `norm_topk_prob`. This is exactly HF transformers' order of operations, so
ties break the same way.
"""

from __future__ import annotations

from typing import Tuple

import torch


def select_experts(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    num_experts = router_logits.shape[-1]
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k {top_k} must be in [1, num_experts={num_experts}]")
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids.to(torch.int32)
