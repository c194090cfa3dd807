"""RoPE scaling: YaRN tables equal HF transformers' and greedy output matches HF past the original
context; every layer shares one cos/sin table."""

from __future__ import annotations

import pytest
import torch

import radixlm
from radixlm.layers.rotary_embedding import RotaryEmbedding, compute_inv_freq_and_scale
from tests.conftest import assert_matches_hf, greedy_run, random_prompts

YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}


@pytest.fixture(scope="module")
def yarn_model(tmp_path_factory):
    """arch -> a tiny checkpoint with YaRN x4 over an original context of 64 (conftest's
    model_factory keys on hashable overrides only)."""
    from radixlm.tools.make_tiny_model import make_tiny_model

    cache = {}

    def get(arch):
        if arch not in cache:
            cache[arch] = str(make_tiny_model(tmp_path_factory.mktemp(f"{arch}_yarn"), arch=arch,
                                              rope_scaling=dict(YARN), max_position_embeddings=256))
        return cache[arch]

    return get


@pytest.mark.parametrize("scaling", [
    YARN,
    {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 32, "beta_fast": 16, "beta_slow": 2},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "attention_factor": 1.3},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "mscale": 1.0,
     "mscale_all_dim": 0.5},
    {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 128, "truncate": False},
], ids=["plain", "betas", "attn_factor", "mscale", "no_truncate"])
def test_yarn_parameters_match_hf(scaling):
    from transformers import Qwen3Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = Qwen3Config(hidden_size=96, num_attention_heads=4, head_dim=32, max_position_embeddings=256,
                      rope_theta=10000.0, rope_scaling=dict(scaling))
    want_inv, want_scale = ROPE_INIT_FUNCTIONS["yarn"](cfg, "cpu")
    got_inv, got_scale = compute_inv_freq_and_scale(32, 10000.0, scaling, 256)
    torch.testing.assert_close(got_inv, want_inv.float(), atol=0, rtol=1e-6)
    assert got_scale == pytest.approx(want_scale, rel=1e-7)


def test_dynamic_is_refused_clearly():
    with pytest.raises(NotImplementedError, match="dynamic"):
        RotaryEmbedding(16, 64, 10000.0, {"rope_type": "dynamic", "factor": 2.0})


@pytest.mark.parametrize("arch", ["qwen3", "qwen2"])
def test_yarn_greedy_matches_hf_past_original_context(yarn_model, hf_reference_factory, arch):
    path = yarn_model(arch)
    ref = hf_reference_factory(path)
    assert ref.model.config.rope_parameters["rope_type"] == "yarn"
    prompts = random_prompts(5, [10, 70, 150, 200], ref.model.config.vocab_size)  # past position 64
    with radixlm.Engine(model_path=path, log_level="warning", chunked_prefill_size=64) as eng:
        assert_matches_hf(greedy_run(eng, prompts, 8), prompts, ref, 8)


def test_one_cos_sin_table_shared_by_all_layers(yarn_model):
    from radixlm.models.loader import load_model
    from radixlm.models.model_config import ModelConfig

    path = yarn_model("qwen3")
    model = load_model(ModelConfig.from_path(path, dtype="float32"), "cpu")
    ropes = {id(layer.self_attn.rotary_emb) for layer in model.model.layers}
    ptrs = {layer.self_attn.rotary_emb.cos_cache.data_ptr() for layer in model.model.layers}
    assert len(model.model.layers) > 1 and len(ropes) == 1 and len(ptrs) == 1
    assert sum(b.numel() for b in model.buffers()) == 2 * 256 * 24  # one cos + one sin table
