"""The scheduler on the stub runner (tests/sched_harness.py): no model, milliseconds per workload,
the KV-ownership invariant checked after every step. Since the stub's tokens depend only on a
request's own tokens, every scheduling choice (page size, chunking, mixed chunk, overlap,
retraction under a small pool, the radix cache on or off, policy) must give the same outputs."""

from __future__ import annotations

import random

import pytest

from tests.sched_harness import assert_idle_and_clean, drive, make_req, make_scheduler, stub_token


def random_workload(seed: int, n: int = 16, shared_prefix: int = 0):
    rng = random.Random(seed)
    prefix = make_req("prefix", shared_prefix, 1, seed=seed + 1000).origin_input_ids if shared_prefix else []
    arrivals = {}
    for i in range(n):
        req = make_req(f"w{i}", rng.randrange(1, 260), rng.randrange(1, 50), seed=seed * 100 + i,
                       stop_token_ids=[rng.randrange(1, 97) for _ in range(3)])
        req.origin_input_ids = prefix + req.origin_input_ids
        arrivals.setdefault(rng.randrange(0, 40), []).append(req)
    return arrivals


SETTINGS = {
    "plain": dict(pool=20000),
    "page4": dict(pool=20000, page_size=4),
    "chunk32": dict(pool=20000, chunked_prefill_size=32),
    "mixed_chunk": dict(pool=20000, chunked_prefill_size=32, enable_mixed_chunk=True),
    "overlap": dict(pool=20000, enable_overlap=True),
    "no_radix": dict(pool=20000, disable_radix_cache=True),
    "fcfs": dict(pool=20000, schedule_policy="fcfs"),
    "dfs_weight": dict(pool=20000, schedule_policy="dfs-weight"),
    "small_pool": dict(pool=900, chunked_prefill_size=64),
    "small_pool_page4": dict(pool=900, chunked_prefill_size=64, page_size=4),
    "small_pool_overlap": dict(pool=900, chunked_prefill_size=64, enable_overlap=True),
    "max_running_2": dict(pool=20000, max_running=2),
}


def run_setting(name: str, seed: int, shared_prefix: int = 0):
    cfg = dict(SETTINGS[name])
    sched = make_scheduler(cfg.pop("pool"), **cfg)
    run = drive(sched, random_workload(seed, shared_prefix=shared_prefix))
    assert_idle_and_clean(sched)
    return sched, run


@pytest.mark.parametrize("seed", [0, 1])
def test_every_scheduling_choice_gives_the_same_tokens(seed):
    _, ref = run_setting("plain", seed, shared_prefix=48)
    for name in SETTINGS:
        sched, run = run_setting(name, seed, shared_prefix=48)
        assert run.outputs == ref.outputs, name
        assert run.finish == ref.finish, name
        if name.startswith("small_pool"):
            assert sched.stats.num_retractions + sched.stats.num_chunk_waits > 0, name


def test_outputs_follow_the_stub_model():
    sched = make_scheduler(4000)
    req = make_req("a", 10, 5)
    prompt = list(req.origin_input_ids)
    run = drive(sched, {0: [req]})
    want, seq = [], list(prompt)
    for _ in range(5):
        want.append(stub_token(seq[-1], len(seq) - 1))
        seq.append(want[-1])
    assert run.outputs["a"] == want


def test_shared_prefix_is_computed_once():
    sched = make_scheduler(20000)
    drive(sched, random_workload(3, n=8, shared_prefix=128))
    assert sched.stats.prefill_cached_tokens >= 128 * 6  # all but the first (and an in-batch twin)


def test_overlap_zombies_give_back_their_kv():
    sched, run = run_setting("overlap", 5)
    assert sched.stats.num_overlapped_batches > 0
    assert sched.stats.num_overlap_zombies > 0
    assert any(f["type"] == "stop" for f in run.finish.values())


@pytest.mark.parametrize("setting", ["plain", "chunk32", "overlap", "small_pool_page4"])
def test_aborts_anywhere_free_everything(setting):
    """Aborting requests while waiting, mid-chunk, running or in an overlapped step."""
    cfg = dict(SETTINGS[setting])
    sched = make_scheduler(cfg.pop("pool"), **cfg)
    arrivals = random_workload(7)
    aborted = {}
    kinds = set()

    def on_step(step):
        if step % 4 != 2:
            return
        for kind, pool in (("chunked", [sched.chunked_req] if sched.chunked_req else []),
                           ("running", sched.running), ("waiting", sched.waiting)):
            if pool and kind not in kinds:
                kinds.add(kind)
                outs = sched.abort_request(pool[-1].rid)
                aborted.update({o.rid: o.finished_reason.type for o in outs if o.finished_reason is not None})
                return outs
        return None

    run = drive(sched, arrivals, on_step=on_step)
    assert "abort" in aborted.values() and {"running", "waiting"} <= kinds
    assert_idle_and_clean(sched)
    assert {rid for rid, f in run.finish.items() if f["type"] == "abort"} == \
        {rid for rid, t in aborted.items() if t == "abort"}
