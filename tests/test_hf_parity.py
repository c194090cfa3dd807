"""Greedy output of radixlm equals HF transformers' on the same checkpoint, for every supported
architecture and under every scheduling regime: default, chunked prefill, radix cache off, cache
hits on a second round, and a KV pool small enough to force retraction."""

from __future__ import annotations

import pytest

import radixlm
from tests.conftest import ARCHS, assert_matches_hf, greedy_run, random_prompts

LENGTHS = [1, 2, 7, 33, 64, 129, 200, 300]
NEW = 12


def engine(path, **kw):
    return radixlm.Engine(model_path=path, log_level="warning", **kw)


@pytest.fixture(scope="module", params=ARCHS)
def arch_setup(request, model_factory, hf_reference_factory):
    path = model_factory(request.param)
    ref = hf_reference_factory(path)
    prompts = random_prompts(7, LENGTHS, ref.model.config.vocab_size)
    return path, ref, prompts


@pytest.mark.parametrize("kw", [
    {},
    {"chunked_prefill_size": 16},
    {"disable_radix_cache": True},
    {"schedule_policy": "fcfs", "max_running_requests": 3},
    {"enable_mixed_chunk": True, "chunked_prefill_size": 32, "max_running_requests": 4},
], ids=["default", "chunked16", "no_radix", "fcfs_max3", "mixed_chunk"])
def test_greedy_matches_hf(arch_setup, kw):
    path, ref, prompts = arch_setup
    with engine(path, **kw) as eng:
        outs = greedy_run(eng, prompts, NEW)
        assert_matches_hf(outs, prompts, ref, NEW)
        eng.check_integrity()
        if kw.get("enable_mixed_chunk"):
            assert eng.scheduler.stats.num_mixed_batches > 0


def test_second_round_hits_cache(arch_setup):
    path, ref, prompts = arch_setup
    with engine(path, chunked_prefill_size=64) as eng:
        first = greedy_run(eng, prompts, NEW)
        assert_matches_hf(first, prompts, ref, NEW)
        second = [p + o["output_ids"] + p[:5] for p, o in zip(prompts, first)]
        outs = greedy_run(eng, second, NEW)
        assert_matches_hf(outs, second, ref, NEW)
        for p, o in zip(prompts, outs):
            # the tree holds prompt + all but the last output token of round one
            assert o["meta_info"]["cached_tokens"] >= len(p) + NEW - 1
        info = eng.get_server_info()
        assert info["cache_hit_rate"] > 0.4
        eng.check_integrity()


def test_retraction_keeps_greedy_output(arch_setup):
    path, ref, _ = arch_setup
    prompts = random_prompts(11, [30, 41, 52, 63, 35, 47, 58, 33], ref.model.config.vocab_size)
    new = 40
    with engine(path, max_total_tokens=300, schedule_conservativeness=0.01) as eng:
        outs = greedy_run(eng, prompts, new)
        assert eng.get_server_info()["num_retractions"] > 0
        assert_matches_hf(outs, prompts, ref, new)
        assert any(o["meta_info"].get("num_retractions") for o in outs)
        eng.check_integrity()
        info = eng.get_server_info()
        assert info["free_kv_tokens"] + info["evictable_kv_tokens"] == info["max_total_num_tokens"]


@pytest.mark.parametrize("overrides", [
    {"num_key_value_heads": 1},
    {"tie_word_embeddings": True},
], ids=["mqa", "tied"])
def test_variants_match_hf(model_factory, hf_reference_factory, overrides):
    path = model_factory("llama", **overrides)
    ref = hf_reference_factory(path)
    prompts = random_prompts(3, [5, 50, 120], ref.model.config.vocab_size)
    with engine(path) as eng:
        assert_matches_hf(greedy_run(eng, prompts, NEW), prompts, ref, NEW)


def test_hf_generate_with_eos(model_factory, hf_reference_factory):
    """Without ignore_eos, output stops exactly where HF's generate stops."""
    path = model_factory("qwen2")
    ref = hf_reference_factory(path)
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(path)
    texts = ["Hello", "Once upon a time", "The weather today is"]
    with engine(path) as eng:
        outs = eng.generate(prompt=texts, sampling_params={"temperature": 0, "max_new_tokens": 40})
    for text, out in zip(texts, outs):
        ids = tok(text, return_tensors="pt").input_ids
        want = ref.model.generate(ids, max_new_tokens=40, do_sample=False)[0, ids.shape[1]:].tolist()
        assert out["output_ids"] == want
        if out["meta_info"]["finish_reason"]["type"] == "stop":
            assert want[-1] in (ref.model.generation_config.eos_token_id if isinstance(
                ref.model.generation_config.eos_token_id, list) else [ref.model.generation_config.eos_token_id])
        assert out["text"] == tok.decode(out["output_ids"], skip_special_tokens=True)


def test_failing_batch_frees_its_memory_and_others_continue(model_factory, monkeypatch):
    """A forward that raises aborts that batch's requests, returns their KV, and the engine keeps
    serving later requests with unchanged output."""
    path = model_factory("llama")
    with engine(path) as eng:
        prompts = random_prompts(4, [20, 30], 515)
        want = greedy_run(eng, prompts, 6)
        real = eng.scheduler.runner.forward_and_sample
        calls = {"n": 0}

        def flaky(batch, **kw):
            calls["n"] += 1
            if calls["n"] == 3:
                raise RuntimeError("simulated device error")
            return real(batch, **kw)

        monkeypatch.setattr(eng.scheduler.runner, "forward_and_sample", flaky)
        outs = eng.generate(input_ids=prompts, sampling_params={"max_new_tokens": 6, "temperature": 0})
        assert all(o["meta_info"]["finish_reason"]["type"] == "abort" for o in outs)
        assert "simulated device error" in outs[0]["meta_info"]["finish_reason"]["message"]
        eng.check_integrity()
        again = greedy_run(eng, prompts, 6)
        assert [o["output_ids"] for o in again] == [o["output_ids"] for o in want]
        eng.check_integrity()
