"""Llama-family decoder (Llama 2/3, Mistral, Qwen2, Qwen3) with packed qkv and gate_up.

Owns the forward math of these architectures; `load_weights` maps HF tensor names onto the packed
parameters through each parameter's `weight_loader` (which takes this tensor-parallel rank's shard:
attention heads, MLP columns and vocabulary rows are split across ranks, see layers/). Differences
between the families are flags: qkv bias (Qwen2), q/k RMSNorm per head (Qwen3), explicit head_dim,
tied embeddings.
"""

from __future__ import annotations

from typing import Iterable, Tuple

import torch
from torch import nn

from radixlm.layers.activation import SiluAndMul
from radixlm.layers.layernorm import RMSNorm
from radixlm.layers.linear import (MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear,
                                   default_weight_loader)
from radixlm.layers.radix_attention import RadixAttention
from radixlm.layers.rotary_embedding import RotaryEmbedding
from radixlm.layers.vocab_embedding import ParallelLMHead, VocabParallelEmbedding
from radixlm.models.model_config import ModelConfig


def build_rotary(cfg: ModelConfig) -> RotaryEmbedding:
    """The model's one cos/sin table, shared by every layer."""
    return RotaryEmbedding(cfg.head_dim, cfg.context_len, cfg.rope_theta, cfg.rope_scaling,
                           max_position_embeddings=cfg.get("max_position_embeddings"))


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int, qkv_bias: bool, qk_norm: bool,
                 rotary_emb: RotaryEmbedding = None):
        super().__init__()
        h, d = cfg.hidden_size, cfg.head_dim
        attention_bias = bool(cfg.get("attention_bias", False))
        self.qkv_proj = QKVParallelLinear(h, d, cfg.num_heads, cfg.num_kv_heads, bias=qkv_bias or attention_bias)
        # this tensor-parallel rank's heads (all of them with one rank)
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads_per_rank, self.qkv_proj.num_kv_heads_per_rank
        self.head_dim = d
        self.q_size, self.kv_size = self.num_heads * d, self.num_kv_heads * d
        self.o_proj = RowParallelLinear(cfg.num_heads * d, h, bias=attention_bias)
        self.rotary_emb = rotary_emb if rotary_emb is not None else build_rotary(cfg)
        eps = cfg.get("rms_norm_eps", 1e-6)
        self.q_norm = RMSNorm(d, eps) if qk_norm else None
        self.k_norm = RMSNorm(d, eps) if qk_norm else None
        self.attn = RadixAttention(self.num_heads, d, d ** -0.5, self.num_kv_heads, layer_id,
                                   sliding_window=cfg.sliding_window_for_layer(layer_id))

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv_proj(hidden)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.reshape(-1, self.num_heads, self.head_dim)
        k = k.reshape(-1, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary_emb(positions, q, k)
        o = self.attn(q.reshape(-1, self.q_size), k.reshape(-1, self.kv_size), v.contiguous())
        return self.o_proj(o)


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        inter = cfg.get("intermediate_size")
        bias = bool(cfg.get("mlp_bias", False))
        self.gate_up_proj = MergedColumnParallelLinear(cfg.hidden_size, [inter, inter], bias=bias)
        self.down_proj = RowParallelLinear(inter, cfg.hidden_size, bias=bias)
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int, qkv_bias: bool, qk_norm: bool,
                 rotary_emb: RotaryEmbedding = None):
        super().__init__()
        eps = cfg.get("rms_norm_eps", 1e-6)
        self.self_attn = LlamaAttention(cfg, layer_id, qkv_bias, qk_norm, rotary_emb)
        self.mlp = LlamaMLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps)

    def forward(self, positions, hidden, residual):
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig, qkv_bias: bool, qk_norm: bool):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size)
        rotary_emb = build_rotary(cfg)  # one cos/sin table for all layers (the same module in each)
        self.layers = nn.ModuleList([LlamaDecoderLayer(cfg, i, qkv_bias, qk_norm, rotary_emb)
                                     for i in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.get("rms_norm_eps", 1e-6))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        residual = None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class LlamaForCausalLM(nn.Module):
    qkv_bias = False
    qk_norm = False
    # (packed parameter, HF name, shard id)
    stacked_params_mapping = [
        (".qkv_proj", ".q_proj", "q"), (".qkv_proj", ".k_proj", "k"), (".qkv_proj", ".v_proj", "v"),
        (".gate_up_proj", ".gate_proj", 0), (".gate_up_proj", ".up_proj", 1),
    ]

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(cfg, self.qkv_bias, self.qk_norm)
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Hidden states of every computed token: [T, hidden]."""
        return self.model(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head.compute_logits(hidden)

    def load_weights(self, weights: Iterable[Tuple[str, torch.Tensor]]) -> set:
        params = dict(self.named_parameters(remove_duplicate=False))
        loaded = set()
        for name, tensor in weights:
            if "rotary_emb.inv_freq" in name:
                continue
            if name == "lm_head.weight" and self.config.tie_word_embeddings:
                continue
            for packed, hf, shard in self.stacked_params_mapping:
                if hf in name:
                    target = name.replace(hf, packed)
                    param = params[target]
                    param.weight_loader(param, tensor, shard)
                    loaded.add(target)
                    break
            else:
                if name not in params:
                    raise ValueError(f"checkpoint tensor {name!r} has no place in {type(self).__name__}")
                param = params[name]
                getattr(param, "weight_loader", default_weight_loader)(param, tensor)
                loaded.add(name)
        return loaded


class MistralForCausalLM(LlamaForCausalLM):
    pass


class Qwen2ForCausalLM(LlamaForCausalLM):
    qkv_bias = True


class Qwen3ForCausalLM(LlamaForCausalLM):
    qk_norm = True
