"""Scheduler hardening: a long chunked prompt never starves running streams, retraction keeps
SGLang's new_token_ratio rule, max_new_tokens is clipped at admission to what the pool can hold,
and a failure while forming, computing or processing a batch fails only that batch's requests,
returning every slot and lock (page sizes 1 and 4, mixed chunk, overlap). Most of it runs on the
stub runner of tests/sched_harness.py (no model, milliseconds); the starvation scenario also runs
on a real tiny model."""

from __future__ import annotations

import logging
import math
import random

import pytest

from radixlm.core import Req
from radixlm.sampling_params import SamplingParams
from radixlm.sched.decode import retracted_token_ratio
from tests.sched_harness import assert_idle_and_clean, drive, make_req, make_scheduler

VOCAB = 515  # the tiny llama's vocabulary


# ---------------------------------------------------------------- chunked prefill vs decode
def starvation_case(**cfg):
    """The issue's scenario: an 800-token pool, chunks of 64, a 400-token stream decoding when a
    600-token prompt arrives (the two cannot both be in the pool)."""
    sched = make_scheduler(800, chunked_prefill_size=64, **cfg)
    stream = make_req("stream", 400, 120, seed=1)
    long = make_req("long", 600, 4, seed=2)
    return sched, drive(sched, {0: [stream], 5: [long]})


@pytest.mark.parametrize("cfg", [{}, {"enable_mixed_chunk": True}, {"enable_overlap": True}],
                         ids=["default", "mixed_chunk", "overlap"])
def test_chunked_prompt_does_not_starve_a_running_stream(cfg):
    sched, run = starvation_case(**cfg)
    assert run.finish["stream"]["type"] == "length" and len(run.outputs["stream"]) == 120
    assert run.finish["long"]["type"] == "length" and len(run.outputs["long"]) == 4
    steps = sched.runner.steps
    # the long prompt's prefill runs in chunks of what fits (64), not one token per step ...
    chunks = [e for s in steps for rid, _, e in s.rows if rid == "long" and e > 1]
    crawl = [e for s in steps for rid, p, e in s.rows if rid == "long" and e == 1 and p < 600]
    assert not crawl, f"{len(crawl)} one-token prefill steps"
    assert len(chunks) <= math.ceil(600 / 64) + 3
    # ... and the stream keeps its pace: it never waits for more than the prompt's chunks in a row
    gaps = [b - a for a, b in zip(run.token_step["stream"], run.token_step["stream"][1:])]
    assert max(gaps) <= math.ceil(600 / 64) + 2, gaps
    assert_idle_and_clean(sched)


def test_starvation_scenario_on_a_real_model(path):
    """The same on the tiny llama through the Engine (radixlm/bench/chunk_starvation.py counts the steps)."""
    import radixlm
    from radixlm.bench.chunk_starvation import engine_kwargs, run_scenario

    with radixlm.Engine(model_path=path, **engine_kwargs()) as eng:
        s = run_scenario(eng)
        assert s.finish == ("length", "length")
        one_token = [e for e in s.long_steps if e == 1]
        assert len(s.chunks) <= math.ceil(600 / 64) + 3 and len(one_token) <= 2
        eng.check_integrity()


def test_chunk_waits_rather_than_crawls():
    """When little fits beside the running requests, the chunked request skips the step (decode
    runs) instead of prefilling a page per step."""
    sched, run = starvation_case()
    assert sched.stats.num_chunk_waits > 0
    waits_then_decode = [s.mode for s in sched.runner.steps]
    assert "decode" in waits_then_decode


# ---------------------------------------------------------------- retraction
def test_retracted_token_ratio_is_sglangs_rule():
    reqs = []
    for gen, max_new in [(10, 100), (50, 200), (0, 10_000)]:
        r = Req("r", [1, 2, 3], SamplingParams(max_new_tokens=max_new))
        r.output_ids = [5] * gen
        reqs.append(r)
    # (generated + 20 per request) / (sum of max_new_tokens, each capped at 4096, + 1)
    assert retracted_token_ratio(reqs) == pytest.approx((60 + 60) / (100 + 200 + 4096 + 1))
    assert retracted_token_ratio(reqs[:1]) == pytest.approx(30 / 101)
    assert retracted_token_ratio([]) == 0.0


def test_retraction_does_not_pin_the_ratio_at_one():
    sched = make_scheduler(700, chunked_prefill_size=None)
    reqs = [make_req(f"r{i}", 100, 200, seed=i) for i in range(6)]
    ratios = []
    real = sched.decode._retract_one

    def spy(outputs):
        ok = real(outputs)
        ratios.append(sched.new_token_ratio)
        return ok

    sched.decode._retract_one = spy
    run = drive(sched, {0: reqs})
    assert sched.stats.num_retractions > 0
    assert min(ratios) < 1.0
    assert all(f["type"] == "length" for f in run.finish.values())
    assert all(len(o) == 200 for o in run.outputs.values())
    assert_idle_and_clean(sched)


def test_retraction_takes_the_chunked_request_before_aborting_a_stream():
    """A lone stream that needs the memory a chunked prompt holds gets it back (the chunked request
    is the least progressed), instead of being aborted as 'pool too small'."""
    sched = make_scheduler(600, chunked_prefill_size=64)
    run = drive(sched, {0: [make_req("stream", 300, 250, seed=3)], 3: [make_req("long", 280, 2, seed=4)]})
    assert run.finish["stream"] == {"type": "length", "length": 250}
    assert run.finish["long"]["type"] == "length"
    assert_idle_and_clean(sched)


# ---------------------------------------------------------------- max_new_tokens clipping
def test_max_new_tokens_clipped_to_what_the_pool_holds():
    sched = make_scheduler(300, context_len=4096)
    req = make_req("big", 100, 1000)
    run = drive(sched, {0: [req]})
    assert run.finish["big"] == {"type": "length", "length": 200}
    assert len(run.outputs["big"]) == 200
    assert sched.stats.num_clipped_max_new_tokens == 1
    assert_idle_and_clean(sched)


def test_max_new_tokens_none_is_bounded_by_pool_and_context():
    sched = make_scheduler(2000, context_len=256)
    req = Req("none", [1] * 56, SamplingParams(max_new_tokens=None, temperature=0))
    run = drive(sched, {0: [req]})
    assert run.finish["none"] == {"type": "length", "length": 200}


# ---------------------------------------------------------------- fault injection
WORKLOAD_LENS = [(40, 12), (130, 30), (7, 25), (300, 8), (64, 40), (90, 3), (200, 20), (15, 60)]
CONFIGS = [
    {"page_size": 1},
    {"page_size": 4},
    {"page_size": 1, "enable_mixed_chunk": True},
    {"page_size": 4, "enable_mixed_chunk": True},
    {"page_size": 1, "enable_overlap": True},
]
CONFIG_IDS = ["page1", "page4", "mixed_page1", "mixed_page4", "overlap"]


def workload(tag: str = ""):
    reqs = [make_req(f"{tag}q{i}", n, m, seed=i, stop_token_ids=[7 + i]) for i, (n, m) in enumerate(WORKLOAD_LENS)]
    return {0: reqs[:3], 2: reqs[3:5], 6: reqs[5:]}


def new_sched(cfg):
    cfg = dict(cfg)
    return make_scheduler(700, page_size=cfg.pop("page_size"), max_running=6, chunked_prefill_size=48, **cfg)


@pytest.fixture(scope="module")
def clean_runs():
    return {i: drive(new_sched(c), workload()) for i, c in zip(CONFIG_IDS, CONFIGS)}


def check_only_victims_failed(run, clean, victims):
    for rid, fin in run.finish.items():
        if rid in victims:
            assert fin["type"] == "abort" and "internal error" in fin["message"], (rid, fin)
        else:
            assert fin == clean.finish[rid], rid
            assert run.outputs[rid] == clean.outputs[rid], rid
    assert victims, "the injection never fired"


@pytest.mark.parametrize("cfg", CONFIGS, ids=CONFIG_IDS)
def test_failing_forward_fails_only_its_batch(cfg, clean_runs):
    """The 3rd extend step and the 12th decode step raise: exactly their requests are aborted."""
    sched = new_sched(cfg)
    seen = {"extend": 0, "decode": 0}
    victims = set()

    def fail(batch):
        kind = "decode" if batch.forward_mode.is_decode else "extend"
        seen[kind] += 1
        if (kind, seen[kind]) in (("extend", 3), ("decode", 12)):
            victims.update(r.rid for r in batch.reqs)
            return True
        return False

    sched.runner.fail = fail
    run = drive(sched, workload())
    check_only_victims_failed(run, clean_runs[CONFIG_IDS[CONFIGS.index(cfg)]], victims)
    assert sched.stats.num_failed_reqs >= len(victims)
    assert_idle_and_clean(sched)


@pytest.mark.parametrize("cfg", CONFIGS, ids=CONFIG_IDS)
def test_failing_output_processing_fails_only_that_request(cfg, clean_runs):
    sched = new_sched(cfg)
    real = sched.out.append_token
    victims = set()

    def append_token(req, result, i):
        if req.rid in ("q1", "q4") and len(req.output_ids) == 5:
            victims.add(req.rid)
            raise ValueError("injected processing failure")
        return real(req, result, i)

    sched.out.append_token = append_token
    run = drive(sched, workload())
    check_only_victims_failed(run, clean_runs[CONFIG_IDS[CONFIGS.index(cfg)]], victims)
    assert_idle_and_clean(sched)


@pytest.mark.parametrize("cfg", CONFIGS, ids=CONFIG_IDS)
def test_failure_while_admitting_fails_only_the_admitted(cfg, clean_runs):
    """Taking a request-table row raises for one request after its prefix was locked."""
    sched = new_sched(cfg)
    pool = sched.req_to_token_pool
    real = pool.write
    victims = set()

    def write(idx, start, slots):
        if start == 0 and any(r.rid == "q3" and r.kv.req_pool_idx == idx for r in sched.waiting) and not victims:
            victims.add("q3")
            raise RuntimeError("injected admission failure")
        return real(idx, start, slots)

    pool.write = write
    run = drive(sched, workload())
    assert run.finish["q3"]["type"] == "abort"
    # requests admitted in the same step fail with it; all others are untouched
    clean = clean_runs[CONFIG_IDS[CONFIGS.index(cfg)]]
    failed = {rid for rid, f in run.finish.items() if f["type"] == "abort"}
    check_only_victims_failed(run, clean, failed)
    assert_idle_and_clean(sched)


@pytest.mark.parametrize("cfg", CONFIGS, ids=CONFIG_IDS)
def test_pool_refusing_an_admitted_batch_rolls_back(cfg, clean_runs):
    """If the pool cannot give an admitted batch its slots (the budget was wrong), admission is
    undone and retried: nobody is aborted and the outputs are unchanged."""
    sched = new_sched(cfg)
    real = sched.kv.alloc_with_evict
    refused = []

    def alloc(last, prefix_lens, extend_lens):
        if len(refused) < 3 and sum(extend_lens) > len(extend_lens):  # extend steps only
            refused.append(sum(extend_lens))
            return None
        return real(last, prefix_lens, extend_lens)

    sched.kv.alloc_with_evict = alloc
    run = drive(sched, workload())
    assert len(refused) == 3 and sched.stats.num_admission_rollbacks == 3
    clean = clean_runs[CONFIG_IDS[CONFIGS.index(cfg)]]
    assert run.finish == clean.finish and run.outputs == clean.outputs
    assert_idle_and_clean(sched)


@pytest.mark.parametrize("seed", range(6))
def test_mixed_chunk_in_a_small_pool_never_dies(seed):
    """The issue's mixed-chunk run in an 800-token pool (one in four died with 'KV pool exhausted
    during prefill admission'): random arrivals, every request completes, integrity every step."""
    rng = random.Random(seed)
    sched = make_scheduler(800, chunked_prefill_size=64, enable_mixed_chunk=True, max_running=8)
    arrivals = {}
    for i in range(14):
        arrivals.setdefault(rng.randrange(0, 60), []).append(
            make_req(f"m{i}", rng.randrange(1, 500), rng.randrange(1, 120), seed=seed * 100 + i))
    run = drive(sched, arrivals)
    assert all(f["type"] == "length" for f in run.finish.values()), run.finish
    assert_idle_and_clean(sched)


def test_recover_fails_holders_and_keeps_the_queue():
    """The loop's last resort (an exception escaping step()) frees every KV holder and keeps
    serving: queued requests still complete afterwards."""
    sched = make_scheduler(700, max_running=2)
    for r in [make_req("a", 50, 30), make_req("b", 60, 30), make_req("c", 70, 5)]:
        sched.add_request(r)
    for _ in range(4):
        sched.step()
    outs = sched.recover("internal error in the scheduler: test")
    assert sorted(o.rid for o in outs) == ["a", "b"]
    sched.check_integrity()
    finished = {}
    for _ in range(100):  # c is still queued and finishes
        finished.update({o.rid: o.finished_reason for o in sched.step() if o.finished_reason})
        sched.check_integrity()
        if not sched.has_work():
            break
    assert finished["c"].type == "length" and finished["c"].length == 5
    assert_idle_and_clean(sched)


def test_integrity_violation_is_logged_not_fatal_unless_debug(caplog):
    sched = make_scheduler(300)
    sched.allocator.alloc(5)  # a leak: slots neither free nor held by anybody
    with caplog.at_level(logging.ERROR):
        sched.idle_check()
    assert sched.stats.num_integrity_violations == 1
    assert "invariant violated" in caplog.text
    strict = make_scheduler(300, debug_integrity_check=True)
    strict.allocator.alloc(5)
    with pytest.raises(RuntimeError, match="leak"):
        strict.idle_check()
