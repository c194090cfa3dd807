"""Benchmark suite: datasets, summaries, a live bench_serving run, bench_one_batch, the HF peer."""

from __future__ import annotations

import json

import pytest

from radixlm.bench import datasets as ds
from radixlm.bench.metrics import RequestResult, cache_delta, format_summary, summarize

VOCAB = 512


def test_random_dataset_deterministic_and_lengths():
    a = ds.gen_random(50, 40, 10, 0.5, VOCAB, seed=3)
    assert a == ds.gen_random(50, 40, 10, 0.5, VOCAB, seed=3)
    assert a != ds.gen_random(50, 40, 10, 0.5, VOCAB, seed=4)
    assert all(20 <= len(r.prompt_ids) <= 40 and 5 <= r.output_len <= 10 for r in a)
    assert all(ds.FIRST_ID <= t < VOCAB for r in a for t in r.prompt_ids)
    exact = ds.gen_random(5, 64, 8, 1.0, VOCAB)
    assert [len(r.prompt_ids) for r in exact] == [64] * 5 and [r.output_len for r in exact] == [8] * 5
    assert all(len(r.prompt_ids) >= 1 for r in ds.gen_random(20, 3, 2, 0.0, VOCAB))


def test_shared_prefix_dataset():
    reqs = ds.gen_shared_prefix(3, 4, 50, 10, 7, VOCAB, seed=1, sep=[9, 9])
    assert reqs == ds.gen_shared_prefix(3, 4, 50, 10, 7, VOCAB, seed=1, sep=[9, 9])
    assert len(reqs) == 12 and all(len(r.prompt_ids) == 62 and r.output_len == 7 for r in reqs)
    for g in range(3):
        group = [r.prompt_ids for r in reqs if r.group == g]
        assert len(group) == 4 and len({tuple(p[:50]) for p in group}) == 1
        assert all(p[50:52] == [9, 9] for p in group)
    assert len({tuple(r.prompt_ids[:50]) for r in reqs}) == 3
    assert [r.group for r in reqs] != sorted(r.group for r in reqs)  # shuffled


def test_agent_sessions():
    s = ds.gen_agent_sessions(5, 6, 100, 40, 8, 0.5, VOCAB, seed=2)
    assert s == ds.gen_agent_sessions(5, 6, 100, 40, 8, 0.5, VOCAB, seed=2)
    assert len(s) == 5 and all(len(x.turns) == 6 and x.output_len == 8 for x in s)
    assert all(x.system_ids == s[0].system_ids and len(x.system_ids) == 100 for x in s)
    for x in s:
        assert x.turns[0].retry_ids is None
        for t in x.turns:
            assert 36 <= len(t.new_ids) <= 44
            if t.retry_ids is not None:
                assert len(t.retry_ids) == len(t.new_ids) and t.retry_ids != t.new_ids
    n_retry = sum(t.retry_ids is not None for x in s for t in x.turns)
    assert 0 < n_retry < 25 and ds.agent_num_requests(s) == 30 + n_retry


def test_sharegpt_local_file(tmp_path):
    data = [{"conversations": [{"from": "human", "value": "a b c d"}, {"from": "gpt", "value": "x y z"}]},
            {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "x y"}]},
            {"conversations": [{"from": "human", "value": "only one turn"}]}]
    p = tmp_path / "sg.json"
    p.write_text(json.dumps(data))
    reqs = ds.load_sharegpt(str(p), 10, lambda t: [ord(c) for c in t.split()[0]] * len(t.split()))
    assert len(reqs) == 1 and len(reqs[0].prompt_ids) == 4 and reqs[0].output_len == 3


def test_summary_on_partial_results():
    rs = [RequestResult(success=True, prompt_len=10, output_len=5, ttft=0.1, itl=[0.02] * 4, latency=0.18,
                        turn=1),
          RequestResult(success=True, prompt_len=20, output_len=1, ttft=0.05, latency=0.05, turn=2,
                        cached_tokens=8),
          RequestResult(success=False, error="interrupted", prompt_len=30)]
    m = summarize(rs, 1.0, backend="radixlm", dataset_name="agent-multiturn",
                  server_cache=cache_delta({"prefill_cached_tokens": 0, "prefill_new_tokens": 0},
                                           {"prefill_cached_tokens": 8, "prefill_new_tokens": 22}))
    assert m["completed"] == 2 and m["failed"] == 1 and m["total_input_tokens"] == 30
    assert m["total_output_tokens"] == 6 and m["mean_ttft_ms"] == pytest.approx(75)
    assert m["mean_tpot_ms"] == pytest.approx(20) and m["mean_itl_ms"] == pytest.approx(20)
    assert m["concurrency"] == pytest.approx(0.23) and m["server_cache_hit_rate"] == pytest.approx(8 / 30)
    assert m["mean_ttft_turn_ge2_ms"] == pytest.approx(50) and len(m["per_turn"]) == 2
    text = format_summary(m, "Serving Benchmark Result (interrupted)")
    for label in ("Successful requests:", "Benchmark duration (s):", "Request throughput (req/s):",
                  "Output token throughput (tok/s):", "Mean TTFT (ms):", "P99 ITL (ms):", "Median E2E Latency (ms):",
                  "Server cache hit rate:", "TTFT by Turn Depth"):
        assert label in text
    empty = summarize([], 0.0)  # Ctrl-C before anything finished
    assert empty["completed"] == 0 and "Successful requests:" in format_summary(empty)


@pytest.fixture(scope="module")
def tiny(qwen2_path):
    return qwen2_path


@pytest.fixture(scope="module")
def server(qwen2_server):
    return qwen2_server


def _args(*extra):
    from radixlm.bench.serving import build_parser

    return build_parser().parse_args(["--disable-tqdm", "--seed", "5", *extra])


def test_bench_serving_random_live(server, tiny, tmp_path, capsys):
    from radixlm.bench.serving import main

    out = tmp_path / "r.jsonl"
    assert main(["--base-url", server.base_url, "--dataset-name", "random", "--num-prompts", "8",
                 "--random-input-len", "32", "--random-output-len", "4", "--random-range-ratio", "0.5",
                 "--max-concurrency", "4", "--request-rate", "50", "--output-file", str(out), "--output-details",
                 "--disable-tqdm"]) == 0
    text = capsys.readouterr().out
    assert "Successful requests:" in text and "Server cache hit rate:" in text
    rec = json.loads(out.read_text().splitlines()[-1])
    reqs = ds.gen_random(8, 32, 4, 0.5, VOCAB, seed=1)
    assert rec["completed"] == 8 and rec["failed"] == 0
    assert rec["total_input_tokens"] == sum(len(r.prompt_ids) for r in reqs)
    assert rec["total_output_tokens"] == sum(r.output_len for r in reqs)
    assert 0 < rec["mean_ttft_ms"] <= rec["mean_e2e_latency_ms"] and rec["duration"] > 0
    assert rec["max_concurrency"] == 4 and 0 < rec["concurrency"] <= 4.5
    assert 0 <= rec["client_overhead_ratio"] < 1 and len(rec["details"]) == 8


def test_bench_serving_openai_backend(server):
    from radixlm.bench.serving import build_workload, load_tokenizer, run_against_server

    args = _args("--backend", "openai", "--dataset-name", "random", "--num-prompts", "3",
                 "--random-input-len", "16", "--random-output-len", "3", "--random-range-ratio", "1")
    tok = load_tokenizer(server_model_path(server))
    m, res = run_against_server(args, server.base_url, build_workload(args, tok), tok)
    assert m["completed"] == 3 and m["total_output_tokens"] == 9 and m["total_input_tokens"] == 48
    assert all(r.ttft > 0 for r in res)


def server_model_path(server):
    import httpx

    return httpx.get(server.base_url + "/get_server_info").json()["model_path"]


def test_agent_multiturn_reuses_prefix(server):
    from radixlm.bench.serving import build_workload, load_tokenizer, run_against_server

    args = _args("--dataset-name", "agent-multiturn", "--num-sessions", "3", "--num-turns", "3",
                 "--system-prompt-len", "64", "--turn-len", "16", "--turn-output-len", "4", "--retry-ratio", "0.5",
                 "--flush-cache")
    tok = load_tokenizer(server_model_path(server))
    wl = build_workload(args, tok)
    m, res = run_against_server(args, server.base_url, wl, tok)
    assert m["completed"] == wl.num_requests == len(res) and m["failed"] == 0
    later = [r for r in res if r.turn >= 2]
    assert later and all(r.cached_tokens > 0 for r in later)
    # turn t's prompt holds the system prompt and every earlier turn's message and answer
    for r in later:
        assert r.prompt_len > 64 + 16 * 0.9 * (r.turn - 1) + 4 * (r.turn - 1)
        assert r.cached_tokens >= 64
    assert m["server_cache_hit_rate"] > 0.3 and [t["turn"] for t in m["per_turn"]] == [1, 2, 3]


def test_bench_one_batch(tiny, tmp_path):
    from radixlm.bench.one_batch import main

    out = main(["--model-path", tiny, "--batch-size", "1", "3", "--input-len", "12", "--output-len", "4",
                "--output-file", str(tmp_path / "o.jsonl")])
    assert [(r["batch_size"], r["total_input_tokens"]) for r in out] == [(1, 12), (3, 36)]
    assert all(r["prefill_latency_s"] > 0 and r["median_decode_latency_s"] > 0 for r in out)
    assert len((tmp_path / "o.jsonl").read_text().splitlines()) == 2


def test_hf_peer(tiny):
    from radixlm.bench import hf_peer

    reqs = ds.gen_random(3, 10, 3, 0.5, VOCAB, seed=1)
    res, dur = hf_peer.run_batched(tiny, reqs)
    assert dur > 0 and [r.output_len for r in res] == [r.output_len for r in reqs]
    assert all(0 < r.ttft <= r.latency for r in res)
    sess = ds.gen_agent_sessions(1, 2, 20, 5, 3, 1.0, VOCAB, seed=1)
    res, _ = hf_peer.run_agent(tiny, sess, mode="per-call")
    assert [(r.turn, r.is_retry) for r in res] == [(1, False), (2, False), (2, True)]
    retry_prompt = 20 + len(sess[0].turns[0].new_ids) + 3 + len(sess[0].turns[1].retry_ids)
    assert res[2].prompt_len == retry_prompt and all(r.output_len == 3 for r in res)


def test_hf_peer_served_agent_counts_waiting(tiny):
    """Served mode: concurrent sessions share one HF worker; a request's TTFT includes the time it
    waited for other sessions' calls, the outputs are those of the per-call run, and with
    max_concurrency=1 nobody waits."""
    from radixlm.bench import hf_peer

    sess = ds.gen_agent_sessions(3, 2, 24, 6, 4, 0.0, VOCAB, seed=2)
    per_call, _ = hf_peer.run_agent(tiny, sess, mode="per-call")
    served, _ = hf_peer.run_agent(tiny, sess, mode="served")
    key = lambda r: (r.session, r.turn, r.is_retry)  # noqa: E731
    assert sorted((key(r), r.output_ids) for r in served) == sorted((key(r), r.output_ids) for r in per_call)
    first_turns = sorted((r for r in served if r.turn == 1), key=lambda r: r.ttft)
    assert all(r.start_time == 0.0 for r in first_turns)  # all clients sent at once...
    for a, b in zip(first_turns, first_turns[1:]):
        assert b.ttft >= a.latency  # ...so each waited for the calls served before it
    serial, _ = hf_peer.run_agent(tiny, sess, mode="served", max_concurrency=1)
    for r in serial:
        assert 0 < r.ttft <= r.latency
    ends = sorted((r.start_time, r.start_time + r.latency) for r in serial)
    assert all(nxt[0] >= cur[1] - 1e-6 for cur, nxt in zip(ends, ends[1:]))  # sent only when the last one ended
    with pytest.raises(ValueError, match="mode"):
        hf_peer.run_agent(tiny, sess, mode="batched")


def test_plot_optional(tmp_path):
    from radixlm.bench.plot import PlotUnavailable, plot_runs

    rs = [RequestResult(success=True, ttft=0.1 * i, itl=[0.01, 0.02], latency=1, turn=i % 3 + 1) for i in range(6)]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        with pytest.raises(PlotUnavailable, match="pip install"):
            plot_runs({"a": rs}, str(tmp_path / "p.png"))
        return
    plot_runs({"a": rs, "b": rs}, str(tmp_path / "p.png"))
    assert (tmp_path / "p.png").stat().st_size > 1000


def test_replot_from_saved_details(tmp_path):
    """Records written with --output-details load back into the same per-request results; records
    without details are refused with the flag to use."""
    import json

    from radixlm.bench.plot import PlotUnavailable, load_runs, main

    rs = [RequestResult(success=True, ttft=0.1 * i, itl=[0.01, 0.02], latency=1.0, turn=i % 3 + 1, session=i)
          for i in range(1, 5)]
    path = tmp_path / "runs.jsonl"
    with open(path, "w") as f:
        for label in ("radix", "hf"):
            f.write(json.dumps({"label": label, "details": [r.to_json() for r in rs]}) + "\n")
    runs = load_runs(str(path))
    assert list(runs) == ["radix", "hf"]
    assert [(r.ttft, r.turn, r.itl) for r in runs["hf"]] == [(r.ttft, r.turn, r.itl) for r in rs]
    bare = tmp_path / "bare.jsonl"
    bare.write_text(json.dumps({"label": "radix", "mean_ttft_ms": 1.0}) + "\n")
    with pytest.raises(ValueError, match="--output-details"):
        load_runs(str(bare))
    try:
        out = main([str(path)])
    except PlotUnavailable:
        return
    assert out == str(tmp_path / "runs.png") and (tmp_path / "runs.png").stat().st_size > 1000


def test_bench_offline_dataset_option(tiny, capsys):
    from radixlm.bench.offline import main

    main(["--model-path", tiny, "--dataset-name", "generated-shared-prefix", "--gsp-num-groups", "2",
          "--gsp-prompts-per-group", "3", "--gsp-system-prompt-len", "64", "--gsp-question-len", "4",
          "--gsp-output-len", "3", "--no-hf-baseline", "--max-running-requests", "8"])
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    on, off, summary = lines
    assert on["requests"] == 6 and on["radix_cache"] and not off["radix_cache"]
    assert on["cache_hit_rate"] > 0 and off["cache_hit_rate"] == 0 and summary["greedy_outputs_identical"]
