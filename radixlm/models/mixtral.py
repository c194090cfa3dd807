"""Mixtral: the MoE decoder of qwen3_moe.py with Mixtral's router and tensor names.

Every layer is sparse; the router always renormalises the top-k probabilities (softmax over all
experts, top-k, divide by their sum); no q/k norm. Checkpoint names are translated to the shared
spelling: `block_sparse_moe.` -> `mlp.`, experts' w1 / w3 / w2 -> gate / up / down.
"""

from __future__ import annotations

import re

from radixlm.models.qwen3_moe import MoeForCausalLM

_EXPERT_W = re.compile(r"(\.experts\.\d+\.)w([123])\.weight$")
_PROJ = {"1": "gate_proj", "3": "up_proj", "2": "down_proj"}


class MixtralForCausalLM(MoeForCausalLM):
    qk_norm = False

    def hf_name(self, name: str) -> str:
        name = name.replace(".block_sparse_moe.", ".mlp.")
        return _EXPERT_W.sub(lambda m: f"{m.group(1)}{_PROJ[m.group(2)]}.weight", name)
