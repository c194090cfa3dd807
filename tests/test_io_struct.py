"""The IPC codec (`io_struct.encode`/`decode`): every registered message survives a round trip with
non-trivial field values (nested ReqOutput/FinishReason/SamplingParams included), and the codec refuses
anything that is not a registered message in both directions (a stray object is never sent, and a
pickle that names a non-whitelisted callable/class is never executed). A request's SamplingParams goes
from RequestBuilder through the codec to the scheduler's Req as one typed object (`to_req`)."""

from __future__ import annotations

import dataclasses
import os
import pickle

import pytest

from radixlm.core import FinishReason, ReqOutput
from radixlm.managers import io_struct
from radixlm.managers.io_struct import (
    AbortReq,
    BatchStrOut,
    BatchTokenIDOut,
    DetokenizeParams,
    FlushCacheReq,
    FlushCacheReqOutput,
    GetInternalStateReq,
    GetInternalStateReqOutput,
    LoRAAdapterReq,
    LoRAAdapterReqOutput,
    SchedulerReady,
    StrOut,
    TokenizedGenerateReqInput,
    decode,
    encode,
)
from radixlm.sampling_params import SamplingParams


def _out(rid: str, reason, lps: bool = True) -> ReqOutput:
    return ReqOutput(rid, [17, 4, 511], reason, prompt_tokens=9, completion_tokens=3, cached_tokens=5,
                     new_logprobs=[-0.25, -1.5, -3.0] if lps else None,
                     new_top_logprobs=[[(-0.25, 17), (-2.0, 8)], [(-1.5, 4), (-1.75, 3)], [(-3.0, 511), (-3.1, 0)]]
                     if lps else None,
                     num_retractions=2)


def _samples():
    sp = SamplingParams(max_new_tokens=7, temperature=0.5, top_p=0.9, top_k=20, stop=["\n\n", "END"],
                        stop_token_ids=[0, 2], sampling_seed=1234, logit_bias={"5": -100.0},
                        json_schema={"type": "object", "properties": {"a": {"type": "string"}}})
    detok = DetokenizeParams(skip_special_tokens=False, spaces_between_special_tokens=False, no_stop_trim=True,
                             stop=["</s>", "ü∑"])
    return {
        TokenizedGenerateReqInput: TokenizedGenerateReqInput(
            rid="req-ü-1", input_ids=[1, 2, 3, 514, 0], sampling_params=sp, return_logprob=True,
            top_logprobs_num=3, logprob_start_len=2, stream=True, seed_offset=4, lora_path="sql-ü"),
        AbortReq: AbortReq(rid="abc", abort_all=True),
        FlushCacheReq: FlushCacheReq(),
        FlushCacheReqOutput: FlushCacheReqOutput(False, "Cache not flushed: requests are running or waiting."),
        GetInternalStateReq: GetInternalStateReq(),
        GetInternalStateReqOutput: GetInternalStateReqOutput(
            {"max_total_num_tokens": 32768, "token_usage": 0.125, "cache_hit_rate": 0.5, "nested": {"a": [1, 2]},
             "none": None, "tuple": (1, "x"), "set": {3, 4}}),
        LoRAAdapterReq: LoRAAdapterReq("load", "sql", "/adapters/sql", req_id=7),
        LoRAAdapterReqOutput: LoRAAdapterReqOutput(False, "adapter 'x': rank 64 is above --max-lora-rank 16",
                                                   {"sql": "/adapters/sql"}, req_id=7),
        SchedulerReady: SchedulerReady(True, info={"max_total_num_tokens": 100, "context_len": 2048},
                                       error="no error"),
        DetokenizeParams: detok,
        BatchTokenIDOut: BatchTokenIDOut(
            outputs=[_out("a", None), _out("b", FinishReason("stop", matched="END")),
                     _out("c", FinishReason("length", length=3), lps=False),
                     _out("d", FinishReason("abort", message="Aborted by the client")),
                     _out("e", FinishReason("stop", matched=0))],
            detok_params=[detok, DetokenizeParams(), detok, DetokenizeParams(), DetokenizeParams(stop=["x"])]),
        StrOut: StrOut("b", "héllo wörld ✓", _out("b", FinishReason("stop", matched="END"))),
        BatchStrOut: BatchStrOut([
            StrOut("a", "", _out("a", None)),
            StrOut("b", "tail\ufffd", _out("b", FinishReason("length", length=3), lps=False)),
            StrOut("c", "é", _out("c", FinishReason("abort", message="boom"))),
        ]),
    }


def test_samples_cover_every_message_type():
    # A new message type must get a sample here (and thus a round-trip test).
    assert set(_samples()) == set(io_struct.MESSAGE_TYPES)


@pytest.mark.parametrize("cls", io_struct.MESSAGE_TYPES, ids=lambda c: c.__name__)
def test_round_trip(cls):
    msg = _samples()[cls]
    data = encode(msg)
    assert isinstance(data, bytes)
    back = decode(data)
    assert type(back) is cls
    assert back == msg
    assert dataclasses.asdict(back) == dataclasses.asdict(msg)
    # nested types survive as the real classes, not dicts
    if isinstance(back, BatchTokenIDOut):
        assert all(type(o) is ReqOutput for o in back.outputs)
        assert [type(o.finished_reason) for o in back.outputs][1:] == [FinishReason] * 4
        assert all(type(p) is DetokenizeParams for p in back.detok_params)
    if isinstance(back, BatchStrOut):
        assert all(type(i) is StrOut and type(i.output) is ReqOutput for i in back.items)
    if isinstance(back, TokenizedGenerateReqInput):
        assert type(back.sampling_params) is SamplingParams
    # a second trip is stable too
    assert decode(encode(back)) == msg


@pytest.mark.parametrize("obj", [None, 1, "text", b"bytes", {"rid": "x"}, [AbortReq("x")],
                                 ReqOutput("r", [], None, 1, 0, 0), FinishReason("length", length=1),
                                 SamplingParams(), object()],
                         ids=lambda o: type(o).__name__)
def test_encode_rejects_non_messages(obj):
    with pytest.raises(TypeError, match="not a radixlm IPC message"):
        encode(obj)


class _Custom:
    def __init__(self, v=1):
        self.v = v


class _Evil:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.remove, (self.path,))


def test_decode_rejects_non_whitelisted_callables():
    with pytest.raises(pickle.UnpicklingError, match="not a radixlm IPC message"):
        decode(pickle.dumps(os.system))
    # builtins is only partly whitelisted (containers): eval/getattr/__import__ stay out
    for fn in (eval, getattr, __import__):
        with pytest.raises(pickle.UnpicklingError):
            decode(pickle.dumps(fn))


def test_decode_rejects_custom_class_and_never_runs_reduce(tmp_path):
    with pytest.raises(pickle.UnpicklingError, match="not a radixlm IPC message"):
        decode(pickle.dumps(_Custom(3)))
    victim = tmp_path / "victim"
    victim.write_text("keep me")
    payload = pickle.dumps(_Evil(str(victim)))
    with pytest.raises(pickle.UnpicklingError):
        decode(payload)
    assert victim.exists()
    # hidden inside a registered message is no better
    with pytest.raises(pickle.UnpicklingError):
        decode(pickle.dumps(AbortReq(rid=_Evil(str(victim)))))  # type: ignore[arg-type]
    assert victim.exists()
    with pytest.raises(pickle.UnpicklingError):
        decode(encode(GetInternalStateReqOutput({"x": _Custom()})))


def test_decode_rejects_garbage():
    with pytest.raises(Exception):
        decode(b"definitely not a pickle")
    with pytest.raises(Exception):
        decode(b"")


@pytest.mark.parametrize("obj", [{"rid": "x"}, 42, ReqOutput("r", [1], None, 1, 1, 0)], ids=lambda o: type(o).__name__)
def test_decode_rejects_top_level_non_message(obj):
    with pytest.raises((pickle.UnpicklingError, TypeError)):
        decode(pickle.dumps(obj))


# ------------------------------------------------------------------ SamplingParams end to end
def _built(sp_dict, n_prompts=1):
    from radixlm.managers.request_builder import RequestBuilder

    builder = RequestBuilder(None, vocab_size=600, context_len=64, grammar_backend="none")
    msgs, _ = builder.build(input_ids=[[5, 6, 7]] * n_prompts if n_prompts > 1 else [5, 6, 7],
                            sampling_params=sp_dict)
    return msgs


def test_sampling_params_cross_the_codec_as_one_typed_object():
    from radixlm.managers.io_struct import to_req

    msgs = _built({"temperature": 0.7, "top_k": 5, "stop": "END", "stop_token_ids": [3], "n": 2,
                   "sampling_seed": 11, "max_new_tokens": 8})
    assert len(msgs) == 2 and all(type(m.sampling_params) is SamplingParams for m in msgs)
    sp = msgs[0].sampling_params
    assert msgs[1].sampling_params is sp  # one prompt, one verified object for its n samples
    for m in msgs:
        back = decode(encode(m))
        assert type(back.sampling_params) is SamplingParams and back.sampling_params == sp
        req = to_req(back)
        assert type(req.sampling_params) is SamplingParams and req.sampling_params == sp
        assert req.sampling_params is not back.sampling_params  # the Req's own copy
        assert req.rid == m.rid and req.origin_input_ids == [5, 6, 7]
    # in-process (no codec): each sample's Req still gets its own copy, the message stays untouched
    reqs = [to_req(m) for m in msgs]
    reqs[0].sampling_params.max_new_tokens = 1
    assert reqs[1].sampling_params.max_new_tokens == sp.max_new_tokens == 8
    # the n samples: seeds sampling_seed + i
    a, b = (torch_first(r) for r in reqs)
    assert a != b


def torch_first(req) -> float:
    import torch

    return float(torch.rand(1, generator=req.generator))


@pytest.mark.parametrize("bad", [{"max_new_tokens": 1}, {"bogus": 1}, None, "x"], ids=repr)
def test_to_req_refuses_sampling_params_that_are_not_the_typed_object(bad):
    from radixlm.managers.io_struct import to_req

    msg = decode(encode(TokenizedGenerateReqInput(rid="r", input_ids=[1, 2], sampling_params=bad)))
    with pytest.raises(TypeError, match="SamplingParams"):
        to_req(msg)


def test_to_req_verifies_sampling_params_from_another_process():
    from radixlm.managers.io_struct import to_req

    sp = SamplingParams(max_new_tokens=4)
    sp.temperature = -1.0  # what a foreign sender could put into a pickled message
    msg = decode(encode(TokenizedGenerateReqInput(rid="r", input_ids=[1, 2], sampling_params=sp)))
    with pytest.raises(ValueError, match="temperature"):
        to_req(msg)


def test_sampling_params_payload_cannot_smuggle_a_callable(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("keep me")
    sp = SamplingParams(max_new_tokens=4, stop=[_Evil(str(victim))])  # type: ignore[list-item]
    with pytest.raises(pickle.UnpicklingError):
        decode(pickle.dumps(TokenizedGenerateReqInput(rid="r", input_ids=[1], sampling_params=sp)))
    assert victim.exists()
