"""Overlap scheduling (`--disable-overlap-schedule` to turn off): decode step N+1 computes while the
scheduler processes step N. Outputs must be the same as without overlap (greedy and seeded
sampling), requests that stop on a token the host had not seen yet (zombies) must give back all
their KV, and aborts, failures and retraction must behave as in the synchronous scheduler."""

from __future__ import annotations

import random

import pytest

import radixlm
from tests.conftest import random_prompts

VOCAB = 515  # the tiny llama's vocabulary


def engine(path, overlap: bool, **kw):
    kw = {"enable_mixed_chunk": False, **kw}  # (the CPU default mixes; these tests pin the GPU default unless asked)
    return radixlm.Engine(model_path=path, log_level="warning", disable_overlap_schedule=not overlap, **kw)


def mixed_params(n: int, seed: int):
    """Random lengths, stop tokens that fire early for some, a few sampled rows with seeds."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        sp = {"temperature": 0, "max_new_tokens": rng.randrange(1, 40),
              "stop_token_ids": [rng.randrange(VOCAB) for _ in range(12)]}
        if i % 4 == 3:
            sp.update(temperature=0.9, top_p=0.9, sampling_seed=1000 + i)
        out.append(sp)
    return out


def outputs(eng, prompts, params):
    outs = eng.generate(input_ids=prompts, sampling_params=params)
    return [(o["output_ids"], o["meta_info"]["finish_reason"]["type"]) for o in outs]


def idle_and_clean(eng):
    eng.check_integrity()
    assert eng.flush_cache()
    s = eng.scheduler
    assert s.allocator.available_size() == s.allocator.size


@pytest.mark.parametrize("kw", [{}, {"chunked_prefill_size": 16}, {"disable_radix_cache": True},
                                {"max_running_requests": 3}, {"enable_mixed_chunk": True, "chunked_prefill_size": 24}],
                         ids=["default", "chunked16", "no_radix", "max_running3", "mixed_chunk"])
def test_same_outputs_with_and_without_overlap(path, kw):
    prompts = random_prompts(11, [1, 3, 9, 17, 30, 44, 60, 71, 90, 5, 12, 128], VOCAB)
    params = mixed_params(len(prompts), seed=3)
    got = {}
    for overlap in (False, True):
        with engine(path, overlap, **kw) as eng:
            got[overlap] = outputs(eng, prompts, params)
            stats = eng.scheduler.stats
            if overlap:
                assert stats.num_overlapped_batches > 0
                got["zombies"] = stats.num_overlap_zombies
            else:
                assert stats.num_overlapped_batches == 0
            idle_and_clean(eng)
    assert got[True] == got[False]
    assert any(reason == "stop" for _, reason in got[True])  # early stops happened...
    if not kw.get("max_running_requests") and not kw.get("enable_mixed_chunk"):
        assert got["zombies"] > 0  # ...and some of them inside an overlapped step


def test_second_round_reuses_the_zombie_kv(path):
    """A zombie's extra step computed its last token's KV, which goes into the radix cache: asking
    again with prompt + full output hits all of it except the last position."""
    prompts = random_prompts(5, [40, 41, 42, 43], VOCAB)
    with engine(path, True) as eng:
        first = eng.generate(input_ids=prompts, sampling_params={"temperature": 0, "max_new_tokens": 30,
                                                               "stop_token_ids": list(range(0, VOCAB, 7))})
        assert eng.scheduler.stats.num_overlap_zombies > 0
        again = [p + o["output_ids"] for p, o in zip(prompts, first)]
        outs = eng.generate(input_ids=again, sampling_params={"temperature": 0, "max_new_tokens": 1})
        for seq, o in zip(again, outs):
            assert o["meta_info"]["cached_tokens"] == len(seq) - 1
        idle_and_clean(eng)


def test_constrained_and_penalised_requests_beside_overlapped_ones(path):
    """Requests whose next step needs the host (regex grammar, penalties, min_new_tokens) turn
    chaining off while they run; outputs still match the synchronous scheduler."""
    prompts = random_prompts(12, [10, 20, 30, 40, 50, 60], VOCAB)
    params = [{"temperature": 0, "max_new_tokens": 24},
              {"temperature": 0, "max_new_tokens": 8, "regex": "(ab|cd)+e"},
              {"temperature": 0, "max_new_tokens": 24, "frequency_penalty": 0.5},
              {"temperature": 0, "max_new_tokens": 24, "min_new_tokens": 12, "stop_token_ids": [1, 2, 3]},
              {"temperature": 0, "max_new_tokens": 30, "repetition_penalty": 1.3},
              {"temperature": 0, "max_new_tokens": 40}]
    got = {}
    for overlap in (False, True):
        with engine(path, overlap) as eng:
            got[overlap] = outputs(eng, prompts, params)
            idle_and_clean(eng)
    assert got[True] == got[False]


def test_retraction_under_overlap(path):
    """A pool too small for every request forces retraction; outputs equal the roomy run's."""
    prompts = random_prompts(13, [30, 41, 52, 63, 35, 47, 58, 33], VOCAB)
    params = {"temperature": 0, "max_new_tokens": 40, "ignore_eos": True}
    with engine(path, True) as eng:
        want = outputs(eng, prompts, params)
    with engine(path, True, max_total_tokens=300, schedule_conservativeness=0.01) as eng:
        assert outputs(eng, prompts, params) == want
        assert eng.scheduler.stats.num_retractions > 0
        idle_and_clean(eng)


def test_abort_while_a_step_is_in_flight(path):
    with engine(path, True) as eng:
        prompts = random_prompts(17, [20, 25, 30], VOCAB)
        it = eng.generate(input_ids=prompts[0], sampling_params={"temperature": 0, "max_new_tokens": 500,
                                                                 "ignore_eos": True}, stream=True, rid="long")
        others = None
        chunks = []
        for i, chunk in enumerate(it):
            chunks.append(chunk)
            if i == 5:
                eng.abort_request("long")
                others = eng.generate(input_ids=prompts[1:], sampling_params={"temperature": 0,
                                                                             "max_new_tokens": 10})
        assert all(len(o["output_ids"]) == 10 or o["meta_info"]["finish_reason"]["type"] == "stop" for o in others)
        # the aborted request ended with `abort`, early: not run on towards its 500 tokens
        last = chunks[-1]["meta_info"]
        assert last["finish_reason"]["type"] == "abort", last
        assert all(c["meta_info"]["finish_reason"] is None for c in chunks[:-1])
        generated = sum(len(c["output_ids"]) for c in chunks)
        assert generated == last["completion_tokens"] < 100, (generated, last)
        idle_and_clean(eng)


def test_failure_in_a_chained_step_aborts_only_its_requests(path, monkeypatch):
    prompts = random_prompts(19, [15, 25], VOCAB)
    params = {"temperature": 0, "max_new_tokens": 12, "ignore_eos": True}
    with engine(path, True) as eng:
        want = outputs(eng, prompts, params)
        real = eng.scheduler.runner.forward_and_sample
        calls = {"n": 0}

        def flaky(batch, **kw):
            calls["n"] += 1
            if calls["n"] == 4:  # a decode step several steps in, chained after the previous one
                raise RuntimeError("simulated device error")
            return real(batch, **kw)

        monkeypatch.setattr(eng.scheduler.runner, "forward_and_sample", flaky)
        outs = eng.generate(input_ids=prompts, sampling_params=params)
        assert all(o["meta_info"]["finish_reason"]["type"] == "abort" for o in outs)
        assert all("simulated device error" in o["meta_info"]["finish_reason"]["message"] for o in outs)
        eng.check_integrity()
        monkeypatch.setattr(eng.scheduler.runner, "forward_and_sample", real)
        assert outputs(eng, prompts, params) == want
        idle_and_clean(eng)
