"""The CPU serving defaults (bounded prefill per step, mixed chunk, no overlap) and what they are for:
a burst of arrivals does not stall the requests already decoding. Behaviour, not timing: scheduler
steps are counted, tokens compared with the plain path and with HF transformers, KV checked idle."""

from __future__ import annotations

import pytest

from radixlm.entrypoints.dp_launcher import to_argv
from radixlm.launch_server import parse_args
from radixlm.server_args import CPU_CHUNKED_PREFILL_SIZE, DEFAULT_CHUNKED_PREFILL_SIZE, ServerArgs
from tests.conftest import random_prompts
from tests.sched_harness import assert_idle_and_clean, drive, make_req, make_scheduler

CHUNK = 64


def burst_run(mixed: bool, chunk=CHUNK):
    """One request decoding, then a burst of 12 prompts of 40 tokens (480 prompt tokens) arrives."""
    sched = make_scheduler(4000, max_running=16, chunked_prefill_size=chunk, enable_mixed_chunk=mixed)
    stream = make_req("stream", 20, 60, seed=1)
    burst = [make_req(f"b{i}", 40, 8, seed=10 + i) for i in range(12)]
    run = drive(sched, {0: [stream], 5: burst})
    assert_idle_and_clean(sched)
    return sched, run


def test_burst_running_request_decodes_in_every_prefill_step():
    sched, run = burst_run(mixed=True)
    steps = sched.runner.steps
    prefill_steps = [i for i, s in enumerate(steps) if s.mode in ("extend", "mixed") and i >= 5]
    assert len(prefill_steps) >= 480 // CHUNK  # the burst is spread over several bounded steps
    for i in prefill_steps:
        prompt_tokens = sum(e for _, _, e in steps[i].rows if e > 1)  # (the decoding requests ride with 1)
        assert prompt_tokens <= CHUNK
        assert steps[i].mode == "mixed" and any(r == "stream" for r, _, _ in steps[i].rows)
    # the stream got a token in every step from its first one until it finished: no stall at all
    got = run.token_step["stream"]
    assert got == list(range(got[0], got[0] + len(got)))
    assert sched.stats.num_mixed_batches >= len(prefill_steps)


def test_burst_without_mixed_chunk_stalls_the_stream_for_the_whole_admission():
    """The behaviour the CPU default avoids: prefill first, so the stream waits out every chunk."""
    sched, run = burst_run(mixed=False)
    got = run.token_step["stream"]
    gaps = [b - a for a, b in zip(got, got[1:])]
    assert max(gaps) > 480 // CHUNK  # it waited through every prefill step of the burst
    # and with the old 8192-token default the whole burst is one step
    sched, _ = burst_run(mixed=False, chunk=DEFAULT_CHUNKED_PREFILL_SIZE)
    assert max(sum(e for _, _, e in s.rows) for s in sched.runner.steps) == 480


def test_mixed_and_plain_paths_give_the_same_tokens():
    _, mixed = burst_run(mixed=True)
    _, plain = burst_run(mixed=False)
    _, one_step = burst_run(mixed=False, chunk=None)
    assert mixed.outputs == plain.outputs == one_step.outputs
    assert mixed.finish == plain.finish


def test_cpu_defaults_resolve_and_explicit_flags_win():
    a = parse_args(["--model-path", "m", "--device", "cpu"])
    assert a.resolved_chunked_prefill_size == CPU_CHUNKED_PREFILL_SIZE
    assert a.resolved_enable_mixed_chunk and not a.resolved_enable_overlap
    g = ServerArgs(model_path="m", device="cuda")
    assert g.resolved_chunked_prefill_size == DEFAULT_CHUNKED_PREFILL_SIZE
    assert not g.resolved_enable_mixed_chunk and g.resolved_enable_overlap
    old = parse_args(["--model-path", "m", "--device", "cpu", "--chunked-prefill-size", "8192",
                      "--enable-mixed-chunk", "false", "--disable-overlap-schedule", "false"])
    assert old.resolved_chunked_prefill_size == 8192
    assert not old.resolved_enable_mixed_chunk and old.resolved_enable_overlap
    on = parse_args(["--model-path", "m", "--device", "cuda", "--enable-mixed-chunk", "--disable-overlap-schedule",
                     "--chunked-prefill-size", "-1"])
    assert on.resolved_enable_mixed_chunk and not on.resolved_enable_overlap
    assert on.resolved_chunked_prefill_size is None
    for args in (old, on, a):  # a data-parallel replica gets the same settings back
        assert parse_args(["--model-path", "m", *to_argv(args, skip=("model_path",))]) == args
    with pytest.raises(SystemExit):
        parse_args(["--model-path", "m", "--enable-mixed-chunk", "maybe"])


def test_engine_burst_on_cpu_defaults_matches_hf(model_factory, hf_reference_factory):
    """The Engine on the CPU defaults: a stream decodes while a burst is admitted in bounded steps
    (mixed batches happen), every output equals HF transformers', and the KV is idle after."""
    import radixlm

    path = model_factory("llama")
    ref = hf_reference_factory(path)
    prompts = random_prompts(3, [24] + [30] * 6, ref.model.config.vocab_size)
    new, stream_new = 8, 64  # the stream outlasts the burst's admission
    with radixlm.Engine(model_path=path, log_level="warning", chunked_prefill_size=32) as eng:
        args = eng.server_args
        assert args.resolved_enable_mixed_chunk and not args.resolved_enable_overlap
        assert eng.scheduler.overlap is None and eng.scheduler.cfg.enable_mixed_chunk
        stream = eng.generate(input_ids=prompts[0], sampling_params={"temperature": 0, "max_new_tokens": stream_new,
                                                                      "ignore_eos": True}, stream=True)
        first = next(stream)  # the stream is decoding
        outs = eng.generate(input_ids=prompts[1:], sampling_params={"temperature": 0, "max_new_tokens": new,
                                                                     "ignore_eos": True})
        ids0 = list(first["output_ids"]) + [t for chunk in stream for t in chunk["output_ids"]]
        assert eng.scheduler.stats.num_mixed_batches > 0
        assert ids0 == ref.greedy(prompts[0], stream_new)[0]
        assert [o["output_ids"] for o in outs] == [ref.greedy(p, new)[0] for p in prompts[1:]]
        eng.check_integrity()
        assert eng.scheduler.tree_cache.protected_size() == 0


@pytest.mark.parametrize("given,want", [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_server_sets_the_openmp_idle_policy_before_torch_loads(given, want):
    """launch_server's processes get OMP_WAIT_POLICY=PASSIVE unless the environment says otherwise."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if given is not None:
        env["OMP_WAIT_POLICY"] = given
    code = ("import os, sys; from radixlm.launch_server import set_thread_env; set_thread_env(); "
            "assert 'torch' not in sys.modules; print(os.environ['OMP_WAIT_POLICY'])")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == want


def test_serving_path_bench_runs_end_to_end(path, capsys):
    """`python -m radixlm.bench.serving_path`: one tiny server, every part, the summary printed."""
    from radixlm.bench import serving_path

    serving_path.main(["--model-path", path, "--setting", "s=--enable-mixed-chunk false", "--single-requests", "1",
                       "--input-len", "16", "--output-len", "4", "--burst", "3", "--gsp-requests", "3",
                       "--gsp-prefix", "32", "--gsp-question", "4", "--gsp-output-len", "2"])
    out = capsys.readouterr().out
    for key in ("itl_median_ms", "cpu_ms_per_tok_scheduler", "cpu_ms_per_tok_detokenizer", "max_gap_s",
                "first_finish_s", "median over repeats"):
        assert key in out
