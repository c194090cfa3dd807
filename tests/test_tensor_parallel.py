"""Tensor parallelism on CPU with 2 gloo ranks (127.0.0.1 only).

* TP=2 gives the greedy tokens of TP=1 on every architecture (logprobs, prompt logprobs included,
  within float32 all-reduce-order tolerance), through the offline Engine (rank 0 in-process, rank 1
  a child it spawns and joins at shutdown).
* Fewer KV heads than ranks: the KV head is replicated, tokens still match.
* A tp_size the heads do not divide: a clear error naming tp_size, before any process starts.
* A live `launch_server --tp 2` answers /generate like TP=1; a killed follower rank makes it
  answer 503 and exit within a bounded time, children included.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import Any, Dict, List

import pytest
import requests

import radixlm
from radixlm.layers.linear import kv_head_sharding
from tests.conftest import ARCHS, random_prompts
from tests.server_utils import (
    ServerProcess,
    assert_exits_with_children,
    assert_inflight_answered,
    children,
    comm,
    poll_until_unavailable,
    start_inflight,
)

ENGINE_KW = dict(log_level="warning", max_total_tokens=4096, chunked_prefill_size=16)
SP = {"temperature": 0, "max_new_tokens": 10, "ignore_eos": True}


def _run(path: str, prompts: List[List[int]], **kw) -> List[Dict[str, Any]]:
    with radixlm.Engine(model_path=path, **ENGINE_KW, **kw) as eng:
        outs = eng.generate(input_ids=prompts, sampling_params=SP, return_logprob=True, logprob_start_len=0)
        # a second round shares prefixes with the first (radix cache hits on every rank)
        outs += eng.generate(input_ids=[p + [7, 8] for p in prompts[:2]], sampling_params=SP)
        procs = list(getattr(eng, "_tp_procs", []))
    for p in procs:  # shutdown stopped and joined the follower ranks
        assert not p.is_alive() and p.exitcode == 0, (p.name, p.exitcode)
    return outs


def _assert_same(ref: List[Dict[str, Any]], tp: List[Dict[str, Any]]) -> None:
    assert [o["output_ids"] for o in tp] == [o["output_ids"] for o in ref]
    for a, b in zip(ref, tp):
        for key in ("output_token_logprobs", "input_token_logprobs"):
            la = [e[0] for e in a["meta_info"].get(key) or [] if e[0] is not None]
            lb = [e[0] for e in b["meta_info"].get(key) or [] if e[0] is not None]
            assert len(la) == len(lb)
            assert all(abs(x - y) < 1e-3 for x, y in zip(la, lb)), (key, la, lb)


@pytest.mark.parametrize("arch", ARCHS)
def test_tp2_greedy_tokens_match_tp1(model_factory, arch):
    path = model_factory(arch)  # tiny: 6 query heads, 2 KV heads, intermediate 200: all divide by 2
    prompts = random_prompts(13, [5, 23, 40], 500)
    _assert_same(_run(path, prompts), _run(path, prompts, tp_size=2))


def test_kv_heads_fewer_than_ranks_are_replicated(model_factory):
    assert kv_head_sharding(6, 1, 2, 0) == (1, 0) and kv_head_sharding(6, 1, 2, 1) == (1, 0)
    assert kv_head_sharding(8, 2, 4, 3) == (1, 1) and kv_head_sharding(8, 4, 2, 1) == (2, 1)
    path = model_factory("qwen2", num_key_value_heads=1)  # MQA: one KV head for 2 ranks
    prompts = random_prompts(5, [9, 30], 500)
    _assert_same(_run(path, prompts), _run(path, prompts, tp_size=2))


def test_tp_size_that_does_not_divide_the_heads_is_a_clear_error(model_factory):
    path = model_factory("llama", num_attention_heads=3, num_key_value_heads=1)  # head_dim 32
    before = set(children(os.getpid()))
    with pytest.raises(ValueError, match="tp_size 2 .*num_attention_heads 3"):
        radixlm.Engine(model_path=path, tp_size=2, log_level="warning")
    assert set(children(os.getpid())) <= before  # refused before any rank started
    for bad in (dict(num_key_value_heads=3), dict(intermediate_size=201)):  # KV heads, MLP
        with pytest.raises(ValueError, match="tp_size 2"):
            radixlm.Engine(model_path=model_factory("llama", num_attention_heads=6, **bad), tp_size=2)
    # the CLI says it in one line and exits 1 (no traceback, no HTTP server)
    r = subprocess.run([sys.executable, "-m", "radixlm.launch_server", "--model-path", path, "--tp", "2",
                        "--port", "1"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "tp_size 2" in r.stderr and "Traceback" not in r.stderr, r.stderr


# ------------------------------------------------------------------------------ the server
@pytest.fixture(scope="module")
def tp_server(qwen2_path):
    with ServerProcess(qwen2_path, ["--tp", "2", "--max-total-tokens", "4096"]) as s:
        yield s


def test_server_tp2_generate_matches_tp1(tp_server, qwen2_path):
    prompts = random_prompts(21, [7, 19], 500)
    with radixlm.Engine(model_path=qwen2_path, log_level="warning", max_total_tokens=4096) as eng:
        ref = [o["output_ids"] for o in eng.generate(input_ids=prompts, sampling_params=SP)]
    r = requests.post(tp_server.base_url + "/generate", json={"input_ids": prompts, "sampling_params": SP},
                      timeout=60)
    assert r.status_code == 200, r.text
    assert [o["output_ids"] for o in r.json()] == ref
    ranks = [p for p in children(tp_server.proc.pid) if comm(p) == "radixlm-tp1"]
    assert len(ranks) == 1  # one process per rank: rank 0 is the scheduler, rank 1 this one


def test_killed_follower_rank_gives_503_and_server_exits(tp_server):
    """Runs last on the module's server (it kills it)."""
    s = tp_server
    (follower,) = [p for p in children(s.proc.pid) if comm(p) == "radixlm-tp1"]
    # in flight when the rank dies: answered, never left hanging
    t, inflight = start_inflight(s.base_url, {"input_ids": [5] * 20, "sampling_params": {
        "temperature": 0, "max_new_tokens": 1500, "ignore_eos": True}})
    time.sleep(0.5)
    os.kill(follower, signal.SIGKILL)
    poll_until_unavailable(s.base_url, 15, lambda msg: "unavailable" in msg)
    assert_inflight_answered(t, inflight)
    assert_exits_with_children(s.proc, 20, "its follower rank's death")


def test_multi_node_flags_are_checked_and_map_ranks_to_nodes():
    from radixlm.distributed.parallel_state import parse_init_addr
    from radixlm.engine.tp_worker import follower_ranks
    from radixlm.launch_server import parse_args
    from radixlm.server_args import ServerArgs

    with pytest.raises(ValueError, match="dist_init_addr"):
        ServerArgs(model_path="m", tp_size=2, nnodes=2)
    with pytest.raises(ValueError, match="tp_size"):
        ServerArgs(model_path="m", tp_size=3, nnodes=2, dist_init_addr="10.0.0.1:5000")
    a = parse_args(["--model-path", "m", "--tp", "4", "--nnodes", "2", "--node-rank", "1",
                    "--nccl-init-addr", "10.0.0.1:5000"])
    assert (a.tp_size, a.nnodes, a.node_rank, a.dist_init_addr) == (4, 2, 1, "10.0.0.1:5000")
    assert follower_ranks(4, 2, 0) == [1] and follower_ranks(4, 2, 1) == [2, 3] and follower_ranks(2, 1, 0) == [1]
    assert parse_init_addr("10.0.0.1:5000") == ("10.0.0.1", 5000) and parse_init_addr("[::1]:7") == ("::1", 7)
    with pytest.raises(ValueError, match="host:port"):
        parse_init_addr("10.0.0.1")
