"""Sliding-window attention (Mistral `sliding_window`; Qwen2 `use_sliding_window` on layers >=
`max_window_layers`): greedy output matches HF transformers on prompts longer than the window, in
one prefill, chunked, and from a radix-cache hit whose cached prefix is longer than the window."""

from __future__ import annotations

import pytest

import radixlm
from radixlm.models.model_config import ModelConfig
from tests.conftest import assert_matches_hf, greedy_run, random_prompts

WINDOW = 16
SETUPS = {
    "mistral": dict(sliding_window=WINDOW),
    "qwen2": dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1),
}
NEW = 10


@pytest.fixture(scope="module", params=sorted(SETUPS))
def sw_setup(request, model_factory, hf_reference_factory):
    path = model_factory(request.param, **SETUPS[request.param])
    ref = hf_reference_factory(path)
    prompts = random_prompts(9, [5, 15, 16, 17, 40, 90], ref.model.config.vocab_size)
    return request.param, path, ref, prompts


def test_config_windows_follow_hf(sw_setup):
    arch, path, ref, _ = sw_setup
    cfg = ModelConfig.from_path(path)
    got = ["sliding_attention" if cfg.sliding_window_for_layer(i) else "full_attention"
           for i in range(cfg.num_layers)]
    want = getattr(ref.model.config, "layer_types", None) or ["sliding_attention"] * cfg.num_layers
    assert got == want
    assert len(set(got)) == (2 if arch == "qwen2" else 1)  # qwen2: full layer 0, windowed 1..


def test_qwen2_window_off_without_use_sliding_window(model_factory):
    cfg = ModelConfig.from_path(model_factory("qwen2", sliding_window=WINDOW, max_window_layers=0))
    assert all(cfg.sliding_window_for_layer(i) is None for i in range(cfg.num_layers))


@pytest.mark.parametrize("kw", [{}, {"chunked_prefill_size": 8}], ids=["default", "chunked8"])
def test_greedy_matches_hf_past_window(sw_setup, kw):
    _, path, ref, prompts = sw_setup
    with radixlm.Engine(model_path=path, log_level="warning", **kw) as eng:
        assert_matches_hf(greedy_run(eng, prompts, NEW), prompts, ref, NEW)
        eng.check_integrity()


def test_cache_hit_across_window_boundary(sw_setup):
    """Round two extends round one's prompt + output (all cached, far longer than the window)."""
    _, path, ref, prompts = sw_setup
    with radixlm.Engine(model_path=path, log_level="warning") as eng:
        first = greedy_run(eng, prompts, NEW)
        second = [p + o["output_ids"] + p[:3] for p, o in zip(prompts, first)]
        outs = greedy_run(eng, second, NEW)
        assert_matches_hf(outs, second, ref, NEW)
        long_hits = [o["meta_info"]["cached_tokens"] for p, o in zip(prompts, outs) if len(p) > WINDOW]
        assert long_hits and all(c > WINDOW for c in long_hits)
        eng.check_integrity()
