"""Sampling parameters as a user sees them through `Engine.generate`: greedy, seeds, top-k / top-p /
min-p, logit_bias, the three penalties (checked against a step-by-step recomputation on the HF
model's logits), min_new_tokens, stop tokens and stop strings, ignore_eos, max_new_tokens=0, n and
logprobs. One engine (tiny llama checkpoint) serves the whole module."""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Dict, List

import pytest
import torch

from tests.conftest import random_prompts

SPECIAL = (0, 1, 2)  # <|endoftext|> (eos), <|im_start|>, <|im_end|> (eos)
EOS = 0

TEXT_PROMPTS = ["The quick brown fox", "Once upon a time", "Hello world, this is", "In the beginning"]


@pytest.fixture(scope="module")
def ref(path, hf_reference_factory):
    return hf_reference_factory(path)


@pytest.fixture(scope="module")
def vocab(eng):
    return eng.model_config.vocab_size


def prompts_for(seed: int, lengths: List[int], vocab: int) -> List[List[int]]:
    return random_prompts(seed, lengths, vocab, avoid=SPECIAL)


def gen_ids(eng, ids, **sp) -> Dict:
    params = {"temperature": 0, "max_new_tokens": 16, "ignore_eos": True, **sp}
    return eng.generate(input_ids=ids, sampling_params=params)


# ---------------------------------------------------------------------------------- greedy
def test_greedy_equals_argmax(eng, ref, vocab):
    prompts = prompts_for(1, [3, 17, 40], vocab)
    outs = eng.generate(input_ids=prompts, sampling_params={"temperature": 0, "max_new_tokens": 12,
                                                            "ignore_eos": True},
                        return_logprob=True, top_logprobs_num=1)
    for p, o in zip(prompts, outs):
        assert o["output_ids"] == ref.greedy(p, 12)[0]
        tops = o["meta_info"]["output_top_logprobs"]
        assert [t[0][1] for t in tops] == o["output_ids"]  # every chosen id is the top-1 id


def test_greedy_is_deterministic_across_calls(eng, vocab):
    p = prompts_for(2, [21], vocab)[0]
    a = gen_ids(eng, p, max_new_tokens=20)
    b = gen_ids(eng, p, max_new_tokens=20)  # second call hits the radix cache
    assert b["meta_info"]["cached_tokens"] > 0
    assert a["output_ids"] == b["output_ids"]


# ---------------------------------------------------------------------------------- seeds
def test_same_seed_same_output_in_any_batch(eng, vocab):
    p, q1, q2, q3, q4 = prompts_for(3, [14, 9, 30, 5, 22], vocab)
    seeded = {"temperature": 1.0, "max_new_tokens": 24, "ignore_eos": True, "sampling_seed": 1234}
    free = {"temperature": 1.0, "max_new_tokens": 24, "ignore_eos": True}
    alone = eng.generate(input_ids=p, sampling_params=seeded)["output_ids"]
    # batched with unseeded requests, at a different position
    outs = eng.generate(input_ids=[q1, q2, p, q3],
                        sampling_params=[free, {**free, "max_new_tokens": 5}, seeded, free])
    assert outs[2]["output_ids"] == alone
    # joins while another request is already decoding (different prefill/decode mix)
    stream = eng.generate(input_ids=q4, sampling_params={**free, "max_new_tokens": 60}, stream=True)
    next(stream)
    mid = eng.generate(input_ids=p, sampling_params=seeded)["output_ids"]
    rest = list(stream)
    assert rest[-1]["meta_info"]["finish_reason"]["type"] == "length"
    assert mid == alone
    # "seed" (OpenAI's name) is the same thing
    assert eng.generate(input_ids=p, sampling_params={**free, "seed": 1234})["output_ids"] == alone


def test_different_seeds_different_outputs(eng, vocab):
    p = prompts_for(4, [12], vocab)[0]
    outs = [tuple(eng.generate(input_ids=p, sampling_params={"temperature": 1.0, "max_new_tokens": 24,
                                                             "ignore_eos": True, "sampling_seed": s})["output_ids"])
            for s in (1, 2, 3, 4)]
    assert len(set(outs)) == 4
    greedy = tuple(gen_ids(eng, p, max_new_tokens=24)["output_ids"])
    assert any(o != greedy for o in outs)


# ---------------------------------------------------------------------------------- filters
@pytest.mark.parametrize("filt", [{"top_k": 1}, {"top_p": 1e-6}, {"min_p": 0.999}, {"temperature": 1e-7}],
                         ids=["top_k=1", "top_p=1e-6", "min_p=0.999", "temperature=1e-7"])
def test_degenerate_filters_equal_greedy(eng, vocab, filt):
    prompts = prompts_for(5, [4, 19, 33], vocab)
    want = [o["output_ids"] for o in gen_ids(eng, prompts, max_new_tokens=16)]
    got = eng.generate(input_ids=prompts, sampling_params={"temperature": 1.5, "max_new_tokens": 16,
                                                           "ignore_eos": True, "sampling_seed": 7, **filt})
    assert [o["output_ids"] for o in got] == want


def test_top_k_3_samples_only_the_top_3(eng, vocab):
    """Every sampled token is among the 3 most likely; ranks 2 and 3 do occur, and rank 1 occurs
    as often as the renormalised top-3 distribution (at that temperature) predicts."""
    temp = 2.0
    prompts = prompts_for(6, [3, 8, 13, 18, 23, 28, 33, 38], vocab)
    sps = [{"temperature": temp, "top_k": 3, "max_new_tokens": 24, "ignore_eos": True, "sampling_seed": 100 + i}
           for i in range(len(prompts))]
    outs = eng.generate(input_ids=prompts, sampling_params=sps, return_logprob=True, top_logprobs_num=3)
    ranks = Counter()
    expect_rank1 = var_rank1 = 0.0
    for o in outs:
        tops = o["meta_info"]["output_top_logprobs"]
        assert len(tops) == len(o["output_ids"]) == 24
        for tid, top in zip(o["output_ids"], tops):
            ids = [t for _, t, _ in top]
            assert tid in ids, f"sampled {tid} outside the top-3 {ids}"
            ranks[ids.index(tid)] += 1
            w = [math.exp(lp / temp) for lp, _, _ in top]
            p1 = w[0] / sum(w)
            expect_rank1 += p1
            var_rank1 += p1 * (1 - p1)
    assert ranks[1] > 0 and ranks[2] > 0
    assert abs(ranks[0] - expect_rank1) < 4.5 * math.sqrt(var_rank1)


# ---------------------------------------------------------------------------------- logit_bias
def test_logit_bias_forces_token(eng, vocab):
    p = prompts_for(8, [10], vocab)[0]
    base = gen_ids(eng, p, max_new_tokens=6)["output_ids"]
    target = next(t for t in range(300, vocab) if t not in base)
    for key in (str(target), target):  # JSON-style string keys and int keys
        out = gen_ids(eng, p, max_new_tokens=6, logit_bias={key: 100.0})
        assert out["output_ids"] == [target] * 6
    # a negative bias bans the greedy choice
    out = gen_ids(eng, p, max_new_tokens=1, logit_bias={str(base[0]): -100.0})
    assert out["output_ids"][0] != base[0]


@pytest.mark.parametrize("bias", [{"abc": 1.0}, {"515": 1.0}, {"-1": 1.0}, {"5": float("nan")},
                                  {"5": float("inf")}, {"5": "big"}, [5, 1.0]],
                         ids=["non-int-key", "key=vocab", "negative-key", "nan", "inf", "str-value", "not-dict"])
def test_logit_bias_validation(eng, bias):
    with pytest.raises(ValueError, match="logit_bias"):
        eng.generate(input_ids=[5, 6, 7], sampling_params={"max_new_tokens": 2, "logit_bias": bias})


# ---------------------------------------------------------------------------------- penalties
@torch.inference_mode()
def penalised_greedy(model, prompt: List[int], n: int, rep: float = 1.0, freq: float = 0.0,
                     pres: float = 0.0) -> List[int]:
    """Greedy decoding on the HF model with HF's RepetitionPenaltyLogitsProcessor (over prompt and
    output) and OpenAI-style frequency/presence penalties (over output tokens)."""
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    seq, out = list(prompt), []
    for _ in range(n):
        ids = torch.tensor([seq])
        logits = model(input_ids=ids).logits[:, -1].float()
        if rep != 1.0:
            logits = RepetitionPenaltyLogitsProcessor(rep)(ids, logits)
        if out:
            counts = torch.bincount(torch.tensor(out), minlength=logits.shape[-1]).float()
            logits = logits - freq * counts - pres * (counts > 0).float()
        tid = int(logits[0].argmax())
        out.append(tid)
        seq.append(tid)
    return out


@pytest.mark.parametrize("pen", [{"repetition_penalty": 1.6}, {"repetition_penalty": 0.7},
                                 {"frequency_penalty": 2.0}, {"frequency_penalty": -2.0},
                                 {"presence_penalty": 2.0}],
                         ids=["rep1.6", "rep0.7", "freq2", "freq-2", "pres2"])
def test_penalties_match_manual_computation(eng, ref, vocab, pen):
    n = 24
    prompts = prompts_for(9, [6, 15, 27], vocab)
    got = [o["output_ids"] for o in gen_ids(eng, prompts, max_new_tokens=n, **pen)]
    plain = [o["output_ids"] for o in gen_ids(eng, prompts, max_new_tokens=n)]
    kw = {"rep": pen.get("repetition_penalty", 1.0), "freq": pen.get("frequency_penalty", 0.0),
          "pres": pen.get("presence_penalty", 0.0)}
    want = [penalised_greedy(ref.model, p, n, **kw) for p in prompts]
    assert got == want
    assert got != plain  # the penalty changed something


def test_positive_penalties_reduce_repetition(eng, vocab):
    prompts = prompts_for(10, [5, 11, 20, 31], vocab)
    n = 40

    def max_repeats(outs):
        return sum(max(Counter(o["output_ids"]).values()) for o in outs)

    plain = max_repeats(gen_ids(eng, prompts, max_new_tokens=n))
    for pen in ({"frequency_penalty": 2.0}, {"presence_penalty": 2.0}, {"repetition_penalty": 2.0}):
        assert max_repeats(gen_ids(eng, prompts, max_new_tokens=n, **pen)) < plain, pen


# ---------------------------------------------------------------------------------- EOS, stops
def test_min_new_tokens_blocks_eos(eng, vocab):
    p = prompts_for(11, [9], vocab)[0]
    force_eos = {"temperature": 0, "max_new_tokens": 20, "logit_bias": {str(EOS): 100.0}}
    out = eng.generate(input_ids=p, sampling_params=force_eos)
    assert out["output_ids"] == [EOS]
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": EOS}
    assert out["text"] == ""

    out = eng.generate(input_ids=p, sampling_params={**force_eos, "min_new_tokens": 5})
    ids = out["output_ids"]
    assert len(ids) == 6 and ids[5] == EOS
    assert not set(ids[:5]) & {0, 2}  # neither EOS id before min_new_tokens
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": EOS}
    assert out["meta_info"]["completion_tokens"] == 6


def test_min_new_tokens_blocks_stop_token_ids(eng, vocab):
    p = prompts_for(12, [9], vocab)[0]
    t = 400
    sp = {"temperature": 0, "max_new_tokens": 20, "logit_bias": {str(t): 100.0}, "stop_token_ids": [t]}
    assert eng.generate(input_ids=p, sampling_params=sp)["output_ids"] == [t]
    out = eng.generate(input_ids=p, sampling_params={**sp, "min_new_tokens": 3})
    assert len(out["output_ids"]) == 4 and out["output_ids"][3] == t and t not in out["output_ids"][:3]
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": t}


def test_ignore_eos(eng, vocab):
    p = prompts_for(13, [9], vocab)[0]
    out = eng.generate(input_ids=p, sampling_params={"temperature": 0, "max_new_tokens": 5, "ignore_eos": True,
                                                     "logit_bias": {str(EOS): 100.0}})
    assert out["output_ids"] == [EOS] * 5
    assert out["meta_info"]["finish_reason"] == {"type": "length", "length": 5}
    assert out["text"] == ""  # special tokens are skipped in the text
    shown = eng.generate(input_ids=p, sampling_params={"temperature": 0, "max_new_tokens": 2, "ignore_eos": True,
                                                       "logit_bias": {str(EOS): 100.0},
                                                       "skip_special_tokens": False})
    assert shown["text"].count("<|endoftext|>") == 2


def _greedy_text(eng, prompt, n=40):
    out = eng.generate(prompt, {"temperature": 0, "max_new_tokens": n, "ignore_eos": True})
    assert not set(out["output_ids"]) & set(SPECIAL)
    return out


def test_stop_token_ids(eng):
    full = _greedy_text(eng, TEXT_PROMPTS[0])
    g = full["output_ids"]
    t = g[5]
    k = g.index(t)
    sp = {"temperature": 0, "max_new_tokens": 40, "stop_token_ids": [t]}
    out = eng.generate(TEXT_PROMPTS[0], sp)
    assert out["output_ids"] == g[:k + 1]
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": t}
    assert out["text"] == eng.tokenizer.decode(g[:k])  # the stop token's text is trimmed
    kept = eng.generate(TEXT_PROMPTS[0], {**sp, "no_stop_trim": True})
    assert kept["output_ids"] == g[:k + 1]
    assert kept["text"] == eng.tokenizer.decode(g[:k + 1])


def _pick_stop(text: str, start: int = 8) -> tuple:
    """A 3-char run of letters/spaces from the middle of text, with its first position."""
    for m in re.finditer(r"(?=([A-Za-z ]{3}))", text):
        s = m.group(1)
        p = text.find(s)
        if p >= start and s.strip():
            return s, p
    raise AssertionError(f"no usable stop string in {text!r}")


@pytest.mark.parametrize("prompt", TEXT_PROMPTS[:3])
def test_stop_string(eng, prompt):
    full = _greedy_text(eng, prompt)
    s, p = _pick_stop(full["text"])
    sp = {"temperature": 0, "max_new_tokens": 40, "ignore_eos": True, "stop": s}
    out = eng.generate(prompt, sp)
    assert out["text"] == full["text"][:p]
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": s}
    assert len(out["output_ids"]) < len(full["output_ids"])
    assert full["output_ids"][:len(out["output_ids"])] == out["output_ids"]
    # streamed: the stop string never reaches the client, the pieces add up to the same text
    chunks = list(eng.generate(prompt, sp, stream=True))
    assert "".join(c["text"] for c in chunks) == out["text"]
    assert all(s not in c["text"] for c in chunks)
    # a list of stops: the one that occurs first wins
    later = full["text"][p + 6:p + 9]
    out2 = eng.generate(prompt, {**sp, "stop": [later, s]} if later and later != s else sp)
    assert out2["text"] == full["text"][:p]
    assert out2["meta_info"]["finish_reason"]["matched"] == s


def test_no_stop_trim_keeps_stop_string(eng):
    prompt = TEXT_PROMPTS[1]
    full = _greedy_text(eng, prompt)
    s, p = _pick_stop(full["text"])
    out = eng.generate(prompt, {"temperature": 0, "max_new_tokens": 40, "ignore_eos": True, "stop": s,
                                "no_stop_trim": True})
    assert out["text"].startswith(full["text"][:p + len(s)])
    assert full["text"].startswith(out["text"])
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": s}


def test_max_new_tokens_zero(eng, vocab):
    p = prompts_for(14, [7], vocab)[0]
    out = eng.generate(input_ids=p, sampling_params={"max_new_tokens": 0}, return_logprob=True)
    assert out["output_ids"] == [] and out["text"] == ""
    assert out["meta_info"]["finish_reason"] == {"type": "length", "length": 0}
    assert out["meta_info"]["completion_tokens"] == 0
    assert out["meta_info"]["output_token_logprobs"] == []
    # batched with a normal request, both come back right
    outs = eng.generate(input_ids=[p, p[:3]], sampling_params=[{"max_new_tokens": 0},
                                                                {"max_new_tokens": 3, "ignore_eos": True}])
    assert outs[0]["output_ids"] == [] and len(outs[1]["output_ids"]) == 3


# ---------------------------------------------------------------------------------- n
def test_n_greedy_samples_share_the_prompt(eng, vocab):
    p = prompts_for(15, [25], vocab)[0]
    outs = eng.generate(input_ids=p, sampling_params={"temperature": 0, "max_new_tokens": 10, "n": 3,
                                                      "ignore_eos": True})
    assert isinstance(outs, list) and len(outs) == 3
    assert outs[0]["output_ids"] == outs[1]["output_ids"] == outs[2]["output_ids"]
    assert len({o["meta_info"]["id"] for o in outs}) == 3
    assert outs[0]["meta_info"]["cached_tokens"] == 0
    assert all(o["meta_info"]["cached_tokens"] > 0 for o in outs[1:])


def test_n_seeded_samples(eng, vocab):
    p = prompts_for(16, [12], vocab)[0]
    sp = {"temperature": 1.0, "max_new_tokens": 16, "n": 3, "ignore_eos": True, "sampling_seed": 5}
    a = [o["output_ids"] for o in eng.generate(input_ids=p, sampling_params=sp)]
    b = [o["output_ids"] for o in eng.generate(input_ids=p, sampling_params=sp)]
    assert a == b
    assert len({tuple(x) for x in a}) == 3  # each sample has its own stream


# ---------------------------------------------------------------------------------- logprobs
def test_logprobs_shapes_and_greedy_top1(eng, ref, vocab):
    prompts = prompts_for(17, [6, 24], vocab)
    n = 10
    outs = eng.generate(input_ids=prompts, sampling_params={"temperature": 0, "max_new_tokens": n,
                                                            "ignore_eos": True},
                        return_logprob=True, top_logprobs_num=5)
    for p, o in zip(prompts, outs):
        meta = o["meta_info"]
        lps, tops = meta["output_token_logprobs"], meta["output_top_logprobs"]
        assert len(lps) == len(tops) == len(o["output_ids"]) == n
        for (lp, tid, _), top, out_id in zip(lps, tops, o["output_ids"]):
            assert tid == out_id and lp <= 0
            assert len(top) == 5
            vals = [v for v, _, _ in top]
            assert vals == sorted(vals, reverse=True)
            assert len({t for _, t, _ in top}) == 5
            assert sum(math.exp(v) for v in vals) <= 1 + 1e-5
            assert top[0][1] == tid and abs(top[0][0] - lp) < 1e-6
        want_lp = ref.greedy(p, n)[1]
        assert max(abs(a - b) for a, b in zip([x for x, _, _ in lps], want_lp)) < 1e-4


def test_sampled_logprobs_are_of_the_chosen_token(eng, vocab):
    p = prompts_for(18, [8], vocab)[0]
    o = eng.generate(input_ids=p, sampling_params={"temperature": 1.5, "max_new_tokens": 16, "ignore_eos": True,
                                                   "sampling_seed": 3},
                     return_logprob=True, top_logprobs_num=20)
    for (lp, tid, _), top in zip(o["meta_info"]["output_token_logprobs"], o["meta_info"]["output_top_logprobs"]):
        match = [v for v, t, _ in top if t == tid]
        if match:
            assert abs(match[0] - lp) < 1e-6
        else:
            assert lp <= top[-1][0] + 1e-6


def test_no_logprobs_unless_asked(eng):
    out = eng.generate("Hello", {"max_new_tokens": 2})
    assert "output_token_logprobs" not in out["meta_info"]


# ---------------------------------------------------------------------------------- penalty bookkeeping
class _NoWalk(list):
    """A token list that refuses to be walked: only appends, len and slices are allowed."""

    def __iter__(self):
        raise AssertionError("the whole token list was walked")


def test_penalty_tracker_equals_reference_and_costs_new_tokens_only():
    import random

    from radixlm.core import Req
    from radixlm.engine.sampler import PenaltyTracker, apply_penalties_reference
    from radixlm.sampling_params import SamplingParams

    rng = random.Random(0)
    V = 97
    params = [dict(repetition_penalty=1.6), dict(repetition_penalty=0.7), dict(frequency_penalty=1.5),
              dict(presence_penalty=-1.0), dict(frequency_penalty=-0.5, presence_penalty=0.8, repetition_penalty=1.3),
              dict()]
    reqs = [Req(f"r{i}", [rng.randrange(V) for _ in range(rng.randrange(1, 40))], SamplingParams(**p))
            for i, p in enumerate(params)]
    tracker = PenaltyTracker()
    for step in range(30):
        logits = torch.randn(len(reqs), V) * 3
        want = logits.clone()
        apply_penalties_reference(want, reqs)
        got = logits.clone()
        saved = [(r.origin_input_ids, r.output_ids) for r in reqs]
        if step >= 1:  # after a request's first step the tracker may read only its new tokens
            for r in reqs:
                r.origin_input_ids, r.output_ids = _NoWalk(r.origin_input_ids), _NoWalk(r.output_ids)
        tracker.apply(got, reqs)
        for r, (o, p) in zip(reqs, saved):
            r.origin_input_ids, r.output_ids = o, p
        assert torch.equal(got, want), step
        for r in reqs:
            r.output_ids.append(rng.randrange(V) if rng.random() < 0.7 else r.origin_input_ids[0])
