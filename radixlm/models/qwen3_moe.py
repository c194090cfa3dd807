"""Mixture-of-Experts decoders on the Llama skeleton: Qwen3-MoE (and, in mixtral.py, Mixtral).

Owns what differs from llama.py: each decoder layer's MLP is a `SparseMoeBlock` (router top-k +
fused experts, radixlm/layers/moe/) or, for Qwen3-MoE layers listed in `mlp_only_layers` or off the
`decoder_sparse_step` grid, the dense `LlamaMLP`; and the loading of HF's per-expert tensor names
into the fused expert weights. Attention, norms, embeddings, the model loop and the dense weight
mapping are llama.py's (the classes below reuse their forward and load_weights).

Expert tensor names understood (N = layer, E = expert):
  model.layers.N.mlp.experts.E.{gate,up,down}_proj.weight   (Qwen3-MoE hub checkpoints)
  model.layers.N.mlp.experts.{gate_up_proj,down_proj}       (transformers 5's in-memory fused layout)
  model.layers.N.mlp.gate.weight                            (router)
Mixtral's block_sparse_moe.experts.E.w1/w3/w2 names are translated in mixtral.py.
"""

from __future__ import annotations

import re
from typing import Iterable, Iterator, Tuple

import torch
from torch import nn

from radixlm.layers.layernorm import RMSNorm
from radixlm.layers.moe.layer import SparseMoeBlock
from radixlm.layers.rotary_embedding import RotaryEmbedding
from radixlm.layers.vocab_embedding import ParallelLMHead, VocabParallelEmbedding
from radixlm.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM, LlamaMLP, LlamaModel, build_rotary
from radixlm.models.model_config import ModelConfig

# model.layers.N.mlp.experts.E.<proj>.weight -> (prefix up to "experts", E, proj)
_PER_EXPERT = re.compile(r"^(.*\.experts)\.(\d+)\.(\w+)\.weight$")
_FUSED = re.compile(r"^(.*\.experts)\.(gate_up_proj|down_proj)$")
_SHARD_OF = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2", "w1": "w1", "w3": "w3", "w2": "w2"}


class MoeDecoderLayer(LlamaDecoderLayer):
    """LlamaDecoderLayer (same forward) whose `mlp` is a sparse MoE block when `is_sparse`."""

    def __init__(self, cfg: ModelConfig, layer_id: int, qk_norm: bool, rotary_emb: RotaryEmbedding,
                 is_sparse: bool, renormalize: bool):
        nn.Module.__init__(self)
        eps = cfg.get("rms_norm_eps", 1e-6)
        self.self_attn = LlamaAttention(cfg, layer_id, False, qk_norm, rotary_emb)
        if is_sparse:
            self.mlp = SparseMoeBlock(cfg.num_experts, cfg.get("num_experts_per_tok"), cfg.hidden_size,
                                      cfg.moe_intermediate_size, renormalize)
        else:
            self.mlp = LlamaMLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps)


class MoeModel(LlamaModel):
    """LlamaModel (same forward) built from MoeDecoderLayers."""

    def __init__(self, cfg: ModelConfig, qk_norm: bool, sparse_layers: set, renormalize: bool):
        nn.Module.__init__(self)
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size)
        rotary_emb = build_rotary(cfg)
        self.layers = nn.ModuleList([MoeDecoderLayer(cfg, i, qk_norm, rotary_emb, i in sparse_layers, renormalize)
                                     for i in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.get("rms_norm_eps", 1e-6))


class MoeForCausalLM(LlamaForCausalLM):
    """The shared MoE causal LM: subclasses say which layers are sparse and how the router normalises."""

    def __init__(self, cfg: ModelConfig):
        nn.Module.__init__(self)
        self.config = cfg
        self.model = MoeModel(cfg, self.qk_norm, self.sparse_layers(cfg), self.renormalize(cfg))
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @staticmethod
    def sparse_layers(cfg: ModelConfig) -> set:
        return set(range(cfg.num_layers))

    @staticmethod
    def renormalize(cfg: ModelConfig) -> bool:
        return True

    def hf_name(self, name: str) -> str:
        """A checkpoint name in Qwen3-MoE's spelling (Mixtral translates its own)."""
        return name

    def load_weights(self, weights: Iterable[Tuple[str, torch.Tensor]]) -> set:
        params = dict(self.named_parameters(remove_duplicate=False))
        loaded: set = set()
        pieces: set = set()  # (param, expert, shard) loaded one expert at a time

        def dense() -> Iterator[Tuple[str, torch.Tensor]]:
            for raw, tensor in weights:
                name = self.hf_name(raw)
                per_expert, fused = _PER_EXPERT.match(name), _FUSED.match(name)
                if per_expert and per_expert.group(3) in _SHARD_OF:
                    prefix, expert, proj = per_expert.groups()
                    param_name = f"{prefix}.{'w2' if _SHARD_OF[proj] == 'w2' else 'w13'}_weight"
                    self._load_expert(params, param_name, raw, tensor, int(expert), _SHARD_OF[proj])
                    pieces.add((param_name, int(expert), _SHARD_OF[proj]))
                    loaded.add(param_name)
                elif fused:
                    prefix, proj = fused.groups()
                    shard = "w13" if proj == "gate_up_proj" else "w2"
                    param_name = f"{prefix}.{shard}_weight"
                    self._load_expert(params, param_name, raw, tensor, None, shard)
                    pieces.update((param_name, e, s) for e in range(self.config.num_experts)
                                  for s in (("w1", "w3") if shard == "w13" else ("w2",)))
                    loaded.add(param_name)
                else:
                    yield name, tensor

        loaded |= LlamaForCausalLM.load_weights(self, dense())
        self._check_experts_complete(loaded, pieces)
        return loaded

    def _check_experts_complete(self, loaded: set, pieces: set) -> None:
        """Every expert of every loaded fused weight got each of its pieces (a checkpoint missing one
        expert would otherwise leave uninitialised memory in the model)."""
        for name in loaded:
            if name.endswith(("w13_weight", "w2_weight")):
                shards = ("w1", "w3") if name.endswith("w13_weight") else ("w2",)
                for e in range(self.config.num_experts):
                    for s in shards:
                        if (name, e, s) not in pieces:
                            raise ValueError(f"checkpoint lacks expert {e}'s {s} for {name}")

    def _load_expert(self, params, param_name, raw, tensor, expert, shard) -> None:
        if param_name not in params:
            raise ValueError(f"checkpoint tensor {raw!r} has no place in {type(self).__name__}")
        param = params[param_name]
        param.weight_loader(param, tensor, expert, shard)


class Qwen3MoeForCausalLM(MoeForCausalLM):
    qk_norm = True

    @staticmethod
    def sparse_layers(cfg: ModelConfig) -> set:
        """HF's rule: sparse unless listed in mlp_only_layers, and only every decoder_sparse_step-th layer."""
        only_dense = set(cfg.get("mlp_only_layers") or [])
        step = int(cfg.get("decoder_sparse_step") or 1)
        if cfg.num_experts <= 0:
            return set()
        return {i for i in range(cfg.num_layers) if i not in only_dense and (i + 1) % step == 0}

    @staticmethod
    def renormalize(cfg: ModelConfig) -> bool:
        return bool(cfg.get("norm_topk_prob", False))
