"""Speculative decoding (radixlm/speculative/): the drafters and acceptance rules against their plain
references, rejection sampling keeps the target distribution (a statistical test with a tolerance
derived from the sample size), the scheduler keeps KV ownership through verify steps, retraction and
aborts, and greedy tokens through the Engine and the server are exactly those without speculation."""

from __future__ import annotations

import math
import random
import time

import pytest
import requests
import torch

import radixlm
from radixlm.engine.sampler import SampleOutput, Sampler
from radixlm.server_args import ServerArgs
from radixlm.speculative.ngram import NgramDrafter, propose_reference
from radixlm.speculative.verify import greedy_accept_batched, greedy_accept_reference, speculative_sample_reference
from tests import sched_harness as H
from tests.conftest import random_prompts
from tests.server_utils import ServerProcess


# ------------------------------------------------------------------------------ units
def test_ngram_index_agrees_with_the_plain_scan():
    rng = random.Random(0)
    for trial in range(30):
        base = [rng.randrange(6) for _ in range(rng.randrange(2, 12))]
        seq = [t for _ in range(4) for t in base] + [rng.randrange(6) for _ in range(rng.randrange(0, 8))]
        drafter, key = NgramDrafter(max_ngram=rng.choice([1, 3, 18])), type("K", (), {})()
        for n in range(1, len(seq) + 1):  # the index grows with the sequence, as a request's does
            k = rng.randrange(1, 6)
            assert drafter.propose_one(key, seq[:n], k) == propose_reference(seq[:n], k, drafter.max_ngram), \
                (trial, n)


def test_ngram_longest_match_then_most_recent():
    seq = [1, 2, 3, 9, 2, 3, 8, 5, 1, 2, 3]
    # suffix [1, 2, 3] occurred at 0..2 (followed by 9); [2, 3] more recently at 4..5 (followed by 8)
    assert propose_reference(seq, 3, 18) == [9, 2, 3]
    assert propose_reference(seq, 3, 2) == [8, 5, 1]
    assert propose_reference([4, 5, 6], 3, 18) == []


def test_greedy_accept_batched_agrees_with_reference():
    g = torch.Generator().manual_seed(1)
    for _ in range(50):
        b, k = 5, 4
        target = torch.randint(0, 3, (b, k + 1), generator=g)
        nd = torch.randint(0, k + 1, (b,), generator=g)
        drafts = torch.where(torch.rand(b, k, generator=g) < 0.7, target[:, :k], torch.randint(0, 3, (b, k),
                                                                                            generator=g))
        accepted, bonus = greedy_accept_batched(drafts, nd, target)
        for i in range(b):
            d = drafts[i, :nd[i]].tolist()
            want = greedy_accept_reference(d, target[i, :len(d) + 1].tolist())
            assert d[:accepted[i]] + [int(bonus[i])] == want


def _max_dev_ok(counts: torch.Tensor, p: torch.Tensor, n: int, sigmas: float = 5.0) -> bool:
    """Each bin's frequency within `sigmas` binomial standard deviations of p (a per-bin z-test; with
    V bins and 5 sigma the false-alarm chance is under V * 6e-7)."""
    freq = counts.double() / n
    sd = torch.sqrt(p.double() * (1 - p.double()) / n).clamp_min(1.0 / n)
    return bool(((freq - p.double()).abs() <= sigmas * sd).all())


def _committed_stats(fn, n, vocab):
    first = torch.zeros(vocab, dtype=torch.long)
    second_after = {}  # first token -> counts of the second committed token
    for _ in range(n):
        out = fn()
        first[out[0]] += 1
        if len(out) > 1:
            second_after.setdefault(out[0], torch.zeros(vocab, dtype=torch.long))[out[1]] += 1
    return first, second_after


@pytest.mark.parametrize("drafter", ["deterministic", "sampled"])
def test_rejection_sampling_keeps_the_target_distribution(drafter):
    """Committed tokens are distributed as the target's p: the first one as p[0]; the second, given the
    first was the draft d_1 (the context the target scored p[1] in), as p[1]."""
    vocab, n = 6, 8000
    g = torch.Generator().manual_seed(7)
    p = torch.tensor([[0.40, 0.25, 0.15, 0.10, 0.06, 0.04], [0.05, 0.05, 0.50, 0.20, 0.10, 0.10],
                      [0.10, 0.20, 0.30, 0.20, 0.10, 0.10]])
    q = torch.tensor([[0.10, 0.50, 0.10, 0.10, 0.10, 0.10], [0.30, 0.10, 0.20, 0.20, 0.10, 0.10]])

    def one():
        if drafter == "deterministic":  # NGRAM: fixed drafts (q one-hot)
            return speculative_sample_reference(p, [1, 3], None, g)
        d1 = int(torch.multinomial(q[0], 1, generator=g))
        d2 = int(torch.multinomial(q[1], 1, generator=g))
        return speculative_sample_reference(p, [d1, d2], q, g)

    first, second = _committed_stats(one, n, vocab)
    assert _max_dev_ok(first, p[0], n), (first.double() / n, p[0])
    if drafter == "deterministic":  # p[1] is the target's distribution after the draft 1
        assert _max_dev_ok(second[1], p[1], int(second[1].sum()))

    # the test can fail: committing every draft (no rejection) is visibly biased toward the drafts
    def biased():
        return [1, 3] if drafter == "deterministic" else [int(torch.multinomial(q[0], 1, generator=g))]

    bfirst, _ = _committed_stats(biased, n, vocab)
    assert not _max_dev_ok(bfirst, p[0], n)


def test_flags_validated():
    with pytest.raises(ValueError, match="speculative_eagle_topk"):
        ServerArgs(model_path="x", speculative_algorithm="NGRAM", speculative_eagle_topk=4)
    with pytest.raises(ValueError, match="speculative_algorithm"):
        ServerArgs(model_path="x", speculative_algorithm="EAGLE")
    with pytest.raises(ValueError, match="speculative_draft_model_path"):
        ServerArgs(model_path="x", speculative_algorithm="STANDALONE")
    with pytest.raises(ValueError, match="num_draft_tokens"):
        ServerArgs(model_path="x", speculative_algorithm="NGRAM", speculative_num_steps=3,
                   speculative_num_draft_tokens=6)
    with pytest.raises(ValueError, match="needs --speculative-algorithm"):
        ServerArgs(model_path="x", speculative_num_steps=3)
    with pytest.raises(ValueError, match="page_size"):
        ServerArgs(model_path="x", speculative_algorithm="NGRAM", page_size=4)
    a = ServerArgs(model_path="x", speculative_algorithm="NGRAM", speculative_num_draft_tokens=5)
    assert (a.speculative_num_steps, a.speculative_eagle_topk, a.speculative_num_draft_tokens) == (4, 1, 5)


# ------------------------------------------------------------------------------ scheduler with a stub model
def periodic_token(last: int) -> int:
    """A position-independent stub model: outputs become periodic, so n-gram drafts get accepted."""
    return 1 + (last * 7 + 3) % 12


class SpecStubRunner(H.StubRunner):
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.sampler = Sampler(H.VOCAB, [H.EOS])

    def forward_and_sample(self, batch, defer_host_copy=False):
        out = super().forward_and_sample(batch, defer_host_copy)
        ids = list(batch.input_ids)
        ends = [sum(batch.extend_lens[:i + 1]) - 1 for i in range(batch.batch_size)]
        toks = [periodic_token(ids[e]) for e, s in zip(ends, batch.sample) if s]
        return SampleOutput(next_token_ids=toks, next_token_ids_device=torch.tensor(toks, dtype=torch.int64)) \
            if out is not None else out

    def forward_all_logits(self, batch):
        self.forward_and_sample(batch)  # records the step and checks the request table
        logits = torch.full((batch.num_tokens, H.VOCAB), -10.0)
        for j, t in enumerate(batch.input_ids):
            logits[j, periodic_token(t)] = 10.0
        return logits


def make_spec_scheduler(pool: int, spec: bool, **cfg):
    runner = SpecStubRunner(pool, 1, 16, 4096)
    if spec:
        cfg.update(speculative_algorithm="NGRAM", speculative_num_steps=5)
    return H.Scheduler(runner, H.SchedulerConfig(max_running_requests=16, enable_overlap=False, **cfg), 4096)


@pytest.mark.parametrize("pool,cfg", [(4000, {}), (120, {}),  # 120: retractions
                                      (120, {"enable_mixed_chunk": True, "chunked_prefill_size": 16}),
                                      (4000, {"chunked_prefill_size": 8, "disable_radix_cache": True})])
def test_scheduler_verify_steps_keep_kv_ownership(pool, cfg):
    runs = {}
    for spec in (False, True):
        sched = make_spec_scheduler(pool, spec, **cfg)
        reqs = {0: [H.make_req(f"r{i}", 20 + 3 * i, 40 + i, seed=i) for i in range(6)],
                3: [H.make_req("late", 30, 25, seed=9)]}
        aborted = []

        def on_step(step, sched=sched):
            if step == 6:
                aborted.append(1)
                return sched.abort_request("r2")
            return []

        runs[spec] = (H.drive(sched, reqs, on_step=on_step), sched)
        H.assert_idle_and_clean(sched)
    (plain, _), (fast, sched) = runs[False], runs[True]
    assert sched.stats.spec_verify_ct > 0 and sched.stats.spec_accept_length > 2
    if pool == 120:
        assert sched.stats.num_retractions > 0
    for rid, toks in plain.outputs.items():
        if rid != "r2":
            assert fast.outputs[rid] == toks, rid
            assert fast.finish[rid] == plain.finish[rid]
    assert fast.finish["r2"]["type"] == "abort"
    assert fast.steps < plain.steps


# ------------------------------------------------------------------------------ Engine, tiny checkpoints
REPEAT_PROMPT_SEED = 5


def prompts_for(vocab: int):
    rand = random_prompts(REPEAT_PROMPT_SEED, [23, 9], vocab)
    block = random_prompts(REPEAT_PROMPT_SEED + 1, [12], vocab)[0]
    return rand + [block * 4 + block[:5]]


def generate(path, prompts, spec_kw, new=24, **sp):
    eng = radixlm.Engine(model_path=path, device="cpu", max_total_tokens=2048, **spec_kw)
    try:
        outs = eng.generate(input_ids=prompts, sampling_params={"temperature": 0, "max_new_tokens": new,
                                                               "ignore_eos": True, **sp})
        assert_engine_idle(eng)
        return outs, eng.scheduler.stats
    finally:
        eng.shutdown()


def assert_engine_idle(eng, timeout: float = 10.0) -> None:
    """Nothing runs or waits, and (on the scheduler's thread) every KV slot is free or evictable."""
    deadline = time.monotonic() + timeout
    while True:
        info = eng.get_server_info()
        if info["num_running_reqs"] == 0 and info["num_queue_reqs"] == 0:
            break
        assert time.monotonic() < deadline, info
        time.sleep(0.01)

    def check(s):
        s.check_integrity()
        assert s.tree_cache.protected_size() == 0
        assert s.allocator.available_size() + s.tree_cache.evictable_size() == s.allocator.size
        if s.spec is not None:
            s.spec.drafter.check_idle(s.live_reqs())
    eng.loop.call(check)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_ngram_greedy_tokens_identical(model_factory, arch):
    path = model_factory(arch)
    prompts = prompts_for(500)
    want, _ = generate(path, prompts, {})
    got, stats = generate(path, prompts, {"speculative_algorithm": "NGRAM", "speculative_num_draft_tokens": 6})
    assert [o["output_ids"] for o in got] == [o["output_ids"] for o in want]
    assert stats.spec_verify_ct > 0
    meta = got[2]["meta_info"]
    assert meta["spec_verify_ct"] >= 1 and meta["spec_accept_length"] > 1.0
    assert meta["spec_accept_length"] == pytest.approx(meta["completion_tokens"] / meta["spec_verify_ct"])


def test_ngram_stops_exactly(model_factory):
    path = model_factory("llama")
    eng = radixlm.Engine(model_path=path, device="cpu", max_total_tokens=2048)
    try:
        base = eng.generate(input_ids=prompts_for(500)[2], sampling_params={"temperature": 0, "max_new_tokens": 30,
                                                                             "ignore_eos": True})
    finally:
        eng.shutdown()
    text = base["text"]
    stop = text[len(text) // 2:len(text) // 2 + 3]
    cases = [{"max_new_tokens": 7}, {"max_new_tokens": 30, "stop": [stop]}]
    for sp in cases:
        want, _ = generate(path, [prompts_for(500)[2]], {}, **sp)
        got, _ = generate(path, [prompts_for(500)[2]], {"speculative_algorithm": "NGRAM"}, **sp)
        assert got[0]["output_ids"] == want[0]["output_ids"] and got[0]["text"] == want[0]["text"], sp
        assert got[0]["meta_info"]["finish_reason"] == want[0]["meta_info"]["finish_reason"], sp
    assert got[0]["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}


def test_ngram_sampling_and_constrained_requests_run(model_factory):
    """Sampled requests are verified by rejection sampling (a constrained one against its grammar's
    masks); one with penalties falls back to plain decoding inside the verify steps; KV is back to idle
    afterwards."""
    path = model_factory("llama")
    p = prompts_for(500)
    outs, stats = generate(path, [p[2], p[2], p[0]], {"speculative_algorithm": "NGRAM"}, new=20)
    assert stats.spec_verify_ct > 0
    eng = radixlm.Engine(model_path=path, device="cpu", max_total_tokens=2048, speculative_algorithm="NGRAM")
    try:
        outs = eng.generate(input_ids=[p[2], p[2], p[0], p[2]], sampling_params=[
            {"temperature": 0.8, "max_new_tokens": 20, "sampling_seed": 3},
            {"temperature": 0, "max_new_tokens": 20, "frequency_penalty": 0.5},
            {"temperature": 0, "max_new_tokens": 20, "regex": "(ab|cd)+"},
            {"temperature": 0.7, "max_new_tokens": 20, "regex": "((foo|bar) )+x", "sampling_seed": 2}])
        assert outs[3]["text"].startswith(("foo ", "bar ")) and set(outs[3]["text"].split()) <= {"foo", "bar", "x"}
        assert all(o["meta_info"]["finish_reason"] is not None for o in outs)
        assert len(outs[0]["output_ids"]) == 20
        assert_engine_idle(eng)
    finally:
        eng.shutdown()


@pytest.mark.slow
def test_ngram_through_the_server(model_factory):
    path = model_factory("llama")
    prompt = prompts_for(500)[2]
    want, _ = generate(path, [prompt], {})
    with ServerProcess(path, ["--speculative-algorithm", "NGRAM", "--speculative-num-draft-tokens", "6",
                              "--enable-metrics", "--max-total-tokens", "2048"]) as s:
        r = requests.post(s.base_url + "/generate", timeout=60, json={
            "input_ids": prompt, "sampling_params": {"temperature": 0, "max_new_tokens": 24, "ignore_eos": True}})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["output_ids"] == want[0]["output_ids"]
        assert body["meta_info"]["spec_verify_ct"] < 24
        metrics = requests.get(s.base_url + "/metrics", timeout=30).text
        line = [x for x in metrics.splitlines() if x.startswith("sglang:spec_accept_length")][0]
        assert float(line.split()[-1]) > 1.0
        assert not math.isnan(float(line.split()[-1]))


# ------------------------------------------------------------------------------ STANDALONE
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_standalone_self_draft_and_random_draft(model_factory, arch):
    """Drafting with the target's own checkpoint accepts (nearly) every draft; an unrelated random
    draft accepts few; the greedy tokens are the target's either way."""
    path = model_factory(arch)
    unrelated = model_factory(arch, seed=1)
    prompts = prompts_for(500)
    want, _ = generate(path, prompts, {})
    kw = {"speculative_algorithm": "STANDALONE", "speculative_num_steps": 3}
    got, stats = generate(path, prompts, {**kw, "speculative_draft_model_path": path})
    assert [o["output_ids"] for o in got] == [o["output_ids"] for o in want]
    assert stats.spec_accept_rate > 0.9 and stats.spec_accept_length > 3.5  # at most num_steps + 1 = 4
    got, stats = generate(path, prompts, {**kw, "speculative_draft_model_path": unrelated})
    assert [o["output_ids"] for o in got] == [o["output_ids"] for o in want]
    assert stats.spec_accept_rate < 0.5


def test_standalone_sampling_abort_and_vocab_check(model_factory):
    from radixlm.models.model_config import ModelConfig
    from radixlm.speculative.standalone import check_same_vocab

    path = model_factory("llama")
    eng = radixlm.Engine(model_path=path, device="cpu", max_total_tokens=2048, speculative_algorithm="STANDALONE",
                         speculative_draft_model_path=model_factory("llama", seed=1))
    try:
        p = prompts_for(500)
        outs = eng.generate(input_ids=[p[2], p[0]], sampling_params=[
            {"temperature": 0.9, "top_p": 0.9, "max_new_tokens": 16, "ignore_eos": True, "sampling_seed": 1},
            {"temperature": 0, "max_new_tokens": 16, "regex": "(ab|cd)+"}])
        assert len(outs[0]["output_ids"]) == 16 and outs[0]["meta_info"]["spec_verify_ct"] >= 1
        assert outs[1]["meta_info"]["finish_reason"] is not None
        # an abort while decoding gives the draft's KV back too
        stream = eng.generate(input_ids=p[1], sampling_params={"temperature": 0, "max_new_tokens": 200,
                                                               "ignore_eos": True}, stream=True, rid="long")
        for i, _ in enumerate(stream):
            if i == 3:
                eng.abort_request("long")
        assert_engine_idle(eng)
    finally:
        eng.shutdown()
    small = model_factory("llama", size="small")
    with pytest.raises(ValueError, match="vocabulary"):
        check_same_vocab(small, ModelConfig.from_path(small), path, ModelConfig.from_path(path))


def test_bench_speculative_smoke(model_factory, tmp_path):
    """The benchmark runs all three configurations side by side and checks they agree."""
    import os

    from radixlm.bench import speculative as bench

    os.symlink(model_factory("llama"), tmp_path / "target")
    os.symlink(model_factory("llama", seed=1), tmp_path / "draft")
    args = bench.argparse.Namespace(pair_dir=str(tmp_path), device="cpu", new_tokens=4, batch_sizes=[2],
                                    ngram_steps=3, standalone_steps=2, rewrite_chars=200, max_total_tokens=4096,
                                    repeats=1)
    rows = bench.run(args)
    assert {r["config"] for r in rows} == {"none", "NGRAM", "STANDALONE"} and all(r["same_tokens"] for r in rows)
    assert "| rewrite | 2 | NGRAM |" in bench.table(rows)


def test_constrained_drafts_are_checked_against_the_grammar(model_factory):
    """A regex-constrained greedy request speculates: each position is masked by the grammar in the
    state after the drafts before it; the output is the one without speculation, and drafts were accepted."""
    path = model_factory("llama")
    p = prompts_for(500)
    sp = {"temperature": 0, "max_new_tokens": 30, "regex": "((foo|bar) )+x"}
    outs = {}
    for kw in ({}, {"speculative_algorithm": "NGRAM"}):
        eng = radixlm.Engine(model_path=path, device="cpu", max_total_tokens=2048, disable_jump_forward=True, **kw)
        try:
            outs[bool(kw)] = eng.generate(input_ids=[p[2], p[0]], sampling_params=sp)
            assert_engine_idle(eng)
            accepted = eng.scheduler.stats.spec_accepted_tokens
        finally:
            eng.shutdown()
    assert [o["output_ids"] for o in outs[True]] == [o["output_ids"] for o in outs[False]]
    assert [o["text"] for o in outs[True]] == [o["text"] for o in outs[False]]
    assert accepted > 0


def test_logprobs_under_speculation_match(model_factory):
    """return_logprob requests speculate; their output (and top) logprobs equal those without."""
    path = model_factory("llama")
    p = prompts_for(500)
    outs = {}
    for kw in ({}, {"speculative_algorithm": "NGRAM"}):
        eng = radixlm.Engine(model_path=path, device="cpu", max_total_tokens=2048, **kw)
        try:
            outs[bool(kw)] = eng.generate(input_ids=[p[2], p[0]], sampling_params={
                "temperature": 0, "max_new_tokens": 20, "ignore_eos": True}, return_logprob=True, top_logprobs_num=2)
            assert_engine_idle(eng)
            if kw:
                assert eng.scheduler.stats.spec_accepted_tokens > 0
        finally:
            eng.shutdown()
    for a, b in zip(outs[True], outs[False]):
        assert a["output_ids"] == b["output_ids"]
        la, lb = a["meta_info"]["output_token_logprobs"], b["meta_info"]["output_token_logprobs"]
        assert [x[1] for x in la] == [x[1] for x in lb] and len(la) == 20
        assert all(abs(x[0] - y[0]) < 1e-4 for x, y in zip(la, lb))
        ta, tb = a["meta_info"]["output_top_logprobs"], b["meta_info"]["output_top_logprobs"]
        assert [[t[1] for t in row] for row in ta] == [[t[1] for t in row] for row in tb]


def test_jump_forward_under_speculation(model_factory, monkeypatch):
    """With jump-forward on, a grammar's forced text is appended to a speculating request (it leaves the
    running batch to extend it): the output equals the one without speculation, nothing fails, KV idle.
    The request is parked from the verify step's commit (SpecDecoder.commit), not only from a plain decode."""
    import sys

    from radixlm.sched.scheduler import Scheduler

    parked_from = []
    park = Scheduler.park_for_extend

    def spy(self, req):
        parked_from.append(sys._getframe(1).f_code.co_name)
        return park(self, req)

    monkeypatch.setattr(Scheduler, "park_for_extend", spy)
    path = model_factory("llama")
    p = prompts_for(500)
    # a few free decode steps (letters), then forced text: jump-forward after a verify step, not the prefill
    sp = {"temperature": 0, "max_new_tokens": 40, "regex": "[a-z]{6}, and then a fixed tail of the answer\\. (ab|cd)+"}
    outs = {}
    for kw in ({}, {"speculative_algorithm": "NGRAM"}):
        eng = radixlm.Engine(model_path=path, device="cpu", max_total_tokens=2048, **kw)
        try:
            outs[bool(kw)] = eng.generate(input_ids=[p[2], p[0]], sampling_params=sp)
            assert_engine_idle(eng)
        finally:
            eng.shutdown()
    for o in outs[True]:
        assert o["meta_info"]["finish_reason"]["type"] != "abort", o["meta_info"]["finish_reason"]
        assert "fixed tail of the answer" in o["text"]
    assert [o["text"] for o in outs[True]] == [o["text"] for o in outs[False]]
    assert "commit" in parked_from, parked_from
