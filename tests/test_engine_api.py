"""The offline `Engine` API as a user sees it: return shapes, input_ids input, streaming, asyncio,
concurrent callers, abort, input validation (before anything is scheduled, without disturbing
requests in flight), flush_cache, page_size, load formats, dtype and sharded checkpoints."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import threading
import time
from typing import Dict, List

import pytest
import torch

import radixlm
from tests.conftest import random_prompts

SPECIAL = (0, 1, 2)
GREEDY = {"temperature": 0, "max_new_tokens": 12, "ignore_eos": True}


def prompts_for(seed: int, lengths: List[int], vocab: int = 515) -> List[List[int]]:
    return random_prompts(seed, lengths, vocab, avoid=SPECIAL)


def wait_idle(eng, timeout: float = 10.0) -> Dict:
    deadline = time.monotonic() + timeout
    while True:
        info = eng.get_server_info()
        if info["num_running_reqs"] == 0 and info["num_queue_reqs"] == 0:
            return info
        if time.monotonic() > deadline:
            raise AssertionError(f"engine still busy: {info}")
        time.sleep(0.01)


def assert_pool_whole(eng) -> None:
    info = wait_idle(eng)
    eng.check_integrity()
    assert info["free_kv_tokens"] + info["evictable_kv_tokens"] == info["max_total_num_tokens"]


# ---------------------------------------------------------------------------------- shapes
def test_single_prompt_returns_dict_list_returns_list(eng):
    one = eng.generate("Hello there", GREEDY)
    assert isinstance(one, dict)
    assert set(one) >= {"text", "output_ids", "meta_info"}
    assert isinstance(one["text"], str) and len(one["output_ids"]) == 12
    meta = one["meta_info"]
    assert meta["prompt_tokens"] == len(eng.tokenizer.encode("Hello there"))
    assert meta["completion_tokens"] == 12
    assert meta["finish_reason"] == {"type": "length", "length": 12}
    batch = eng.generate(["Hello there"], GREEDY)
    assert isinstance(batch, list) and len(batch) == 1
    assert batch[0]["output_ids"] == one["output_ids"] and batch[0]["text"] == one["text"]
    two = eng.generate(["Hello there", "Good morning"], GREEDY)
    assert [o["output_ids"] for o in two][0] == one["output_ids"] and len(two) == 2


def test_input_ids_input(eng):
    ids = eng.tokenizer.encode("Hello there")
    by_text = eng.generate("Hello there", GREEDY)
    by_ids = eng.generate(input_ids=ids, sampling_params=GREEDY)
    assert isinstance(by_ids, dict)
    assert by_ids["output_ids"] == by_text["output_ids"] and by_ids["text"] == by_text["text"]
    batch = eng.generate(input_ids=[ids, ids[:2]], sampling_params=GREEDY)
    assert isinstance(batch, list) and len(batch) == 2
    assert batch[0]["output_ids"] == by_text["output_ids"]


def test_custom_rid(eng):
    out = eng.generate("Hi", {"max_new_tokens": 2}, rid="my-request")
    assert out["meta_info"]["id"] == "my-request"
    with pytest.raises(ValueError, match="rid"):
        eng.generate(["a", "b"], {"max_new_tokens": 2}, rid=["x", "x"])


# ---------------------------------------------------------------------------------- streaming
def test_stream_increments_add_up(eng):
    prompt = "Once upon a time"
    sp = {"temperature": 0, "max_new_tokens": 30, "ignore_eos": True}
    full = eng.generate(prompt, sp)
    chunks = list(eng.generate(prompt, sp, stream=True))
    assert len(chunks) >= 2
    assert "".join(c["text"] for c in chunks) == full["text"]
    assert [t for c in chunks for t in c["output_ids"]] == full["output_ids"]
    assert all(c["index"] == 0 for c in chunks)
    assert all(c["meta_info"]["finish_reason"] is None for c in chunks[:-1])
    assert chunks[-1]["meta_info"]["finish_reason"] == {"type": "length", "length": 30}
    assert chunks[-1]["meta_info"]["completion_tokens"] == 30


def test_stream_batch_uses_index(eng):
    prompts = ["Once upon a time", "In the beginning"]
    sp = {"temperature": 0, "max_new_tokens": 10, "ignore_eos": True}
    full = eng.generate(prompts, sp)
    ids: Dict[int, list] = {0: [], 1: []}
    text: Dict[int, str] = {0: "", 1: ""}
    for c in eng.generate(prompts, sp, stream=True):
        ids[c["index"]] += c["output_ids"]
        text[c["index"]] += c["text"]
    for i in (0, 1):
        assert ids[i] == full[i]["output_ids"] and text[i] == full[i]["text"]
    # n samples of one prompt stream under indices 0..n-1
    seen = {c["index"] for c in eng.generate(prompts[0], {**sp, "n": 2}, stream=True)}
    assert seen == {0, 1}


# ---------------------------------------------------------------------------------- result shape
META_HEAD = ["id", "finish_reason", "prompt_tokens", "completion_tokens", "cached_tokens"]


def test_result_has_the_servers_shape(eng):
    """Engine and server build results with the same ReqState: SGLang's meta_info keys in SGLang's
    order, (logprob, id, text) entries, top logprobs only when asked for, e2e_latency once finished."""
    p = prompts_for(3, [7], 515)[0]
    sp = {**GREEDY, "max_new_tokens": 4}
    plain = eng.generate(input_ids=p, sampling_params=sp)["meta_info"]
    assert list(plain) == META_HEAD + ["e2e_latency"]
    m = eng.generate(input_ids=p, sampling_params=sp, return_logprob=True)["meta_info"]
    assert list(m) == META_HEAD + ["e2e_latency", "output_token_logprobs", "input_token_logprobs"]
    assert all(type(e) is tuple and len(e) == 3 and e[2] is None for e in m["output_token_logprobs"])
    m = eng.generate(input_ids=p, sampling_params=sp, return_logprob=True, top_logprobs_num=2,
                     logprob_start_len=0)["meta_info"]
    assert list(m) == META_HEAD + ["e2e_latency", "output_token_logprobs", "output_top_logprobs",
                                   "input_token_logprobs", "input_top_logprobs"]
    assert len(m["output_top_logprobs"]) == 4 and all(len(t) == 2 for t in m["output_top_logprobs"])
    assert len(m["input_token_logprobs"]) == len(p) and m["input_top_logprobs"][0] is None
    chunks = list(eng.generate(input_ids=p, sampling_params=sp, stream=True))
    assert all("e2e_latency" not in c["meta_info"] for c in chunks[:-1])
    assert chunks[-1]["meta_info"]["e2e_latency"] > 0


def test_req_state_folds_outputs_into_sglangs_result():
    from radixlm.core import FinishReason, ReqOutput
    from radixlm.managers.io_struct import StrOut, TokenizedGenerateReqInput
    from radixlm.managers.req_state import ReqState
    from radixlm.sampling_params import SamplingParams

    msg = TokenizedGenerateReqInput("r1", [4, 5, 6], SamplingParams(max_new_tokens=3), return_logprob=True,
                                    top_logprobs_num=1, logprob_start_len=1)
    st = ReqState(msg)
    first = ReqOutput("r1", [7, 8], None, 3, 2, cached_tokens=2, new_logprobs=[-0.5, -1.0],
                      new_top_logprobs=[[(-0.5, 7)], [(-1.0, 8)]], input_token_logprobs=[(-2.0, 5), (-3.0, 6)],
                      input_top_logprobs=[None, [(-3.0, 6)]])
    st.absorb(StrOut("r1", "ab", first))
    assert not st.finished and st.event.is_set()
    d = st.to_dict()
    assert d["text"] == "ab" and d["output_ids"] == [7, 8] and "e2e_latency" not in d["meta_info"]
    st.absorb(StrOut("r1", "c", ReqOutput("r1", [9], FinishReason("length", length=3), 3, 3, cached_tokens=2,
                                          new_logprobs=[-0.25], new_top_logprobs=[[(-0.25, 9)]],
                                          num_retractions=1)))
    assert st.finished
    d = st.to_dict(True, lambda t: f"<{t}>")
    m = d["meta_info"]
    assert d["text"] == "abc" and d["output_ids"] == [7, 8, 9]
    assert m["finish_reason"] == {"type": "length", "length": 3} and m["num_retractions"] == 1
    assert (m["prompt_tokens"], m["completion_tokens"], m["cached_tokens"]) == (3, 3, 2)
    assert m["output_token_logprobs"] == [(-0.5, 7, "<7>"), (-1.0, 8, "<8>"), (-0.25, 9, "<9>")]
    assert m["output_top_logprobs"][2] == [(-0.25, 9, "<9>")]
    assert m["input_token_logprobs"] == [(-2.0, 5, "<5>"), (-3.0, 6, "<6>")]
    assert m["input_top_logprobs"] == [None, [(-3.0, 6, "<6>")]]
    assert json.loads(json.dumps(d))["meta_info"]["output_token_logprobs"][0] == [-0.5, 7, "<7>"]
    other = ReqState(msg)
    other.fail(RuntimeError("gone"))
    assert other.finished and isinstance(other.error, RuntimeError) and other.finished_reason is None


# ---------------------------------------------------------------------------------- asyncio
def test_async_generate_plain_and_stream(eng):
    prompt = "Hello world, this is"
    sp = {"temperature": 0, "max_new_tokens": 20, "ignore_eos": True}
    want = eng.generate(prompt, sp)

    async def main():
        plain = await eng.async_generate(prompt, sp)
        pieces = []
        async for c in await eng.async_generate(prompt, sp, stream=True):
            pieces.append(c)
        many = await asyncio.gather(*[eng.async_generate(p, sp) for p in ["a b", "c d", prompt]])
        return plain, pieces, many

    plain, pieces, many = asyncio.run(main())
    assert isinstance(plain, dict)
    assert plain["output_ids"] == want["output_ids"] and plain["text"] == want["text"]
    assert "".join(c["text"] for c in pieces) == want["text"]
    assert [t for c in pieces for t in c["output_ids"]] == want["output_ids"]
    assert many[2]["output_ids"] == want["output_ids"]


def test_async_validation_error(eng):
    async def main():
        await eng.async_generate("hi", {"temperature": -1})

    with pytest.raises(ValueError, match="temperature"):
        asyncio.run(main())


# ---------------------------------------------------------------------------------- threads
def test_concurrent_threads_get_their_solo_outputs(eng):
    groups = [prompts_for(20 + i, [5 + 7 * i, 30 - 3 * i, 2 + i], 515) for i in range(4)]
    sp = {"temperature": 0, "max_new_tokens": 16, "ignore_eos": True}
    alone = [[eng.generate(input_ids=p, sampling_params=sp)["output_ids"] for p in g] for g in groups]
    results: Dict[int, list] = {}
    errors: list = []
    barrier = threading.Barrier(4)

    def worker(i):
        try:
            barrier.wait()
            results[i] = [eng.generate(input_ids=p, sampling_params=sp)["output_ids"] for p in groups[i]]
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors
    assert [results[i] for i in range(4)] == alone
    assert_pool_whole(eng)


# ---------------------------------------------------------------------------------- abort
def test_abort_by_leaving_a_stream(eng):
    sp = {"temperature": 0, "max_new_tokens": 1500, "ignore_eos": True}
    got = 0
    for _ in eng.generate("Abort me please", sp, stream=True):
        got += 1
        if got == 2:
            break
    info = wait_idle(eng)
    assert info["generated_tokens"] < 1500  # it did not run to completion
    assert_pool_whole(eng)
    # the engine keeps serving
    assert len(eng.generate("after abort", GREEDY)["output_ids"]) == 12


def test_abort_request_by_rid(eng):
    sp = {"temperature": 0, "max_new_tokens": 1500, "ignore_eos": True}
    stream = eng.generate("Abort by id", sp, stream=True, rid="to-abort")
    first = next(stream)
    assert first["meta_info"]["finish_reason"] is None
    eng.abort_request("to-abort")
    rest = list(stream)
    assert rest and rest[-1]["meta_info"]["finish_reason"]["type"] == "abort"
    assert 1 + sum(len(c["output_ids"]) for c in rest) < 1500
    assert_pool_whole(eng)


def test_abort_async_stream(eng):
    sp = {"temperature": 0, "max_new_tokens": 1500, "ignore_eos": True}

    async def main():
        agen = await eng.async_generate("async abort", sp, stream=True)
        n = 0
        async for _ in agen:
            n += 1
            if n == 2:
                break
        await agen.aclose()
        # wait while this event loop is still running
        return await asyncio.to_thread(wait_idle, eng)

    info = asyncio.run(main())
    assert info["num_running_reqs"] == 0
    assert_pool_whole(eng)


def _answers(fn, timeout: float = 5.0) -> bool:
    """True when fn() returns within timeout (a dead scheduler thread makes engine calls hang)."""
    done = threading.Event()
    threading.Thread(target=lambda: (fn(), done.set()), daemon=True).start()
    return done.wait(timeout)


def test_async_stream_closed_at_loop_exit_keeps_engine_alive(path):
    sp = {"temperature": 0, "max_new_tokens": 1500, "ignore_eos": True}
    with radixlm.Engine(model_path=path, log_level="critical") as e:
        busy, release = threading.Event(), threading.Event()

        def hold(_scheduler):  # keeps the scheduler thread busy so that it sees the abort after the loop closed
            busy.set()
            release.wait(5)

        async def main():
            agen = await e.async_generate("closed at exit", sp, stream=True)
            await agen.__anext__()
            threading.Thread(target=e.loop.call, args=(hold,), daemon=True).start()
            assert busy.wait(5)
            await agen.aclose()  # the user is done; asyncio.run closes the loop right after

        asyncio.run(main())
        release.set()
        assert _answers(e.get_server_info), "engine hangs: scheduler thread died"
        assert len(e.generate("still serving", GREEDY)["output_ids"]) == 12


def test_cancelled_async_generate_is_aborted(eng):
    sp = {"temperature": 0, "max_new_tokens": 600, "ignore_eos": True}

    async def main():
        before = eng.get_server_info()["generated_tokens"]
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(eng.async_generate("cancel me", sp), 0.05)
        info = await asyncio.to_thread(wait_idle, eng)  # loop still alive: deliveries succeed
        return info["generated_tokens"] - before

    assert asyncio.run(main()) < 600
    assert_pool_whole(eng)


def test_cancelled_async_generate_does_not_hurt_others(path):
    sp = {"temperature": 0, "max_new_tokens": 300, "ignore_eos": True}
    with radixlm.Engine(model_path=path, log_level="critical") as e:
        res: Dict[str, object] = {}

        def bystander():
            try:
                res["out"] = e.generate("bystander", sp)
            except Exception as ex:  # noqa: BLE001
                res["err"] = ex

        t = threading.Thread(target=bystander)
        t.start()

        async def main():
            try:
                await asyncio.wait_for(e.async_generate("cancel me", {**sp, "max_new_tokens": 1500}), 0.05)
            except asyncio.TimeoutError:
                pass

        asyncio.run(main())
        t.join(30)
        assert "err" not in res, res.get("err")
        assert len(res["out"]["output_ids"]) == 300
        assert _answers(e.get_server_info), "engine hangs: scheduler thread died"


# ---------------------------------------------------------------------------------- validation
BAD_SAMPLING = [
    ({"foo": 1}, "foo"),
    ({"temperature": -0.5}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": 0}, "top_k"),
    ({"n": 0}, r"\bn\b"),
    ({"max_new_tokens": -1}, "max_new_tokens"),
    ({"min_p": 2}, "min_p"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"frequency_penalty": 3}, "frequency_penalty"),
    ({"presence_penalty": -2.5}, "presence_penalty"),
    ({"min_new_tokens": 5, "max_new_tokens": 2}, "min_new_tokens"),
    ({"stop": [""]}, "stop"),
    ({"stop_token_ids": [-1]}, "stop_token_ids"),
    ({"sampling_seed": "x"}, "sampling_seed"),
    ({"regex": "a("}, "regex"),
    ({"regex": "a+", "json_schema": "{}"}, "regex"),
    ({"json_schema": "{not json"}, "json_schema"),
]


@pytest.mark.parametrize("bad,field", BAD_SAMPLING, ids=[f for _, f in BAD_SAMPLING])
def test_bad_sampling_params_raise(eng, bad, field):
    with pytest.raises(ValueError, match=field):
        eng.generate("hello", {"max_new_tokens": 4, **bad})


def test_bad_inputs_raise(eng):
    with pytest.raises(ValueError, match="empty"):
        eng.generate("", {"max_new_tokens": 4})
    with pytest.raises(ValueError, match="empty"):
        eng.generate(input_ids=[], sampling_params={"max_new_tokens": 4})
    with pytest.raises(ValueError, match="input_ids"):
        eng.generate(input_ids=[5, 515], sampling_params={"max_new_tokens": 4})
    with pytest.raises(ValueError, match="input_ids"):
        eng.generate(input_ids=[5, -1], sampling_params={"max_new_tokens": 4})
    with pytest.raises(ValueError, match="input_ids"):  # exactly one of prompt / input_ids
        eng.generate(prompt="x", input_ids=[5], sampling_params={"max_new_tokens": 4})
    with pytest.raises(ValueError, match="input_ids"):
        eng.generate()
    with pytest.raises(ValueError, match="top_logprobs_num"):
        eng.generate("x", {"max_new_tokens": 4}, return_logprob=True, top_logprobs_num=-1)
    with pytest.raises(ValueError, match="sampling_params"):
        eng.generate(["a", "b"], [{"max_new_tokens": 1}] * 3)


def test_validation_happens_before_scheduling_and_spares_in_flight(eng):
    prompt = prompts_for(30, [20])[0]
    sp = {"temperature": 0, "max_new_tokens": 60, "ignore_eos": True}
    want = eng.generate(input_ids=prompt, sampling_params=sp)["output_ids"]
    stream = eng.generate(input_ids=prompt, sampling_params=sp, stream=True)
    first = next(stream)
    for bad, field in BAD_SAMPLING:
        # two good prompts before the bad one: nothing of the call may be scheduled
        with pytest.raises(ValueError, match=field):
            eng.generate(["good one", "good two", "bad"], [{"max_new_tokens": 4}] * 2 + [{"max_new_tokens": 4, **bad}])
        info = eng.get_server_info()
        assert info["num_queue_reqs"] == 0 and info["num_running_reqs"] <= 1
    with pytest.raises(ValueError, match="input_ids"):
        eng.generate(input_ids=[[5, 6], [7, 999]], sampling_params={"max_new_tokens": 4})
    assert eng.get_server_info()["num_queue_reqs"] == 0
    rest = list(stream)
    assert first["output_ids"] + [t for c in rest for t in c["output_ids"]] == want
    assert rest[-1]["meta_info"]["finish_reason"] == {"type": "length", "length": 60}
    assert_pool_whole(eng)


@pytest.fixture(scope="module")
def eng_ctx64(path):
    with radixlm.Engine(model_path=path, log_level="warning", context_length=64) as e:
        yield e


def test_context_length_limits(eng_ctx64):
    e = eng_ctx64
    assert e.get_server_info()["max_total_num_tokens"] > 0
    with pytest.raises(ValueError, match="context length"):
        e.generate(input_ids=prompts_for(31, [64])[0], sampling_params={"max_new_tokens": 1})
    with pytest.raises(ValueError, match="context length"):
        e.generate(input_ids=prompts_for(31, [100])[0], sampling_params={"max_new_tokens": 1})
    with pytest.raises(ValueError, match="max_new_tokens"):
        e.generate(input_ids=prompts_for(32, [60])[0], sampling_params={"max_new_tokens": 10})
    # right at the limit works and stops there
    out = e.generate(input_ids=prompts_for(33, [60])[0], sampling_params={"max_new_tokens": 4, "ignore_eos": True})
    assert len(out["output_ids"]) == 4
    assert_pool_whole(e)


# ---------------------------------------------------------------------------------- cache
def test_flush_cache(eng):
    prompt = prompts_for(40, [30])[0]
    sp = {"temperature": 0, "max_new_tokens": 4, "ignore_eos": True}
    first = eng.generate(input_ids=prompt, sampling_params=sp)
    again = eng.generate(input_ids=prompt, sampling_params=sp)
    assert again["meta_info"]["cached_tokens"] >= len(prompt) - 1
    # not while a request is in flight
    stream = eng.generate(input_ids=prompt, sampling_params={**sp, "max_new_tokens": 200}, stream=True)
    next(stream)
    assert eng.flush_cache() is False
    list(stream)
    wait_idle(eng)
    assert eng.flush_cache() is True
    info = eng.get_server_info()
    assert info["evictable_kv_tokens"] == 0
    assert info["free_kv_tokens"] == info["max_total_num_tokens"]
    after = eng.generate(input_ids=prompt, sampling_params=sp)
    assert after["meta_info"]["cached_tokens"] == 0
    assert after["output_ids"] == first["output_ids"]
    eng.check_integrity()


def test_page_size_4_matches_page_size_1(eng, path):
    prompts = prompts_for(41, list(range(1, 71)))
    sp = {"temperature": 0, "max_new_tokens": 6, "ignore_eos": True}
    want = [o["output_ids"] for o in eng.generate(input_ids=prompts, sampling_params=sp)]
    with radixlm.Engine(model_path=path, log_level="warning", page_size=4) as e4:
        got = e4.generate(input_ids=prompts, sampling_params=sp)
        assert [o["output_ids"] for o in got] == want
        again = e4.generate(input_ids=prompts, sampling_params=sp)
        assert [o["output_ids"] for o in again] == want
        cached = [o["meta_info"]["cached_tokens"] for o in again]
        assert all(c % 4 == 0 for c in cached)
        assert cached == [(len(p) - 1) // 4 * 4 for p in prompts]
        assert_pool_whole(e4)


# ---------------------------------------------------------------------------------- loading
def test_dummy_load_format(path):
    with radixlm.Engine(model_path=path, log_level="warning", load_format="dummy") as e:
        outs = e.generate(["Hello", "World peace"], {"temperature": 0, "max_new_tokens": 5, "ignore_eos": True})
        for o in outs:
            assert len(o["output_ids"]) == 5
            assert all(0 <= t < e.model_config.vocab_size for t in o["output_ids"])
            assert o["meta_info"]["finish_reason"] == {"type": "length", "length": 5}


def test_bfloat16_runs_and_roughly_agrees(eng, path):
    prompts = prompts_for(42, [3, 7, 11, 15, 19, 23, 27, 31, 35, 39])
    sp = {"temperature": 0, "max_new_tokens": 4, "ignore_eos": True}
    f32 = [o["output_ids"] for o in eng.generate(input_ids=prompts, sampling_params=sp)]
    with radixlm.Engine(model_path=path, log_level="warning", dtype="bfloat16") as e:
        assert e.model_config.dtype is torch.bfloat16
        bf = [o["output_ids"] for o in e.generate(input_ids=prompts, sampling_params=sp)]
    assert all(len(o) == 4 for o in bf)
    assert sum(a[0] == b[0] for a, b in zip(f32, bf)) >= 7


def _shard_checkpoint(src: str, dst: str) -> None:
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    os.remove(os.path.join(dst, "model.safetensors"))
    tensors = load_file(os.path.join(src, "model.safetensors"))
    names = sorted(tensors)
    half = len(names) // 2
    weight_map = {}
    for i, part in enumerate((names[:half], names[half:])):
        fname = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({n: tensors[n] for n in part}, os.path.join(dst, fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in part})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    with open(os.path.join(dst, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)


def test_sharded_checkpoint_gives_identical_output(eng, path, tmp_path):
    sharded = str(tmp_path / "sharded")
    _shard_checkpoint(path, sharded)
    prompts = prompts_for(43, [2, 9, 25])
    sp = {"temperature": 0, "max_new_tokens": 10, "ignore_eos": True}
    want = eng.generate(input_ids=prompts, sampling_params=sp, return_logprob=True)
    with radixlm.Engine(model_path=sharded, log_level="warning") as e:
        got = e.generate(input_ids=prompts, sampling_params=sp, return_logprob=True)
    assert [o["output_ids"] for o in got] == [o["output_ids"] for o in want]
    assert [o["meta_info"]["output_token_logprobs"] for o in got] == \
        [o["meta_info"]["output_token_logprobs"] for o in want]


# ---------------------------------------------------------------------------------- policies
@pytest.mark.parametrize("policy", [
    "lof", "random",
    "dfs-weight",
])
def test_other_schedule_policies_give_the_same_greedy_outputs(eng, path, policy):
    prompts = prompts_for(44, [3, 30, 12, 30, 7])
    prompts[3][:20] = prompts[1][:20]  # a shared prefix
    sp = {"temperature": 0, "max_new_tokens": 6, "ignore_eos": True}
    want = [o["output_ids"] for o in eng.generate(input_ids=prompts, sampling_params=sp)]
    with radixlm.Engine(model_path=path, log_level="critical", schedule_policy=policy) as e:
        assert [o["output_ids"] for o in e.generate(input_ids=prompts, sampling_params=sp)] == want
        assert_pool_whole(e)
