"""The llama.cpp peer of the CPU benchmark: the llama-cpp backend's wire format against a recorded llama-server
exchange (no binary needed), the GGUF conversion's tokenizer check, the cpu_peers table, and one test against a
real llama-server (skipped unless `bash scripts/build_llama_server.sh` has built it)."""

from __future__ import annotations

import asyncio
import json
import pathlib
import time

import httpx
import pytest

from radixlm.bench import serving
from radixlm.bench.client import LlamaSlotPinner, llama_cpp_payload, request_llama_cpp
from radixlm.bench.cpu_peers import harness
from radixlm.bench.cpu_peers.convert_gguf import is_gpt2_byte_level
from radixlm.bench.cpu_peers.llama_cpp import find_converter, find_llama_server

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
REQUEST = json.loads((FIXTURES / "llama_server_completion_request.json").read_text())
STREAM = json.loads((FIXTURES / "llama_server_completion_stream.json").read_text())


def _sse(events) -> bytes:
    return b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events)


def _send(handler, prompt, n):
    async def go():
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as c:
            return await request_llama_cpp(c, "http://llama", prompt, n, time.perf_counter())

    return asyncio.run(go())


def test_payload_is_the_recorded_request():
    body = REQUEST["body"]
    assert llama_cpp_payload(body["prompt"], body["n_predict"]) == body
    # token ids as the prompt, greedy, EOS suppressed, prompt caching on, streamed with token ids
    assert all(isinstance(t, int) for t in body["prompt"])
    assert body["temperature"] == 0 and body["ignore_eos"] and body["cache_prompt"] and body["stream"]


def test_request_against_recorded_stream():
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((request.method, request.url.path, json.loads(request.content)))
        return httpx.Response(200, content=_sse(STREAM["events"]), headers={"content-type": "text/event-stream"})

    body = REQUEST["body"]
    res = _send(handler, body["prompt"], body["n_predict"])
    assert seen == [("POST", REQUEST["path"], body)]
    assert res.success, res.error
    streamed = [t for e in STREAM["events"] for t in e.get("tokens") or []]
    final = STREAM["events"][-1]
    # the count is exact (tokens_predicted) though ids of tokens that ended mid-character are not streamed
    assert res.output_len == body["n_predict"] == final["tokens_predicted"] > len(streamed)
    assert res.output_ids == streamed
    assert final["stop"] and res.prompt_len == final["tokens_evaluated"] == len(body["prompt"])
    assert res.cached_tokens == final["timings"]["cache_n"]
    chunks = sum(1 for e in STREAM["events"] if e.get("tokens"))
    assert res.ttft > 0 and len(res.itl) == STREAM["events"][-2]["tokens_predicted"] - 1 and chunks > 1
    assert res.server_e2e == pytest.approx((final["timings"]["prompt_ms"] + final["timings"]["predicted_ms"]) / 1e3)


def test_exact_ids_are_recovered_unstreamed():
    body, seen = REQUEST["body"], []
    exact = [387, 442, 1, 224, 360, 373, 2, 352]  # what the unstreamed repeat returns

    def handler(request: httpx.Request) -> httpx.Response:
        sent = json.loads(request.content)
        seen.append(sent["stream"])
        if sent["stream"]:
            return httpx.Response(200, content=_sse(STREAM["events"]))
        return httpx.Response(200, json={"tokens": exact, "tokens_predicted": 8, "stop": True})

    async def go():
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as c:
            return await request_llama_cpp(c, "http://llama", body["prompt"], 8, time.perf_counter(), exact_ids=True)

    res = asyncio.run(go())
    assert seen == [True, False] and res.success and res.output_ids == exact and res.output_len == 8


def test_slot_pinner_keeps_sessions_on_their_slots():
    pin = LlamaSlotPinner(3)
    system = [7, 8, 9]
    a, b = pin.pick(system + [1]), pin.pick(system + [2])
    assert (a, b) == (0, 1)  # a new session takes an unused slot, not the other session's (same system prompt)
    pin.done(a, system + [1, 50])
    pin.done(b, system + [2, 60])
    assert pin.pick(system + [2, 60, 3]) == 1 and pin.pick(system + [1, 50, 4]) == 0  # each extends its own
    assert pin.pick(system + [5]) == 2 and pin.pick(system + [6]) == -1  # all busy/held: the server chooses
    pin.done(0, None)  # ids unknown: the slot's content is forgotten
    assert pin.pick(system + [1, 50, 4, 9]) == 0  # unused again


def test_request_http_error_is_a_failed_result():
    res = _send(lambda r: httpx.Response(400, json={"error": {"message": "bad n_predict"}}), [5, 6, 7], 4)
    assert not res.success and res.error.startswith("HTTP 400")
    res = _send(lambda r: httpx.Response(200, content=_sse([{"error": {"message": "slot unavailable"}}])), [5], 2)
    assert not res.success and "slot unavailable" in res.error


def test_bench_serving_backend_flag():
    args = serving.build_parser().parse_args(["--backend", "llama-cpp", "--send-text"])
    assert args.backend == "llama-cpp"
    with pytest.raises(SystemExit, match="token ids"):
        serving.make_sender(args, "http://x", object(), None)  # any tokenizer: text is refused before use


def test_tokenizer_is_gpt2_byte_level(model_factory, tmp_path):
    src = pathlib.Path(model_factory("llama"))
    assert is_gpt2_byte_level(src)
    tok = json.loads((src / "tokenizer.json").read_text())
    tok["pre_tokenizer"] = {"type": "Metaspace", "replacement": "\u2581"}
    (tmp_path / "tokenizer.json").write_text(json.dumps(tok))
    assert not is_gpt2_byte_level(tmp_path)


def test_cpu_peers_table_and_ratios():
    spec = harness.WORKLOADS["decode"]
    assert harness.ratio(spec, {"decode_tok_s": 100.0}, {"decode_tok_s": 50.0}) == 2.0
    ttft = harness.WORKLOADS["ttft"]
    assert harness.ratio(ttft, {"mean_ttft_s": 1.0}, {"mean_ttft_s": 3.0}) == 3.0
    report = {"tools": ["llama-f32", "radixlm-fp32"], "workloads": ["decode", "agent"], "quick": False,
              "threads": 2, "model_path": "m", "params": 87_804_672, "wall_s": 10.0,
              "results": {"llama-f32": {"decode": {"decode_tok_s": 100.0},
                                        "agent": {"mean_ttft_s": 0.75, "ttft_by_turn_s": [1.94, 0.5, 0.4, 0.35]}},
                          "radixlm-fp32": {"decode": {"decode_tok_s": 50.0}, "agent": {"error": "boom"}}},
              "per_tool": {t: {"load_before": [1.0, 1, 1], "load_after": [2.0, 1, 1]}
                           for t in ("llama-f32", "radixlm-fp32")}}
    md = harness.markdown(report)
    assert "| single-stream decode, tok/s | 100.0 | 50.0 | 0.50x |" in md
    assert "0.75 s (1.94 -> 0.35) | n/a | - |" in md
    assert "87.8M parameters" in md and "radixlm-fp32 agent: boom" in md
    with pytest.raises(SystemExit, match="unknown"):
        harness.main(["--tools", "nope"])
    assert harness.llama_slots(harness.LLAMA_BEST_ARGS) == 32 and harness.llama_slots(harness.LLAMA_STOCK_ARGS) == 0


def test_against_real_llama_server(model_factory, hf_reference_factory):
    """The recorded request body is accepted by a real llama-server on a GGUF converted from our checkpoint, and
    its greedy tokens (f32) are HF's."""
    if find_llama_server() is None or find_converter() is None:
        pytest.skip("llama-server not built (bash scripts/build_llama_server.sh)")
    from radixlm.bench.cpu_peers.llama_cpp import LlamaServerProcess, ensure_gguf
    from radixlm.tools.make_tiny_model import EOS_TOKEN_ID, IM_END_ID

    src = model_factory("llama")
    gguf = ensure_gguf(src, "f32")
    prompt, n = REQUEST["body"]["prompt"], REQUEST["body"]["n_predict"]
    with LlamaServerProcess(gguf, threads=2, ctx_size=512, extra=["-np", "1"]) as srv:
        async def go():
            async with httpx.AsyncClient(timeout=60) as c:
                a = await request_llama_cpp(c, srv.base_url, prompt, n, time.perf_counter(), exact_ids=True)
                b = await request_llama_cpp(c, srv.base_url, prompt, n, time.perf_counter(), exact_ids=True)
                return a, b

        first, again = asyncio.run(go())
    assert first.success and again.success, (first.error, again.error)
    assert first.output_len == n and first.prompt_len == len(prompt)
    assert again.cached_tokens > 0 and again.output_ids == first.output_ids  # prompt cache reused
    want, _ = hf_reference_factory(src).greedy(prompt, n)
    k = next((i for i, t in enumerate(want) if t in (EOS_TOKEN_ID, IM_END_ID)), len(want))  # EOS is suppressed
    assert k >= 4 and first.output_ids[:k] == want[:k]


def test_hf_sequential_prefix_reuse_by_hand(model_factory):
    """The HF peer's hand-reused prefix: the same greedy tokens as recomputing every prompt, the prefix counted
    as cached."""
    from radixlm.bench import datasets as ds
    from radixlm.bench import hf_peer

    src = model_factory("llama")
    reqs = ds.gen_shared_prefix(1, 3, 40, 8, 4, 500, seed=3)
    model = hf_peer.load_model(src)
    plain, _ = hf_peer.run_sequential(src, reqs, model=model)
    reused, _ = hf_peer.run_sequential(src, reqs, model=model, reuse_prefix=True)
    assert [r.output_ids for r in reused] == [r.output_ids for r in plain]
    assert all(len(r.output_ids) == 4 and r.ttft > 0 for r in plain)
    assert [r.cached_tokens for r in plain] == [0, 0, 0] and [r.cached_tokens for r in reused] == [42, 42, 42]


def test_radixlm_env_parses_and_rejects_bare_words():
    assert harness.parse_env("OMP_WAIT_POLICY= GOMP_SPINCOUNT=2000") == {"OMP_WAIT_POLICY": "",
                                                                         "GOMP_SPINCOUNT": "2000"}
    assert harness.parse_env("") == {}
    with pytest.raises(SystemExit, match="NAME=VALUE"):
        harness.parse_env("GOMP_SPINCOUNT")
