"""Prefill/decode disaggregation (radixlm/disaggregation/).

* Wire format the router speaks, without the router: every request the real sglang-router 0.3.2 sent
  to a prefill and a decode worker in PD mode (tests/fixtures/sglang_router_0.3.2_pd.json, recorded
  with `python -m tests.router_stub --record-pd ...`) is parsed by our request path, bootstrap fields
  included.
* Transfer backend units: chunking, the credit bound on bytes in flight, checks of received chunks,
  malformed messages.
* Two schedulers in this process (a prefill and a decode worker, real ZeroMQ on 127.0.0.1): greedy
  outputs equal a plain scheduler's, cached tokens reported, KV back to idle on both sides, either
  arrival order, dead and silent prefill peers (abort within the timeout, then a restarted prefill
  worker on the same port serves), a vanished decode peer, a peer that never acknowledges.
* Live servers (one prefill + one decode worker): the bootstrap fields sent by hand as the router
  does; through the real router (skipped when sglang_router is not importable): native and OpenAI
  routes, streaming and not, equal to the plain answers; a killed prefill worker (slow).
All sockets bind 127.0.0.1 on free ports; every loop is bounded.
"""

from __future__ import annotations

import json
import pathlib
import random
import threading
import time
from typing import Dict, List, Optional

import pytest
import requests
import torch

from radixlm.core import ReqOutput
from radixlm.disaggregation import protocol
from radixlm.disaggregation.protocol import KVLayout, ProtocolError
from radixlm.disaggregation.transfer import KVRecvState, KVSendState, check_backend, chunk_plan, chunk_tokens_for
from radixlm.managers.io_struct import TokenizedGenerateReqInput, to_req
from radixlm.sampling_params import SamplingParams
from radixlm.server_args import ServerArgs
from tests.sched_harness import assert_idle_and_clean
from tests.server_utils import free_port, info_stat, server_info, wait_idle, wait_until

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "sglang_router_0.3.2_pd.json"
RECORDED = json.loads(FIXTURE.read_text())
TIMEOUT = 1.0  # --disaggregation-timeout of the in-process workers


def _router_available() -> bool:
    from radixlm.entrypoints.dp_launcher import router_available

    return router_available()


has_router = pytest.mark.skipif(not _router_available(), reason="sglang_router is not installed")


# ------------------------------------------------------------------------------ the router's wire format
def test_fixture_is_what_the_router_sends_in_pd_mode():
    assert RECORDED["router"] == "sglang-router 0.3.2"
    for side in ("prefill", "decode"):
        fwd = [e for e in RECORDED[side] if e["method"] == "POST"]
        assert {e["path"] for e in fwd} == {"/generate", "/v1/chat/completions", "/v1/completions"}
        for e in fwd:  # the same body to both workers, with the bootstrap fields added
            b = e["body"]
            assert b["bootstrap_host"] == "127.0.0.1" and b["bootstrap_port"] == 8998, b
            assert b["bootstrap_room"] == "<room>"
        assert {("GET", "/health"), ("GET", "/server_info"), ("GET", "/model_info")} <= \
            {(e["method"], e["path"]) for e in RECORDED[side]}
    assert [e["body"] for e in RECORDED["prefill"] if e["method"] == "POST"] == \
        [e["body"] for e in RECORDED["decode"] if e["method"] == "POST"]


@pytest.fixture(scope="module")
def builders(model_factory):
    from radixlm.managers.request_builder import RequestBuilder
    from radixlm.managers.tokenizer import get_tokenizer

    path = model_factory("qwen2")
    tok = get_tokenizer(path)
    return {mode: RequestBuilder(tok, 512, 2048, disaggregation_mode=mode) for mode in ("null", "prefill", "decode")}


@pytest.mark.parametrize("side", ["prefill", "decode"])
def test_recorded_pd_requests_parse(builders, side):
    from radixlm.entrypoints.openai import common
    from radixlm.entrypoints.openai.protocol import ChatCompletionRequest, CompletionRequest
    from radixlm.managers.sglang_fields import check_generate_fields

    room = random.getrandbits(63)
    for e in [e for e in RECORDED[side] if e["method"] == "POST"]:
        body = {**e["body"], "bootstrap_room": room}
        if e["path"] == "/generate":
            check_generate_fields(body)
            msgs, _ = builders[side].build(text=body.get("text"), input_ids=body.get("input_ids"),
                                           sampling_params=body["sampling_params"], stream=body["stream"],
                                           bootstrap_host=body["bootstrap_host"],
                                           bootstrap_port=body["bootstrap_port"], bootstrap_room=room)
        else:
            cls = ChatCompletionRequest if "messages" in body else CompletionRequest
            extras = common.sglang_extras(cls(**body))
            msgs, _ = builders[side].build(input_ids=[5, 6, 7], sampling_params={"max_new_tokens": 4}, **extras)
        assert len(msgs) == 1, e["name"]
        m = msgs[0]
        assert (m.bootstrap_host, m.bootstrap_port, m.bootstrap_room) == ("127.0.0.1", 8998, room), e["name"]
        req = to_req(m)
        assert (req.bootstrap_host, req.bootstrap_port, req.bootstrap_room) == ("127.0.0.1", 8998, room)
    with pytest.raises(ValueError, match="^bootstrap_room: this server is not a PD worker"):
        builders["null"].build(input_ids=[5, 6], bootstrap_host="127.0.0.1", bootstrap_port=8998, bootstrap_room=1)


@pytest.mark.parametrize("fields,match", [
    ({"bootstrap_room": -1}, "^bootstrap_room must be"), ({"bootstrap_room": "7"}, "^bootstrap_room must be"),
    ({"bootstrap_room": 2**64}, "^bootstrap_room must be"), ({"bootstrap_host": ""}, "^bootstrap_host must"),
    ({"bootstrap_port": 0}, "^bootstrap_port must"), ({"bootstrap_port": True}, "^bootstrap_port must")])
def test_bad_bootstrap_fields_are_400s(builders, fields, match):
    good = {"bootstrap_host": "127.0.0.1", "bootstrap_port": 8998, "bootstrap_room": 3}
    with pytest.raises(ValueError, match=match):
        builders["decode"].build(input_ids=[5, 6], **{**good, **fields})
    with pytest.raises(ValueError, match="^bootstrap_room: a PD disaggregation request carries one prompt"):
        builders["decode"].build(input_ids=[5, 6], sampling_params={"n": 2}, **good)


def test_flags_and_backends():
    args = ServerArgs(model_path="x", disaggregation_mode="decode")
    assert (args.disaggregation_bootstrap_port, args.disaggregation_transfer_backend) == (8998, "tcp")
    assert 0 < args.disaggregation_timeout <= 30
    with pytest.raises(ValueError, match="^disaggregation_mode: prefill with tp_size 2"):
        ServerArgs(model_path="x", disaggregation_mode="prefill", tp_size=2)
    for name in ("mooncake", "nixl"):
        with pytest.raises(ValueError, match=f"^disaggregation_transfer_backend: {name} is not implemented"):
            ServerArgs(model_path="x", disaggregation_transfer_backend=name)
    check_backend("tcp")
    with pytest.raises(ValueError, match="^disaggregation_mode: 'both' is not one of"):
        ServerArgs(model_path="x", disaggregation_mode="both")


# ------------------------------------------------------------------------------ transfer backend units
class _Pool:
    def __init__(self, slots: int, layers: int = 3, heads: int = 2, dim: int = 4, dtype=torch.float32, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.num_layers, self.num_kv_heads, self.head_dim, self.dtype = layers, heads, dim, dtype
        self.k_buffer = [torch.randn(slots, heads, dim, generator=g).to(dtype) for _ in range(layers)]
        self.v_buffer = [torch.randn(slots, heads, dim, generator=g).to(dtype) for _ in range(layers)]


def test_chunk_plan_covers_every_token_and_layer_once():
    plan = chunk_plan(10, 3, 4)
    assert plan[:3] == [(0, 0, 4), (1, 0, 4), (2, 0, 4)] and plan[-1] == (2, 8, 2)
    cover = sorted((layer, t) for layer, s, n in plan for t in range(s, s + n))
    assert cover == sorted((layer, t) for layer in range(3) for t in range(10))
    lay = KVLayout(2, 2, 64, "bfloat16")
    assert chunk_tokens_for(lay, 16) % 16 == 0 and chunk_tokens_for(lay, 16) * 2 * lay.token_bytes() <= 256 * 1024
    assert chunk_tokens_for(KVLayout(1, 64, 256, "float32"), 4096) == 4096  # at least one page


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_send_receive_round_trip_with_bounded_inflight(dtype):
    src, dst = _Pool(64, dtype=dtype, seed=1), _Pool(64, dtype=dtype, seed=2)
    lay = KVLayout.of_pool(src)
    src_slots, dst_slots = torch.randperm(64)[:13], torch.randperm(64)[:13]
    chunk_bytes = 2 * 4 * lay.token_bytes()
    send = KVSendState(7, src_slots, lay, chunk_tokens=4, max_inflight_bytes=2 * chunk_bytes)
    recv = KVRecvState(7, dst_slots, lay)
    sent_frames = []
    while not send.all_sent:
        while send.can_send():  # no acknowledgement yet: at most two chunks out
            sent_frames.append(send.chunk_frames(src))
            send.mark_sent()
            assert send.inflight_bytes <= 2 * chunk_bytes
        assert send.inflight_bytes > 0
        for frames in sent_frames:  # the receiver writes what arrived and acknowledges it
            kind, c = protocol.parse(frames)
            assert kind == "chunk" and c["room"] == 7
            recv.write(dst, c["layer"], c["start"], c["n_tokens"], c["k"], c["v"])
        sent_frames.clear()
        send.on_ack(recv.received_bytes)
    assert recv.complete and send.sent_bytes == send.total_bytes == recv.total_bytes
    for layer in range(3):
        assert torch.equal(dst.k_buffer[layer][dst_slots], src.k_buffer[layer][src_slots])
        assert torch.equal(dst.v_buffer[layer][dst_slots], src.v_buffer[layer][src_slots])
    with pytest.raises(ProtocolError, match="ack of"):
        send.on_ack(send.total_bytes + 1)


def test_received_chunks_are_checked():
    pool = _Pool(16)
    lay = KVLayout.of_pool(pool)
    recv = KVRecvState(1, torch.arange(8), lay)
    k = bytes(4 * lay.token_bytes())
    with pytest.raises(ProtocolError, match="outside"):
        recv.write(pool, 0, 6, 4, k, k)
    with pytest.raises(ProtocolError, match="outside"):
        recv.write(pool, 3, 0, 4, k, k)
    with pytest.raises(ProtocolError, match="needs"):
        recv.write(pool, 0, 0, 4, k[:-1], k)
    recv.write(pool, 0, 0, 4, k, k)
    with pytest.raises(ProtocolError, match="twice"):
        recv.write(pool, 0, 0, 4, k, k)
    assert not recv.complete


def test_malformed_messages_are_protocol_errors():
    assert protocol.parse(protocol.control("ack", 5, bytes=3)) == ("control", {"t": "ack", "room": 5, "bytes": 3})
    for frames in ([], [b"X"], [b"C", b"not json"], [b"C", b'{"t": "ack", "room": -1}'], [b"C", b'{"room": 1}'],
                   [b"C", b"[1]"], [b"K", b"short", b"", b""], [b"C", b"x" * (70 * 1024)]):
        with pytest.raises(ProtocolError):
            protocol.parse(frames)


# ------------------------------------------------------------------------------ two schedulers in-process
def _scheduler(path: str, mode: str, bport: int, **kw):
    from radixlm.managers.scheduler_process import create_scheduler

    args = ServerArgs(model_path=path, disaggregation_mode=mode, disaggregation_bootstrap_port=bport,
                      disaggregation_timeout=TIMEOUT, max_total_tokens=1024, enable_debug_integrity_check=True,
                      **kw)
    return create_scheduler(args)


def _req(rid: str, ids: List[int], new: int, bport: Optional[int] = None, room: Optional[int] = None):
    sp = SamplingParams(max_new_tokens=new, temperature=0.0)
    sp.verify(512)
    boot = {} if room is None else {"bootstrap_host": "127.0.0.1", "bootstrap_port": bport, "bootstrap_room": room}
    return to_req(TokenizedGenerateReqInput(rid, list(ids), sp, **boot))


def _pump(scheds, until, limit: float = 10.0) -> Dict[str, List[ReqOutput]]:
    """Steps every scheduler with work until `until(outs)` (outs: rid -> its outputs) or `limit` s."""
    outs: Dict[str, List[ReqOutput]] = {}
    deadline = time.monotonic() + limit
    while not until(outs):
        assert time.monotonic() < deadline, f"not done in {limit} s: {outs}"
        for s in scheds:
            if s.has_work():
                for o in s.step():
                    outs.setdefault(o.rid, []).append(o)
    return outs


def _finished(rids):
    return lambda outs: all(r in outs and outs[r][-1].finished_reason is not None for r in rids)


def _tokens(outs: List[ReqOutput]) -> List[int]:
    return [t for o in outs for t in o.new_token_ids]


def _idle(s) -> None:
    assert not s.has_work()
    assert_idle_and_clean(s)


@pytest.fixture(scope="module")
def workers(model_factory):
    """(prefill scheduler, decode scheduler, plain scheduler, bootstrap port) in this process."""
    path = model_factory("qwen2")
    bport = free_port()
    p = _scheduler(path, "prefill", bport)
    d = _scheduler(path, "decode", bport)
    plain = _scheduler(path, "null", bport)
    yield p, d, plain, bport, path
    p.shutdown()
    d.shutdown()


def _prompts():
    sys_prompt = list(range(20, 60))
    return [sys_prompt + [70, 71, 72], sys_prompt + [80, 81], list(range(100, 109)), [5]]


def test_pd_greedy_equals_plain_and_caches(workers):
    p, d, plain, bport, _ = workers
    prompts = _prompts()
    ref = {}
    for i, ids in enumerate(prompts):
        plain.add_request(_req(f"r{i}", ids, 6))
        ref.update(_pump([plain], _finished([f"r{i}"])))
    got = {}
    for i, ids in enumerate(prompts):  # one at a time: the second shares the first's 40-token prefix
        room = random.getrandbits(63)
        p.add_request(_req(f"p{i}", ids, 6, bport, room))
        d.add_request(_req(f"r{i}", ids, 6, bport, room))
        got.update(_pump([p, d], lambda o, i=i: _finished([f"r{i}", f"p{i}"])(o)))
    for i in range(len(prompts)):
        assert _tokens(got[f"r{i}"]) == _tokens(ref[f"r{i}"]), i
        assert got[f"r{i}"][-1].finished_reason.type == "length"
        assert _tokens(got[f"p{i}"]) == _tokens(ref[f"r{i}"])[:1]  # the prefill worker's answer: the first token
    assert got["r1"][-1].cached_tokens >= 40  # prefill worker's radix cache: the shared prefix computed once
    assert got["r0"][-1].cached_tokens == 0
    assert p.stats.prefill_cached_tokens >= 40
    _idle(p)
    _idle(d)


def test_concurrent_requests_with_pages_of_different_sizes(workers):
    """Requests arrive together (some decode while others are still in transfer); the prefill worker
    uses pages of 4 tokens, the decode worker pages of 2: KV travels per token, pages are local."""
    _, _, plain, _, path = workers
    bport = free_port()
    p = _scheduler(path, "prefill", bport, page_size=4)
    d = _scheduler(path, "decode", bport, page_size=2)
    try:
        prompts = _prompts() + [list(range(200, 237))]
        for i, ids in enumerate(prompts):
            plain.add_request(_req(f"ref{i}", ids, 5 + i))
        ref = _pump([plain], _finished([f"ref{i}" for i in range(len(prompts))]))
        for i, ids in enumerate(prompts):
            room = random.getrandbits(63)
            p.add_request(_req(f"p{i}", ids, 5 + i, bport, room))
            d.add_request(_req(f"d{i}", ids, 5 + i, bport, room))
        outs = _pump([p, d], _finished([f"{s}{i}" for i in range(len(prompts)) for s in "pd"]))
        for i in range(len(prompts)):
            assert _tokens(outs[f"d{i}"]) == _tokens(ref[f"ref{i}"]), i
        _idle(p)
        _idle(d)
    finally:
        p.shutdown()
        d.shutdown()


@pytest.mark.parametrize("decode_first", [True, False])
def test_either_arrival_order(workers, decode_first):
    p, d, plain, bport, _ = workers
    ids, room = list(range(30, 47)), random.getrandbits(63)
    first, second = (d, p) if decode_first else (p, d)
    first.add_request(_req("a" if decode_first else "pa", ids, 4, bport, room))
    for _ in range(20):  # the first side gets going alone (registered / prefilled and holding its KV)
        first.step()
        time.sleep(0.01)
    assert first.has_work()
    second.add_request(_req("pa" if decode_first else "a", ids, 4, bport, room))
    outs = _pump([p, d], _finished(["a", "pa"]))
    plain.add_request(_req("ref", ids, 4))
    ref = _pump([plain], _finished(["ref"]))
    assert _tokens(outs["a"]) == _tokens(ref["ref"])
    _idle(p)
    _idle(d)


def test_constrained_request_through_pd(model_factory):
    """The first token goes through the grammar on the prefill side, and through the decode side's matcher."""
    from radixlm.managers.scheduler_process import create_scheduler
    from radixlm.managers.tokenizer import get_tokenizer

    path = model_factory("qwen2")
    tok = get_tokenizer(path)
    bport = free_port()
    mk = [ServerArgs(model_path=path, disaggregation_mode=m, disaggregation_bootstrap_port=bport,
                     disaggregation_timeout=5.0, max_total_tokens=1024) for m in ("prefill", "decode", "null")]
    p, d, plain = (create_scheduler(a, tok) for a in mk)
    try:
        ids = tok.encode("Answer:")

        def req(rid, room=None):
            sp = SamplingParams(max_new_tokens=8, temperature=0.0, regex="(yes|no)[a-z]{3}")
            sp.verify(512)
            boot = {} if room is None else {"bootstrap_host": "127.0.0.1", "bootstrap_port": bport,
                                            "bootstrap_room": room}
            return to_req(TokenizedGenerateReqInput(rid, ids, sp, **boot))

        plain.add_request(req("ref"))
        ref = _pump([plain], _finished(["ref"]), limit=60)
        p.add_request(req("p", 77))
        d.add_request(req("d", 77))
        outs = _pump([p, d], _finished(["p", "d"]), limit=60)
        text = tok.decode(_tokens(outs["d"]))
        assert _tokens(outs["d"]) == _tokens(ref["ref"]) and text[:2] in ("ye", "no"), text
        _idle(p)
        _idle(d)
    finally:
        for s in (p, d, plain):
            s.shutdown()


def _assert_peer_abort(out: ReqOutput, *words: str) -> None:
    fr = out.finished_reason
    assert fr.type == "abort" and fr.status_code == 503, fr
    for w in words:
        assert w in fr.message, (w, fr.message)


def test_dead_or_silent_prefill_peer_then_restart(workers, model_factory):
    import zmq

    _, d, _, _, path = workers
    dead_port = free_port()  # nothing listens there
    t0 = time.monotonic()
    d.add_request(_req("dead", [1, 2, 3, 4], 4, dead_port, 11))
    outs = _pump([d], _finished(["dead"]))
    assert time.monotonic() - t0 < TIMEOUT  # the refused connection, not the deadline
    _assert_peer_abort(outs["dead"][-1], f"prefill peer tcp://127.0.0.1:{dead_port} refused the connection", "11")
    _idle(d)
    # silent: a bootstrap server that takes the registration and never answers
    silent = zmq.Context.instance().socket(zmq.ROUTER)
    silent.bind(f"tcp://127.0.0.1:{dead_port}")
    try:
        d.add_request(_req("silent", [1, 2, 3, 4], 4, dead_port, 12))
        outs = _pump([d], _finished(["silent"]))
        _assert_peer_abort(outs["silent"][-1], f"tcp://127.0.0.1:{dead_port} sent nothing for 1 s")
        frames = silent.recv_multipart(zmq.NOBLOCK)
        assert protocol.parse(frames[1:])[1]["t"] == "register"
    finally:
        silent.close(0)
    _idle(d)
    # the prefill worker comes back on the same port: the next request is served, no restart here
    p2 = _scheduler(path, "prefill", dead_port)
    try:
        room = random.getrandbits(63)
        p2.add_request(_req("p-back", [1, 2, 3, 4], 4, dead_port, room))
        d.add_request(_req("back", [1, 2, 3, 4], 4, dead_port, room))
        outs = _pump([p2, d], _finished(["back", "p-back"]))
        assert outs["back"][-1].finished_reason.type == "length" and len(_tokens(outs["back"])) == 4
        _idle(p2)
        _idle(d)
    finally:
        p2.shutdown()


def test_decode_abort_releases_the_prefill_side(workers):
    p, d, _, bport, _ = workers
    ids = list(range(80, 95))
    d.add_request(_req("d-ab", ids, 4, bport, 51))
    for _ in range(100):  # registered with the prefill worker, which has not seen the request yet
        d.step()
        p.pd.poll(p)
        if 51 in p.pd.regs:
            break
        time.sleep(0.005)
    outs = {o.rid: o for o in d.abort_request("d-ab")}
    assert outs["d-ab"].finished_reason.type == "abort"
    _pump([d], lambda o: not d.has_work())
    t0 = time.monotonic()
    for _ in range(100):  # the cancel reaches the prefill worker
        p.pd.poll(p)
        if 51 not in p.pd.regs:
            break
        time.sleep(0.005)
    p.add_request(_req("p-ab", ids, 4, bport, 51))
    outs = _pump([p], _finished(["p-ab"]))
    _assert_peer_abort(outs["p-ab"][-1], "cancelled")
    assert time.monotonic() - t0 < TIMEOUT  # not after its deadline: at once
    _idle(p)
    _idle(d)


def _fake_decode(bport: int, room: int, n_tokens: int, layout: KVLayout):
    import zmq

    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(f"tcp://127.0.0.1:{bport}")
    s.send_multipart(protocol.control("register", room, n_tokens=n_tokens, layout=layout.to_json()))
    return s


def test_prefill_frees_kv_when_decode_never_registers_or_vanishes(workers):
    p, _, _, bport, _ = workers
    t0 = time.monotonic()
    p.add_request(_req("lonely", list(range(40, 60)), 4, bport, 21))
    outs = _pump([p], _finished(["lonely"]))
    assert time.monotonic() - t0 < TIMEOUT + 1.0
    _assert_peer_abort(outs["lonely"][-1], "no decode worker registered the room", "21")
    _idle(p)
    # a decode worker registers, then goes away before acknowledging
    layout = KVLayout.of_pool(p.runner.token_to_kv_pool)
    dec = _fake_decode(bport, 22, 20, layout)
    p.add_request(_req("gone", list(range(40, 60)), 4, bport, 22))
    for _ in range(200):
        p.step()
        if p.pd.transfers.get(22) is not None and p.pd.transfers[22].send is not None:
            break
        time.sleep(0.005)
    dec.close(0)
    outs = _pump([p], _finished(["gone"]))
    _assert_peer_abort(outs["gone"][-1], "22")
    _idle(p)


def test_prefill_stops_at_the_credit_window(workers, model_factory):

    path = model_factory("qwen2")
    bport = free_port()
    window = 8192
    p = _scheduler(path, "prefill", bport, disaggregation_max_inflight_bytes=window)
    try:
        layout = KVLayout.of_pool(p.runner.token_to_kv_pool)
        ids = list(range(10, 300))
        dec = _fake_decode(bport, 31, len(ids), layout)
        p.add_request(_req("big", ids, 4, bport, 31))
        received, deadline = 0, time.monotonic() + 0.6 * TIMEOUT
        while time.monotonic() < deadline:  # never acknowledged: the sender must stop at the window
            p.step()
            while dec.poll(0):
                kind, c = protocol.parse(dec.recv_multipart())
                if kind == "chunk":
                    received += len(c["k"]) + len(c["v"])
        tr = p.pd.transfers[31]
        assert 0 < received <= window and tr.send.sent_bytes == received < tr.send.total_bytes
        dec.send_multipart(protocol.control("ack", 31, bytes=received))  # credit: more comes
        more = 0
        for _ in range(100):
            p.step()
            while dec.poll(0):
                kind, c = protocol.parse(dec.recv_multipart())
                more += kind == "chunk"
            if more:
                break
        assert more > 0
        dec.send_multipart(protocol.control("cancel", 31, message="test over"))
        outs = _pump([p], _finished(["big"]))
        _assert_peer_abort(outs["big"][-1], "cancelled")
        dec.close(0)
        _idle(p)
    finally:
        p.shutdown()


def test_bootstrap_port_in_use_is_a_clear_error(workers):
    from radixlm.disaggregation.prefill import PrefillBootstrap

    p, _, _, bport, _ = workers
    with pytest.raises(RuntimeError, match=f"^disaggregation_bootstrap_port: cannot bind .*:{bport}"):
        PrefillBootstrap("127.0.0.1", bport, 1.0, 1 << 20, p.pd.layout, 1)


def test_layout_mismatch_is_refused(workers):
    import zmq

    p, _, _, bport, _ = workers
    dec = _fake_decode(bport, 41, 10, KVLayout(99, 1, 8, "float32"))
    try:
        p.add_request(_req("odd", list(range(60, 70)), 4, bport, 41))
        outs = _pump([p], _finished(["odd"]))
        _assert_peer_abort(outs["odd"][-1], "KV layouts differ")
        msgs = []
        while not msgs or msgs[-1]["t"] == "keepalive":  # (keep-alives may come first)
            assert dec.poll(1000)
            msgs.append(protocol.parse(dec.recv_multipart(zmq.NOBLOCK))[1])
        assert msgs[-1]["t"] == "error" and "KV layouts differ" in msgs[-1]["message"], msgs
    finally:
        dec.close(0)
    _idle(p)


# ------------------------------------------------------------------------------ live servers
@pytest.fixture(scope="module")
def pd_servers(qwen2_path):
    from tests.server_utils import ServerProcess

    bport = free_port()
    common = ["--disaggregation-timeout", "2", "--enable-debug-integrity-check"]
    with ServerProcess(qwen2_path, ["--disaggregation-mode", "prefill", "--disaggregation-bootstrap-port",
                                    str(bport), *common]) as p, \
            ServerProcess(qwen2_path, ["--disaggregation-mode", "decode", *common]) as d:
        yield p, d, bport


def _both(p, d, path: str, body: Dict, bport: int, room: Optional[int] = None):
    """What the router does: the same body, bootstrap fields added, to both workers at once."""
    body = {**body, "bootstrap_host": "127.0.0.1", "bootstrap_port": bport,
            "bootstrap_room": random.getrandbits(63) if room is None else room}
    res = {}

    def go(name, url):
        res[name] = requests.post(url + path, json=body, timeout=60)

    ts = [threading.Thread(target=go, args=("p", p.base_url)), threading.Thread(target=go, args=("d", d.base_url))]
    for t in ts:
        t.start()
    for t in ts:
        t.join(70)
    return res["p"], res["d"]


def _kv_idle(server) -> None:
    info = wait_idle(server)
    assert info_stat(info, "protected_kv_tokens") == 0, info
    assert info_stat(info, "num_pd_transfer_reqs") == 0


def test_live_workers_with_bootstrap_fields(pd_servers):
    p, d, bport = pd_servers
    body = {"text": "The capital of France is the city of", "sampling_params": {"max_new_tokens": 8,
                                                                                 "temperature": 0}}
    plain = requests.post(p.base_url + "/generate", json=body, timeout=60).json()  # a PD worker serves plain too
    rp, rd = _both(p, d, "/generate", body, bport)
    assert rp.status_code == 200 and rd.status_code == 200, (rp.text, rd.text)
    assert rd.json()["output_ids"] == plain["output_ids"]
    assert rp.json()["output_ids"] == plain["output_ids"][:1]
    assert rd.json()["meta_info"]["cached_tokens"] > 0  # the plain request cached the prompt on the prefill side
    for s in (p, d):
        _kv_idle(s)
        assert requests.get(s.base_url + "/health", timeout=10).status_code == 200


def _stream_text(r: requests.Response, key) -> str:
    text = ""
    for line in r.iter_lines():
        if line.startswith(b"data: ") and line != b"data: [DONE]":
            text = key(json.loads(line[6:]), text)
    return text


@has_router
def test_router_pd_mode_equals_plain(pd_servers):
    from tests.router_stub import RouterProcess, pd_args

    p, d, bport = pd_servers
    gen = {"text": "Once upon a time, in a land", "sampling_params": {"max_new_tokens": 10, "temperature": 0}}
    chat = {"model": "m", "messages": [{"role": "system", "content": "You are terse."},
                                       {"role": "user", "content": "Name a colour."}],
            "max_tokens": 10, "temperature": 0}
    ref_gen = requests.post(d.base_url + "/generate", json=gen, timeout=60).json()
    ref_chat = requests.post(d.base_url + "/v1/chat/completions", json=chat, timeout=60).json()
    with RouterProcess([], policy="round_robin", extra=pd_args([(p.base_url, bport)], [d.base_url])) as router:
        r = requests.post(router.url + "/generate", json=gen, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["output_ids"] == ref_gen["output_ids"]
        r2 = requests.post(router.url + "/generate", json=gen, timeout=60)
        assert r2.json()["meta_info"]["cached_tokens"] > 0  # hit on the prefill worker's radix cache
        r = requests.post(router.url + "/generate", json={**gen, "stream": True}, timeout=60, stream=True)
        assert _stream_text(r, lambda c, t: c["text"]) == ref_gen["text"]
        r = requests.post(router.url + "/v1/chat/completions", json=chat, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == ref_chat["choices"][0]["message"]["content"]
        r = requests.post(router.url + "/v1/chat/completions", json={**chat, "stream": True}, timeout=60, stream=True)
        assert _stream_text(r, lambda c, t: t + (c["choices"][0]["delta"].get("content") or "")
                            if c.get("choices") else t) == ref_chat["choices"][0]["message"]["content"]
    for s in (p, d):
        _kv_idle(s)


@pytest.mark.slow
def test_killed_prefill_worker_then_restarted(pd_servers, qwen2_path):
    import signal

    from tests.server_utils import ServerProcess

    p, d, bport = pd_servers
    p.stop(signal.SIGKILL)
    body = {"text": "Hello there", "sampling_params": {"max_new_tokens": 4, "temperature": 0},
            "bootstrap_host": "127.0.0.1", "bootstrap_port": bport, "bootstrap_room": random.getrandbits(63)}
    t0 = time.monotonic()
    r = requests.post(d.base_url + "/generate", json=body, timeout=30)
    took = time.monotonic() - t0
    assert r.status_code == 503 and f"tcp://127.0.0.1:{bport}" in r.json()["message"], r.text
    assert took < 2 + 1.5, took
    assert requests.get(d.base_url + "/health", timeout=10).status_code == 200
    _kv_idle(d)
    with ServerProcess(qwen2_path, ["--disaggregation-mode", "prefill", "--disaggregation-bootstrap-port",
                                    str(bport), "--disaggregation-timeout", "2"]) as p2:
        rp, rd = _both(p2, d, "/generate", {k: v for k, v in body.items() if not k.startswith("bootstrap")}, bport)
        assert rp.status_code == 200 and rd.status_code == 200, (rp.text, rd.text)
        assert len(rd.json()["output_ids"]) == 4
        assert wait_until(lambda: info_stat(server_info(p2), "protected_kv_tokens") == 0, 10)
    _kv_idle(d)
