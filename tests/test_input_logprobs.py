"""Prompt logprobs (`logprob_start_len`) equal HF's, also when the prompt's prefix is cached and
when the prompt is prefilled in chunks; `max_new_tokens=0` scores a prompt without generating."""

from __future__ import annotations

import torch

import radixlm
from tests.conftest import random_prompts


def hf_prompt_logprobs(model, ids):
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    lps = torch.log_softmax(logits, -1)
    return [float(lps[p - 1, ids[p]]) for p in range(1, len(ids))]


def test_prompt_logprobs_match_hf(model_factory, hf_reference_factory):
    path = model_factory("qwen3")
    ref = hf_reference_factory(path)
    prompts = random_prompts(5, [6, 17, 90], ref.model.config.vocab_size)
    with radixlm.Engine(model_path=path, chunked_prefill_size=16, log_level="warning") as eng:
        for start in (0, 1, 5):
            for _round in range(2):  # the first round fills the cache; the second must still score
                outs = eng.generate(input_ids=prompts, sampling_params={"max_new_tokens": 0},
                                    return_logprob=True, logprob_start_len=start, top_logprobs_num=2)
                for p, o in zip(prompts, outs):
                    got = o["meta_info"]["input_token_logprobs"]
                    assert [t for _, t, _ in got] == p[start:]
                    vals = [lp for lp, _, _ in got]
                    if start == 0:
                        assert vals[0] is None
                        vals = vals[1:]
                    want = hf_prompt_logprobs(ref.model, p)[max(start, 1) - 1:]
                    assert len(vals) == len(want)
                    assert max(abs(a - b) for a, b in zip(vals, want)) < 1e-4
                    assert len(o["meta_info"]["input_top_logprobs"]) == len(got)
                    assert o["meta_info"]["completion_tokens"] == 0
        eng.check_integrity()


def test_prompt_logprobs_with_generation(model_factory, hf_reference_factory):
    path = model_factory("llama")
    ref = hf_reference_factory(path)
    prompt = random_prompts(9, [40], ref.model.config.vocab_size)[0]
    with radixlm.Engine(model_path=path, log_level="warning") as eng:
        eng.generate(input_ids=prompt, sampling_params={"max_new_tokens": 1})  # cache the prompt
        out = eng.generate(input_ids=prompt, sampling_params={"max_new_tokens": 4, "temperature": 0},
                           return_logprob=True, logprob_start_len=30)
    got = [lp for lp, _, _ in out["meta_info"]["input_token_logprobs"]]
    want = hf_prompt_logprobs(ref.model, prompt)[29:]
    assert len(got) == 10 and max(abs(a - b) for a, b in zip(got, want)) < 1e-4
    assert out["output_ids"] == ref.greedy(prompt, 4)[0]
    assert out["meta_info"]["cached_tokens"] == 29  # reuse stops where the scored positions begin
