"""Tests for radixlm.tools.make_tiny_model (offline tiny HF checkpoints)."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer  # declared dependency: no skip

from radixlm.tools import make_tiny_model as mtm
from radixlm.tools.make_tiny_model import make_tiny_model

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
ARCHS = ["llama", "qwen2", "qwen3", "mistral"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_models")
    return {arch: make_tiny_model(root / arch, arch=arch) for arch in ARCHS}


@pytest.fixture(scope="module")
def tok(built):
    return AutoTokenizer.from_pretrained(built["llama"])


def _config(path):
    return json.loads((pathlib.Path(path) / "config.json").read_text())


def _tensors(path):
    with safe_open(str(pathlib.Path(path) / "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_files_written(built):
    for path in built.values():
        names = {p.name for p in path.iterdir()}
        assert {
            "config.json",
            "generation_config.json",
            "model.safetensors",
            "tokenizer.json",
            "tokenizer_config.json",
            "special_tokens_map.json",
        } <= names


@pytest.mark.parametrize("arch", ARCHS)
def test_hf_load_and_greedy_generate(built, arch):
    path = built[arch]
    model, info = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    model.eval()
    tok = AutoTokenizer.from_pretrained(path)
    prompt = tok("The morning market", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(
            prompt, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0
        )
    gen = out[0, prompt.shape[1]:].tolist()
    assert len(gen) == 8
    assert len(set(gen)) > 1, gen
    assert all(t < len(tok) for t in gen), gen  # never a padding id
    # logits are finite and the top-1/top-2 gap is not degenerate
    with torch.no_grad():
        ids = torch.randint(3, len(tok), (2, 32), generator=torch.Generator().manual_seed(0))
        logits = model(ids).logits
    assert logits.shape[-1] == _config(path)["vocab_size"]
    assert torch.isfinite(logits).all()
    top2 = logits[..., : len(tok)].topk(2, dim=-1).values
    gap = top2[..., 0] - top2[..., 1]
    assert gap.median() > 0.1


@pytest.mark.parametrize("arch", ARCHS)
def test_config_common(built, arch):
    cfg = _config(built[arch])
    assert cfg["model_type"] == arch
    assert cfg["architectures"] == [
        {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
         "qwen3": "Qwen3ForCausalLM", "mistral": "MistralForCausalLM"}[arch]
    ]
    assert cfg["hidden_size"] == 96
    assert cfg["num_hidden_layers"] == 3
    assert cfg["num_attention_heads"] == 6
    assert cfg["num_key_value_heads"] == 2  # GQA 3:1
    assert cfg["intermediate_size"] == 200
    assert cfg["max_position_embeddings"] == 2048
    assert cfg["torch_dtype"] == cfg["dtype"] == "float32"
    assert cfg["eos_token_id"] == mtm.EOS_TOKEN_ID == 0
    assert cfg["bos_token_id"] == 0
    assert cfg["rope_theta"] > 0
    assert cfg["rms_norm_eps"] == (1e-5 if arch == "llama" else 1e-6)
    assert cfg["vocab_size"] >= 512
    gen = json.loads((built[arch] / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [0, 2]


def test_config_arch_specifics(built):
    llama = _config(built["llama"])
    assert llama["tie_word_embeddings"] is False
    assert llama["head_dim"] == 16
    assert llama["rope_scaling"] == {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 256,
    }
    assert "lm_head.weight" in _tensors(built["llama"])

    qwen2 = _config(built["qwen2"])
    assert qwen2["tie_word_embeddings"] is True
    t = _tensors(built["qwen2"])
    assert "lm_head.weight" not in t
    for name in ("q_proj", "k_proj", "v_proj"):
        b = t[f"model.layers.0.self_attn.{name}.bias"]
        assert b.abs().min() > 0 and b.std() > 0.01
    assert "model.layers.0.self_attn.o_proj.bias" not in t

    qwen3 = _config(built["qwen3"])
    assert qwen3["head_dim"] == 24 != qwen3["hidden_size"] // qwen3["num_attention_heads"]
    assert qwen3["tie_word_embeddings"] is False
    t = _tensors(built["qwen3"])
    assert t["model.layers.0.self_attn.q_proj.weight"].shape == (6 * 24, 96)
    assert t["model.layers.0.self_attn.k_proj.weight"].shape == (2 * 24, 96)
    assert t["model.layers.0.self_attn.o_proj.weight"].shape == (96, 6 * 24)
    qn = t["model.layers.0.self_attn.q_norm.weight"]
    kn = t["model.layers.0.self_attn.k_norm.weight"]
    assert qn.shape == kn.shape == (24,)
    assert not torch.allclose(qn, torch.ones_like(qn))
    assert "model.layers.0.self_attn.q_proj.bias" not in t

    mistral = _config(built["mistral"])
    assert mistral["sliding_window"] is None
    assert mistral["tie_word_embeddings"] is False
    assert "lm_head.weight" in _tensors(built["mistral"])


def test_padded_vocab_rows(built, tok):
    cfg = _config(built["llama"])
    t = _tensors(built["llama"])
    assert t["model.embed_tokens.weight"].shape == (cfg["vocab_size"], 96)
    assert cfg["vocab_size"] > len(tok) == 512
    assert torch.all(t["lm_head.weight"][len(tok):] == 0)
    assert torch.all(t["lm_head.weight"][: len(tok)].norm(dim=-1) > 0)


def test_llama3_rope_scaling_matters(built, tmp_path):
    plain = make_tiny_model(tmp_path / "plain", arch="llama", rope_scaling=None)
    a = AutoModelForCausalLM.from_pretrained(built["llama"], dtype=torch.float32).eval()
    b = AutoModelForCausalLM.from_pretrained(plain, dtype=torch.float32).eval()
    ids = torch.randint(3, 512, (1, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (a(ids).logits - b(ids).logits).abs().amax(-1)[0]
    assert diff[0] < 1e-4  # position 0: rope is the identity
    assert diff[8:].min() > 1e-2


def test_special_tokens(tok):
    assert len(tok) == 512
    assert tok.eos_token == "<|endoftext|>" and tok.eos_token_id == 0
    assert tok.pad_token_id == 0
    assert tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [1, 2]
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2
    assert tok.decode(ids, skip_special_tokens=True) == "user\nhi"


def test_chat_template(tok):
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "tool", "content": '{"ok": true}'},
        {"role": "user", "content": "Thanks"},
    ]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n"
        '<|im_start|>tool\n{"ok": true}<|im_end|>\n'
        "<|im_start|>user\nThanks<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    no_prompt = tok.apply_chat_template(msgs[:2], tokenize=False, add_generation_prompt=False)
    assert no_prompt == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    ids = tok.apply_chat_template(msgs[1:2], tokenize=True, add_generation_prompt=True)
    if not isinstance(ids, list):  # transformers 5 returns a BatchEncoding
        ids = ids["input_ids"]
    assert ids[0] == 1 and tok.decode(ids) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    # list-of-parts content and tools
    parts = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    assert tok.apply_chat_template(parts, tokenize=False) == "<|im_start|>user\nab<|im_end|>\n"
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
    with_tools = tok.apply_chat_template(msgs[1:2], tools=tools, tokenize=False, add_generation_prompt=True)
    assert with_tools.startswith("<|im_start|>system\n# Tools") and '"get_weather"' in with_tools
    assert with_tools.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize(
    "text", ["héllo 世界", "Hello, world!", "  two  spaces\n\ttab\r\n", "emoji 🎉", "", "{\"a\": [1, 2.5, null]}"]
)
def test_roundtrip_examples(tok, text):
    assert tok.decode(tok.encode(text)) == text


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=60))
def test_roundtrip_property(tok, text):
    ids = tok.encode(text)
    assert all(0 <= i < len(tok) for i in ids)
    assert tok.decode(ids) == text


def test_tokenizer_deterministic_and_compressive():
    a = mtm.get_tokenizer_json(512)
    b = mtm.get_tokenizer_json.__wrapped__(512)  # retrain, bypassing the cache
    assert a == b
    from tokenizers import Tokenizer

    t = Tokenizer.from_str(a)
    sentence = "The river winds slowly through the forest toward the sea."
    assert len(t.encode(sentence).ids) < len(sentence) / 2


def test_bfloat16_dtype(tmp_path):
    path = make_tiny_model(tmp_path / "bf16", arch="qwen2", dtype="bfloat16")
    cfg = _config(path)
    assert cfg["torch_dtype"] == cfg["dtype"] == "bfloat16"
    t = _tensors(path)
    assert {v.dtype for v in t.values()} == {torch.bfloat16}
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    assert next(model.parameters()).dtype == torch.bfloat16


def test_seed_and_overrides(tmp_path, built):
    same = make_tiny_model(tmp_path / "same", arch="llama", seed=0)
    other = make_tiny_model(tmp_path / "other", arch="llama", seed=1)
    base = (built["llama"] / "model.safetensors").read_bytes()
    assert (same / "model.safetensors").read_bytes() == base
    assert (other / "model.safetensors").read_bytes() != base

    mqa = make_tiny_model(tmp_path / "mqa", arch="mistral", num_key_value_heads=1, tie_word_embeddings=True)
    cfg = _config(mqa)
    assert cfg["num_key_value_heads"] == 1 and cfg["tie_word_embeddings"] is True
    t = _tensors(mqa)
    assert t["model.layers.0.self_attn.k_proj.weight"].shape == (16, 96)
    assert "lm_head.weight" not in t
    model, info = AutoModelForCausalLM.from_pretrained(mqa, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_small_size_config(tmp_path):
    path = make_tiny_model(tmp_path / "small", arch="qwen3", size="small")
    cfg = _config(path)
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"],
            cfg["num_key_value_heads"], cfg["intermediate_size"]) == (256, 4, 8, 2, 688)
    assert cfg["head_dim"] != 256 // 8
    tok = AutoTokenizer.from_pretrained(path)
    assert len(tok) == 2048 <= cfg["vocab_size"]


def test_cli(tmp_path, built):
    out = tmp_path / "cli_model"
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-m", "radixlm.tools.make_tiny_model", str(out), "--arch", "llama", "--seed", "0"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    # A separate process produces byte-identical weights and tokenizer.
    for name in ("model.safetensors", "tokenizer.json"):
        assert (out / name).read_bytes() == (built["llama"] / name).read_bytes()
    assert _config(out)["model_type"] == "llama"
