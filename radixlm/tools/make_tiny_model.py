"""Offline builder for tiny random-weight HuggingFace checkpoints.

This module owns the synthetic models that the test-suite, demos and
benchmarks use in place of real downloaded checkpoints (there is no model hub
access).  :func:`make_tiny_model` writes a complete HuggingFace-format
directory -- ``config.json``, ``generation_config.json``, ``model.safetensors``
(seeded random weights under the standard HF tensor names),
``tokenizer.json``, ``tokenizer_config.json`` (with a ChatML chat template) and
``special_tokens_map.json`` -- that ``transformers.AutoModelForCausalLM`` and
``transformers.AutoTokenizer`` load with no network access.

Supported architectures: ``llama`` (Llama-3 style rope scaling), ``qwen2``
(qkv bias, tied embeddings), ``qwen3`` (q/k RMSNorm, explicit head_dim),
``mistral``, and the Mixture-of-Experts ``qwen3_moe`` (8 experts, top-2,
renormalised; per-expert ``mlp.experts.E.{gate,up,down}_proj`` names) and
``mixtral`` (8 experts, top-2; ``block_sparse_moe.experts.E.w1/w2/w3``).
Sizes: ``tiny`` (fast, for unit tests), ``small`` (demos, benchmarks) and ``medium`` (~100M parameters, CPU benchmarks).

The tokenizer files (byte-level BPE trained on ``corpus.txt``, ChatML chat
template, fixed special-token ids) come from ``tiny_tokenizer.py``; this module
owns the model side: config, seeded weights, and the directory layout.

CLI::

    python -m radixlm.tools.make_tiny_model OUT --arch llama|qwen2|qwen3|mistral|qwen3_moe|mixtral \
        [--size tiny|small|medium] [--seed N] [--dtype float32|bfloat16|float16] \
        [--chat-template-style chatml|qwen3|deepseek-r1]
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys
from typing import Any

from radixlm.tools.tiny_tokenizer import (
    CHAT_TEMPLATE,
    CHAT_TEMPLATES,
    EOS_TOKEN_ID,
    IM_END_ID,
    IM_START_ID,
    SPECIAL_TOKENS,
    get_tokenizer_json,
    special_tokens_map,
    tokenizer_config,
)

__all__ = [
    "ARCHS",
    "SIZES",
    "SPECIAL_TOKENS",
    "EOS_TOKEN_ID",
    "IM_START_ID",
    "IM_END_ID",
    "CHAT_TEMPLATE",
    "build_config",
    "get_tokenizer_json",
    "make_tiny_model",
    "main",
]

ARCHS = ("llama", "qwen2", "qwen3", "mistral", "qwen3_moe", "mixtral")
DTYPES = ("float32", "bfloat16", "float16")


# Tokenizer vocabulary (incl. the 3 special tokens and the 256 byte symbols)
# and the model's embedding rows (>= tokenizer size; the extra rows are
# "padding" ids the tokenizer never produces).
_TOKENIZER_VOCAB = {"tiny": 512, "small": 2048, "medium": 2048}
_MODEL_VOCAB = {"tiny": 515, "small": 2056, "medium": 2056}

_SIZE_PARAMS: dict[str, dict[str, int]] = {
    "tiny": dict(
        hidden_size=96,
        num_hidden_layers=3,
        num_attention_heads=6,
        num_key_value_heads=2,
        intermediate_size=200,
    ),
    "small": dict(
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        intermediate_size=688,
    ),
    # ~100M parameters (qwen2: 104M with tied embeddings): CPU benchmarks of a realistic-size model.
    "medium": dict(
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=4,
        intermediate_size=3072,
    ),
}
SIZES = tuple(_SIZE_PARAMS)

# qwen3 uses an explicit head_dim different from hidden_size // num_heads.
_QWEN3_HEAD_DIM = {"tiny": 24, "small": 64, "medium": 64}

_ARCH_INFO = {
    "llama": dict(architectures=["LlamaForCausalLM"], model_type="llama"),
    "qwen2": dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2"),
    "qwen3": dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3"),
    "mistral": dict(architectures=["MistralForCausalLM"], model_type="mistral"),
    "qwen3_moe": dict(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe"),
    "mixtral": dict(architectures=["MixtralForCausalLM"], model_type="mixtral"),
}
_EXPLICIT_HEAD_DIM = ("qwen3", "qwen3_moe")

# MoE: (experts, one expert's intermediate size) per size; top-2 routing.
_MOE_PARAMS = {"tiny": (8, 64), "small": (8, 256), "medium": (8, 1024)}

# Per-architecture config.json fields (as the HF checkpoints of each family write them).
_NO_SLIDING = dict(use_sliding_window=False, sliding_window=None, max_window_layers=None)  # layers: set later
_ARCH_FIELDS: dict[str, dict[str, Any]] = {
    "llama": dict(tie_word_embeddings=False, rope_theta=500000.0, attention_bias=False, mlp_bias=False,
                  pretraining_tp=1,
                  rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 256}),
    "qwen2": dict(tie_word_embeddings=True, rope_theta=10000.0, rope_scaling=None, **_NO_SLIDING),
    "qwen3": dict(tie_word_embeddings=False, rope_theta=1000000.0, rope_scaling=None, attention_bias=False,
                  **_NO_SLIDING),
    "mistral": dict(tie_word_embeddings=False, rope_theta=10000.0, sliding_window=None),
    "qwen3_moe": dict(tie_word_embeddings=False, rope_theta=1000000.0, rope_scaling=None, attention_bias=False,
                      num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
                      router_aux_loss_coef=0.001, output_router_logits=False, **_NO_SLIDING),
    "mixtral": dict(tie_word_embeddings=False, rope_theta=1000000.0, sliding_window=None, num_experts_per_tok=2,
                    router_jitter_noise=0.0, router_aux_loss_coef=0.001, output_router_logits=False),
}

MAX_POSITION_EMBEDDINGS = 2048
# medium holds multi-turn agent benchmarks (system prompt + several turns of history).
_MAX_POSITION_EMBEDDINGS = {"medium": 4096}

# ---------------------------------------------------------------------------
# Weight initialisation scales (measured with the HF reference models so that
# random-weight greedy decoding yields varied tokens, attention/context
# materially changes the prediction, and the top-1/top-2 logit gap is
# typically >> 1e-3: measured median ~1.2, P(gap < 1e-3) ~ 0.1%).  Linear
# layers use std = _LINEAR_GAIN / sqrt(fan_in), so q.k scores have std ~2 and
# attention is sharp and context-dependent.  Embedding / LM-head rows are
# random directions with a fixed norm (no "hub" tokens).  Untied: embedding
# rows have norm sqrt(hidden) (rms 1), LM-head rows norm _LM_HEAD_LOGIT_STD.
# Tied: rows have norm _TIED_EMBED_ROW_NORM and the final norm weight carries
# the logit scale (~_LM_HEAD_LOGIT_STD), otherwise the residual copy of the
# current token makes greedy decoding repeat it.  Norm weights: 1 + N(0, 0.1).
_EMBED_STD = 1.0
_LINEAR_GAIN = 1.5
_LM_HEAD_LOGIT_STD = 6.0  # lm_head row norm (-> logit std for unit-rms hidden)
_OUT_GAIN = 1.0  # extra gain on o_proj / down_proj (residual-branch outputs)
_BIAS_STD = 0.1
_TIED_EMBED_ROW_NORM = 1.0
_NORM_NOISE = 0.1
_ROUTER_GAIN = 3.0  # MoE router logit std


# ---------------------------------------------------------------------------
# Config


def build_config(arch: str = "llama", size: str = "tiny", dtype: str = "float32",
                 **config_overrides: Any) -> dict[str, Any]:
    """Return the ``config.json`` dict for ``arch``/``size`` with overrides applied."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose from {ARCHS}")
    if size not in _SIZE_PARAMS:
        raise ValueError(f"unknown size {size!r}; choose from {SIZES}")
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose from {DTYPES}")

    p = dict(_SIZE_PARAMS[size])
    explicit_head_dim = arch in _EXPLICIT_HEAD_DIM
    if arch == "qwen3_moe":  # dense layers (mlp_only_layers) keep intermediate_size
        p["num_experts"], p["moe_intermediate_size"] = _MOE_PARAMS[size]
    elif arch == "mixtral":  # every layer is sparse: intermediate_size is one expert's
        p["num_local_experts"], p["intermediate_size"] = _MOE_PARAMS[size]
    head_dim = _QWEN3_HEAD_DIM[size] if explicit_head_dim else p["hidden_size"] // p["num_attention_heads"]

    cfg: dict[str, Any] = {
        **_ARCH_INFO[arch],
        "vocab_size": _MODEL_VOCAB[size],
        **p,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": _MAX_POSITION_EMBEDDINGS.get(size, MAX_POSITION_EMBEDDINGS),
        "initializer_range": 0.02,
        "rms_norm_eps": 1e-5 if arch == "llama" else 1e-6,
        "use_cache": True,
        "bos_token_id": EOS_TOKEN_ID,
        "eos_token_id": EOS_TOKEN_ID,
        "pad_token_id": EOS_TOKEN_ID,
        "attention_dropout": 0.0,
    }
    cfg.update(_ARCH_FIELDS[arch])
    if "max_window_layers" in cfg:
        cfg["max_window_layers"] = cfg["num_hidden_layers"]

    for k, v in config_overrides.items():
        cfg[k] = v
    # Keep head_dim consistent when the shape is overridden, unless the arch
    # uses an explicit head_dim or the caller set it.
    if "head_dim" not in config_overrides and not explicit_head_dim:
        cfg["head_dim"] = cfg["hidden_size"] // cfg["num_attention_heads"]
    if "max_window_layers" in cfg and "max_window_layers" not in config_overrides:
        cfg["max_window_layers"] = cfg["num_hidden_layers"]

    if cfg["num_attention_heads"] % cfg["num_key_value_heads"]:
        raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
    if cfg["vocab_size"] < _TOKENIZER_VOCAB[size]:
        raise ValueError(f"vocab_size must be >= tokenizer size {_TOKENIZER_VOCAB[size]}")

    cfg["torch_dtype"] = dtype
    cfg["dtype"] = dtype
    try:
        import transformers

        cfg["transformers_version"] = transformers.__version__
    except Exception:  # pragma: no cover - transformers is a dependency
        pass
    return dict(sorted(cfg.items()))


# ---------------------------------------------------------------------------
# Weights


def _make_weights(cfg: dict[str, Any], seed: int, n_real_tokens: int):
    """Seeded random weights under HF tensor names (float32, CPU)."""
    import torch

    g = torch.Generator(device="cpu")
    g.manual_seed(int(seed))

    def normal(shape, std):
        return torch.randn(*shape, generator=g, dtype=torch.float32) * std

    def linear(out_f, in_f):
        return normal((out_f, in_f), _LINEAR_GAIN / math.sqrt(in_f))

    def out_linear(out_f, in_f):
        return normal((out_f, in_f), _LINEAR_GAIN * _OUT_GAIN / math.sqrt(in_f))

    def unit_rows(x, scale):
        # Equal-norm rows: no "hub" token wins argmax disproportionately often.
        return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-6) * scale

    def norm_w(n):
        return 1.0 + normal((n,), _NORM_NOISE)

    H = cfg["hidden_size"]
    V = cfg["vocab_size"]
    I = cfg["intermediate_size"]
    nh = cfg["num_attention_heads"]
    nkv = cfg["num_key_value_heads"]
    hd = cfg["head_dim"]
    model_type = cfg["model_type"]
    tied = bool(cfg.get("tie_word_embeddings", False))
    qkv_bias = model_type == "qwen2" or bool(cfg.get("attention_bias", False))
    o_bias = model_type != "qwen2" and bool(cfg.get("attention_bias", False))
    mlp_bias = bool(cfg.get("mlp_bias", False))
    qk_norm = model_type in ("qwen3", "qwen3_moe")

    w: dict[str, torch.Tensor] = {}
    # Tied: small embedding rows (so the residual copy of the current token
    # does not dominate the logits and make greedy decoding repeat itself),
    # with the logit scale carried by the final norm's weight instead.
    embed_row_norm = _TIED_EMBED_ROW_NORM if tied else _EMBED_STD * math.sqrt(H)
    embed = unit_rows(normal((V, H), 1.0), embed_row_norm)
    # Rows past the tokenizer are padding ids: zero them so they get logit 0
    # (never the argmax in practice) and have no meaningful embedding.
    embed[n_real_tokens:] = 0.0
    w["model.embed_tokens.weight"] = embed
    for i in range(cfg["num_hidden_layers"]):
        pre = f"model.layers.{i}."
        w[pre + "input_layernorm.weight"] = norm_w(H)
        w[pre + "self_attn.q_proj.weight"] = linear(nh * hd, H)
        w[pre + "self_attn.k_proj.weight"] = linear(nkv * hd, H)
        w[pre + "self_attn.v_proj.weight"] = linear(nkv * hd, H)
        if qkv_bias:
            w[pre + "self_attn.q_proj.bias"] = normal((nh * hd,), _BIAS_STD)
            w[pre + "self_attn.k_proj.bias"] = normal((nkv * hd,), _BIAS_STD)
            w[pre + "self_attn.v_proj.bias"] = normal((nkv * hd,), _BIAS_STD)
        w[pre + "self_attn.o_proj.weight"] = out_linear(H, nh * hd)
        if o_bias:
            w[pre + "self_attn.o_proj.bias"] = normal((H,), _BIAS_STD)
        if qk_norm:
            w[pre + "self_attn.q_norm.weight"] = norm_w(hd)
            w[pre + "self_attn.k_norm.weight"] = norm_w(hd)
        w[pre + "post_attention_layernorm.weight"] = norm_w(H)
        if _is_sparse(cfg, i):
            w.update(_moe_weights(cfg, pre, linear, out_linear, normal))
            continue
        w[pre + "mlp.gate_proj.weight"] = linear(I, H)
        w[pre + "mlp.up_proj.weight"] = linear(I, H)
        w[pre + "mlp.down_proj.weight"] = out_linear(H, I)
        if mlp_bias:
            w[pre + "mlp.gate_proj.bias"] = normal((I,), _BIAS_STD)
            w[pre + "mlp.up_proj.bias"] = normal((I,), _BIAS_STD)
            w[pre + "mlp.down_proj.bias"] = normal((H,), _BIAS_STD)
    final_scale = (_LM_HEAD_LOGIT_STD / _TIED_EMBED_ROW_NORM) if tied else 1.0
    w["model.norm.weight"] = norm_w(H) * final_scale
    if not tied:
        lm = unit_rows(normal((V, H), 1.0), _LM_HEAD_LOGIT_STD)
        lm[n_real_tokens:] = 0.0
        w["lm_head.weight"] = lm
    return w


def _is_sparse(cfg: dict[str, Any], layer: int) -> bool:
    """Whether `layer` has a MoE block (HF's rule: Mixtral every layer; Qwen3-MoE unless listed in
    mlp_only_layers, and only every decoder_sparse_step-th layer)."""
    if cfg["model_type"] == "mixtral":
        return True
    if cfg["model_type"] != "qwen3_moe":
        return False
    step = int(cfg.get("decoder_sparse_step") or 1)
    return layer not in (cfg.get("mlp_only_layers") or []) and (layer + 1) % step == 0


def _moe_weights(cfg: dict[str, Any], pre: str, linear, out_linear, normal) -> dict:
    """One layer's router and experts under the hub checkpoints' per-expert names. Router logits
    have std ~_ROUTER_GAIN for unit-rms input: a clear top-2, rarely a near tie."""
    H = cfg["hidden_size"]
    if cfg["model_type"] == "mixtral":
        E, I, block = cfg["num_local_experts"], cfg["intermediate_size"], "block_sparse_moe"
        names = ("w1", "w3", "w2")
    else:
        E, I, block = cfg["num_experts"], cfg["moe_intermediate_size"], "mlp"
        names = ("gate_proj", "up_proj", "down_proj")
    w = {f"{pre}{block}.gate.weight": normal((E, H), _ROUTER_GAIN / math.sqrt(H))}
    for e in range(E):
        ex = f"{pre}{block}.experts.{e}."
        w[ex + names[0] + ".weight"] = linear(I, H)
        w[ex + names[1] + ".weight"] = linear(I, H)
        w[ex + names[2] + ".weight"] = out_linear(H, I)
    return w


# ---------------------------------------------------------------------------
# Public entry point


def make_tiny_model(out_dir, arch: str = "llama", size: str = "tiny", seed: int = 0,
                    dtype: str = "float32", chat_template_style: str = "chatml",
                    **config_overrides: Any) -> pathlib.Path:
    """Write a random-weight HF checkpoint + tokenizer to ``out_dir``; return its path.

    ``config_overrides`` replace config.json fields before the weights are
    generated (e.g. ``num_key_value_heads=1`` for MQA,
    ``tie_word_embeddings=True``, ``num_hidden_layers=1``), so the weights
    always match the written config. ``chat_template_style`` picks the chat
    template (tiny_tokenizer.CHAT_TEMPLATES: ChatML, or ChatML with Qwen3's or
    DeepSeek-R1's think block in the generation prompt).
    """
    import torch
    from safetensors.torch import save_file

    tok_config = tokenizer_config(0, chat_template_style)  # an unknown style fails before any work
    cfg = build_config(arch, size, dtype, **config_overrides)
    tok_vocab = _TOKENIZER_VOCAB[size]
    tok_json = get_tokenizer_json(tok_vocab)

    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    tdtype = getattr(torch, dtype)
    weights = _make_weights(cfg, seed, tok_vocab)
    weights = {k: v.to(tdtype).contiguous() for k, v in weights.items()}
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})

    def dump(name: str, obj: Any) -> None:
        (out / name).write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    dump("config.json", cfg)
    gen = {
        "bos_token_id": cfg["bos_token_id"],
        "eos_token_id": [EOS_TOKEN_ID, IM_END_ID],
        "pad_token_id": EOS_TOKEN_ID,
    }
    if "transformers_version" in cfg:
        gen["transformers_version"] = cfg["transformers_version"]
    dump("generation_config.json", gen)
    (out / "tokenizer.json").write_text(tok_json, encoding="utf-8")
    dump("tokenizer_config.json", {**tok_config, "model_max_length": cfg["max_position_embeddings"]})
    dump("special_tokens_map.json", special_tokens_map())
    return out


def _parse_override(s: str) -> tuple[str, Any]:
    if "=" not in s:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {s!r}")
    k, v = s.split("=", 1)
    try:
        val = json.loads(v)
    except json.JSONDecodeError:
        val = v
    return k, val


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m radixlm.tools.make_tiny_model",
        description="Write a tiny random-weight HuggingFace checkpoint with a BPE tokenizer.",
    )
    ap.add_argument("out", help="output directory")
    ap.add_argument("--arch", choices=ARCHS, default="llama")
    ap.add_argument("--size", choices=SIZES, default="tiny")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", choices=DTYPES, default="float32")
    ap.add_argument("--chat-template-style", choices=tuple(CHAT_TEMPLATES), default="chatml",
                    help="chat template: ChatML, or ChatML with Qwen3's / DeepSeek-R1's think block")
    ap.add_argument("--set", dest="overrides", action="append", type=_parse_override, default=[],
                    metavar="KEY=VALUE", help="override a config field (value parsed as JSON if possible)")
    args = ap.parse_args(argv)
    path = make_tiny_model(args.out, arch=args.arch, size=args.size, seed=args.seed,
                           dtype=args.dtype, chat_template_style=args.chat_template_style,
                           **dict(args.overrides))
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
