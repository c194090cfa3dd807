"""SGLang's native HTTP API on a real `python -m radixlm.launch_server` process (loopback only).

Covers /generate (text, input_ids, batch, n, sampling params, SSE streaming, logprobs, rid, meta_info,
prefix caching), /health, /health_generate, /get_model_info, /get_server_info, /flush_cache,
/abort_request, /metrics, input validation (400 with a message naming the field, server keeps serving),
--api-key, and the exact request bodies of SGLang's frontend `RuntimeEndpoint`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import threading
import time
from typing import Any, Dict, Iterator, List, Optional

import pytest
import requests

from radixlm.server_args import ServerArgs
from tests.conftest import random_prompts
from tests.server_utils import ServerProcess, info_stat, server_info, wait_idle

SPECIAL = (0, 1, 2)
VOCAB = 515
CTX = 2048  # the tiny llama's max_position_embeddings
GREEDY = {"temperature": 0, "max_new_tokens": 8, "ignore_eos": True}
TIMEOUT = 60


# ------------------------------------------------------------------------------ helpers
def ids_for(seed: int, n: int) -> List[int]:
    return random_prompts(seed, [n], VOCAB, avoid=SPECIAL)[0]


def post(server: ServerProcess, body: Any, path: str = "/generate", **kw) -> requests.Response:
    return requests.post(server.base_url + path, json=body, timeout=TIMEOUT, **kw)


def gen(server: ServerProcess, body: Dict[str, Any]) -> Any:
    r = post(server, body)
    assert r.status_code == 200, r.text
    return r.json()


def sse_events(resp: requests.Response, max_events: int = 10_000) -> Iterator[Any]:
    """Parsed `data:` events of an SSE response; '[DONE]' is yielded as the string itself."""
    n = 0
    for line in resp.iter_lines(chunk_size=None):
        if not line:
            continue
        line = line.decode() if isinstance(line, bytes) else line
        assert line.startswith("data: "), line
        payload = line[len("data: "):]
        yield payload if payload == "[DONE]" else json.loads(payload)
        n += 1
        assert n <= max_events, "runaway stream"


def stream_all(server: ServerProcess, body: Dict[str, Any]) -> List[Any]:
    with requests.post(server.base_url + "/generate", json={**body, "stream": True}, stream=True,
                       timeout=TIMEOUT) as r:
        assert r.status_code == 200, r.text
        assert r.headers["content-type"].startswith("text/event-stream")
        return list(sse_events(r))


def assert_error(r: requests.Response, status: int, *words: str) -> Dict[str, Any]:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    msg = body.get("message") or body["error"]["message"]
    assert body["error"]["message"] == msg
    assert body.get("code", status) == status
    for w in words:
        assert w.lower() in msg.lower(), f"{w!r} not in error message {msg!r}"
    return body


def ipc_dir_of(server_pid: int) -> Optional[str]:
    """The server's /tmp/radixlm-ipc-* directory (from the unix sockets its children bound)."""
    import glob
    import os
    import re

    paths = {}
    with open("/proc/net/unix") as fh:
        for line in list(fh)[1:]:
            parts = line.split()
            if len(parts) >= 8 and "radixlm-ipc-" in parts[7]:
                paths[parts[6]] = parts[7]
    kids = []
    for f in glob.glob(f"/proc/{server_pid}/task/*/children"):
        with open(f) as fh:
            kids += fh.read().split()
    for pid in [str(server_pid), *kids]:
        for fd in glob.glob(f"/proc/{pid}/fd/*"):
            try:
                m = re.fullmatch(r"socket:\[(\d+)\]", os.readlink(fd))
            except OSError:
                continue
            if m and m.group(1) in paths:
                return os.path.dirname(paths[m.group(1)])
    return None


@contextlib.contextmanager
def cleaned_up(s: ServerProcess) -> Iterator[ServerProcess]:
    """Stops the server and removes the IPC directory it leaks."""
    ipc = ipc_dir_of(s.proc.pid)
    try:
        with s:
            yield s
    finally:
        if ipc:
            shutil.rmtree(ipc, ignore_errors=True)


@pytest.fixture(scope="module")
def model_path(model_factory):
    return model_factory("llama")


@pytest.fixture(scope="module")
def server(model_path):
    with cleaned_up(ServerProcess(model_path, ["--enable-metrics"])) as s:
        yield s


@pytest.fixture(scope="module")
def tokenizer(model_path):
    from radixlm.managers.tokenizer import get_tokenizer

    return get_tokenizer(model_path)


# ------------------------------------------------------------------------------ /generate shapes
def test_generate_text_returns_object_with_meta_info(server, tokenizer):
    text = "Hello there, how are you doing"
    out = gen(server, {"text": text, "sampling_params": GREEDY})
    assert isinstance(out, dict)
    assert set(out) >= {"text", "output_ids", "meta_info"}
    assert isinstance(out["text"], str) and out["text"]
    assert len(out["output_ids"]) == 8 and all(isinstance(t, int) for t in out["output_ids"])
    m = out["meta_info"]
    assert isinstance(m["id"], str) and m["id"]
    assert m["prompt_tokens"] == len(tokenizer.encode(text))
    assert m["completion_tokens"] == 8
    assert isinstance(m["cached_tokens"], int) and 0 <= m["cached_tokens"] < m["prompt_tokens"]
    assert m["finish_reason"] == {"type": "length", "length": 8}
    assert isinstance(m["e2e_latency"], float) and 0 < m["e2e_latency"] < TIMEOUT
    assert out["text"] == tokenizer.decode(out["output_ids"], skip_special_tokens=True)


def test_generate_input_ids_matches_text(server, tokenizer):
    text = "The quick brown fox"
    a = gen(server, {"text": text, "sampling_params": GREEDY})
    b = gen(server, {"input_ids": tokenizer.encode(text), "sampling_params": GREEDY})
    assert isinstance(b, dict)
    assert b["output_ids"] == a["output_ids"] and b["text"] == a["text"]
    assert b["meta_info"]["prompt_tokens"] == a["meta_info"]["prompt_tokens"]


def test_put_generate(server):
    r = requests.put(server.base_url + "/generate", json={"input_ids": ids_for(1, 5), "sampling_params": GREEDY},
                     timeout=TIMEOUT)
    assert r.status_code == 200 and r.json()["meta_info"]["completion_tokens"] == 8


def test_batch_text_returns_list_in_order(server):
    texts = ["One two three", "A completely different prompt here", "x"]
    singles = [gen(server, {"text": t, "sampling_params": GREEDY}) for t in texts]
    batch = gen(server, {"text": texts, "sampling_params": GREEDY})
    assert isinstance(batch, list) and len(batch) == 3
    assert [b["output_ids"] for b in batch] == [s["output_ids"] for s in singles]
    assert [b["text"] for b in batch] == [s["text"] for s in singles]
    assert [b["meta_info"]["prompt_tokens"] for b in batch] == [s["meta_info"]["prompt_tokens"] for s in singles]
    # a batch of one is still a list
    one = gen(server, {"text": ["One two three"], "sampling_params": GREEDY})
    assert isinstance(one, list) and one[0]["output_ids"] == singles[0]["output_ids"]


def test_batch_input_ids_with_per_prompt_sampling_params(server):
    prompts = [ids_for(2, 6), ids_for(3, 11)]
    out = gen(server, {"input_ids": prompts, "sampling_params": [{**GREEDY, "max_new_tokens": 3},
                                                                 {**GREEDY, "max_new_tokens": 5}]})
    assert isinstance(out, list)
    assert [o["meta_info"]["prompt_tokens"] for o in out] == [6, 11]
    assert [o["meta_info"]["completion_tokens"] for o in out] == [3, 5]
    assert [o["meta_info"]["finish_reason"] for o in out] == [{"type": "length", "length": 3},
                                                             {"type": "length", "length": 5}]


def test_n_samples(server):
    out = gen(server, {"input_ids": ids_for(4, 7), "rid": "nreq",
                       "sampling_params": {"temperature": 1.0, "max_new_tokens": 6, "ignore_eos": True, "n": 2,
                                           "sampling_seed": 7}})
    assert isinstance(out, list) and len(out) == 2
    assert len({o["meta_info"]["id"] for o in out}) == 2
    assert all(o["meta_info"]["id"].startswith("nreq") for o in out)
    assert all(o["meta_info"]["completion_tokens"] == 6 and o["meta_info"]["prompt_tokens"] == 7 for o in out)
    # seeded sampling is reproducible
    again = gen(server, {"input_ids": ids_for(4, 7), "sampling_params": {"temperature": 1.0, "max_new_tokens": 6,
                                                                         "ignore_eos": True, "n": 2,
                                                                         "sampling_seed": 7}})
    assert [o["output_ids"] for o in again] == [o["output_ids"] for o in out]
    # n with a batch of 2 prompts: 4 results
    out = gen(server, {"input_ids": [ids_for(5, 4), ids_for(6, 4)], "sampling_params": {**GREEDY, "n": 2}})
    assert isinstance(out, list) and len(out) == 4


def test_sampling_params_are_honoured(server):
    base = gen(server, {"input_ids": ids_for(8, 9), "sampling_params": {**GREEDY, "max_new_tokens": 12}})
    ids = base["output_ids"]
    # stop_token_ids: finish at the first generated token
    out = gen(server, {"input_ids": ids_for(8, 9), "sampling_params": {"temperature": 0, "max_new_tokens": 12,
                                                                       "stop_token_ids": [ids[0]]}})
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": ids[0]}
    assert out["meta_info"]["completion_tokens"] == 1
    # stop string: text is cut before it
    text = base["text"]
    stop = next((text[i:i + 2] for i in range(2, len(text) - 2) if text[i:i + 2].strip()
                 and "\ufffd" not in text[i:i + 2]), None)
    if stop is not None:
        out = gen(server, {"input_ids": ids_for(8, 9), "sampling_params": {"temperature": 0, "max_new_tokens": 12,
                                                                           "stop": [stop]}})
        assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
        assert out["text"] == text[:text.find(stop)]
    # max_new_tokens
    out = gen(server, {"input_ids": ids_for(8, 9), "sampling_params": {**GREEDY, "max_new_tokens": 2}})
    assert out["output_ids"] == ids[:2]
    # top_k=1 is greedy whatever the temperature
    out = gen(server, {"input_ids": ids_for(8, 9), "sampling_params": {"temperature": 1.5, "top_k": 1,
                                                                       "max_new_tokens": 12, "ignore_eos": True}})
    assert out["output_ids"] == ids


def test_max_new_tokens_zero_is_prefill_only(server):
    out = gen(server, {"text": "Prefill only please", "sampling_params": {"max_new_tokens": 0}})
    assert out["text"] == "" and out["output_ids"] == []
    assert out["meta_info"]["completion_tokens"] == 0
    assert out["meta_info"]["finish_reason"] == {"type": "length", "length": 0}


def test_rid_passthrough(server):
    out = gen(server, {"text": "rid test", "rid": "my-request-id-1", "sampling_params": GREEDY})
    assert out["meta_info"]["id"] == "my-request-id-1"
    out = gen(server, {"text": ["a b", "c d"], "rid": ["first-rid", "second-rid"], "sampling_params": GREEDY})
    assert [o["meta_info"]["id"] for o in out] == ["first-rid", "second-rid"]
    out = gen(server, {"text": ["a b", "c d"], "rid": "batchrid", "sampling_params": GREEDY})
    assert [o["meta_info"]["id"] for o in out] == ["batchrid_0", "batchrid_1"]


def test_unicode_prompt(server):
    out = gen(server, {"text": "héllo wörld ✓ 日本語 🙂", "sampling_params": GREEDY})
    assert out["meta_info"]["completion_tokens"] == 8


# ------------------------------------------------------------------------------ streaming
def test_stream_is_cumulative_and_matches_non_stream(server):
    body = {"text": "Streaming is fun when", "sampling_params": {**GREEDY, "max_new_tokens": 10}}
    ref = gen(server, body)
    events = stream_all(server, body)
    assert events[-1] == "[DONE]" and events.count("[DONE]") == 1
    chunks = events[:-1]
    assert len(chunks) >= 2
    prev_text, prev_ids = "", []
    for i, c in enumerate(chunks):
        assert set(c) >= {"text", "output_ids", "meta_info"}
        assert c["text"].startswith(prev_text), (prev_text, c["text"])  # cumulative
        assert c["output_ids"][:len(prev_ids)] == prev_ids
        assert c["meta_info"]["completion_tokens"] == len(c["output_ids"])
        assert c["meta_info"]["id"] == chunks[0]["meta_info"]["id"]
        if i < len(chunks) - 1:
            assert c["meta_info"]["finish_reason"] is None
        prev_text, prev_ids = c["text"], c["output_ids"]
    last = chunks[-1]
    assert last["text"] == ref["text"]
    assert last["output_ids"] == ref["output_ids"]
    assert last["meta_info"]["finish_reason"] == {"type": "length", "length": 10}
    assert last["meta_info"]["completion_tokens"] == 10
    assert "e2e_latency" in last["meta_info"]


def test_stream_frontend_delta_protocol(server):
    """RuntimeEndpoint.generate_stream: iter_lines, stop at exactly 'data: [DONE]', delta = text[pos:]."""
    body = {"text": "Delta protocol", "sampling_params": {**GREEDY, "max_new_tokens": 9}, "stream": True}
    ref = gen(server, {k: v for k, v in body.items() if k != "stream"})
    got, pos, done = "", 0, False
    with requests.post(server.base_url + "/generate", json=body, stream=True, timeout=TIMEOUT) as r:
        for chunk in r.iter_lines(decode_unicode=False):
            chunk = chunk.decode("utf-8")
            if chunk and chunk.startswith("data:"):
                if chunk == "data: [DONE]":
                    done = True
                    break
                data = json.loads(chunk[5:].strip("\n"))
                delta = data["text"][pos:]
                pos += len(delta)
                got += delta
    assert done and got == ref["text"]


def test_stream_batch_carries_index(server):
    prompts = [ids_for(10, 5), ids_for(11, 8)]
    refs = gen(server, {"input_ids": prompts, "sampling_params": {**GREEDY, "max_new_tokens": 4}})
    events = stream_all(server, {"input_ids": prompts, "sampling_params": {**GREEDY, "max_new_tokens": 4}})
    assert events[-1] == "[DONE]"
    last: Dict[int, Dict] = {}
    for e in events[:-1]:
        assert e["index"] in (0, 1)
        last[e["index"]] = e
    assert sorted(last) == [0, 1]
    for i in (0, 1):
        assert last[i]["output_ids"] == refs[i]["output_ids"]
        assert last[i]["meta_info"]["finish_reason"] == {"type": "length", "length": 4}


# ------------------------------------------------------------------------------ logprobs
def test_logprobs(server):
    body = {"input_ids": ids_for(12, 10), "sampling_params": {**GREEDY, "max_new_tokens": 5},
            "return_logprob": True, "top_logprobs_num": 3}
    out = gen(server, body)
    m = out["meta_info"]
    lps = m["output_token_logprobs"]
    assert len(lps) == 5
    for (lp, tid, txt), real in zip(lps, out["output_ids"]):
        assert isinstance(lp, float) and lp <= 0.0
        assert tid == real
        assert txt is None
    tops = m["output_top_logprobs"]
    assert len(tops) == 5
    for top, (lp, tid, _) in zip(tops, lps):
        assert len(top) == 3
        assert all(t[2] is None for t in top)
        vals = [t[0] for t in top]
        assert vals == sorted(vals, reverse=True)
        assert top[0][1] == tid  # greedy: the chosen token is the most likely one
        assert abs(top[0][0] - lp) < 1e-4
    # with text
    out2 = gen(server, {**body, "return_text_in_logprobs": True})
    assert out2["output_ids"] == out["output_ids"]
    for lp, tid, txt in out2["meta_info"]["output_token_logprobs"]:
        assert isinstance(txt, str)
    for top in out2["meta_info"]["output_top_logprobs"]:
        assert all(isinstance(t[2], str) for t in top)
    # without return_logprob there are none
    out3 = gen(server, {"input_ids": ids_for(12, 10), "sampling_params": GREEDY})
    assert "output_token_logprobs" not in out3["meta_info"] or not out3["meta_info"]["output_token_logprobs"]


def test_stream_logprobs_are_cumulative(server):
    body = {"input_ids": ids_for(13, 6), "sampling_params": {**GREEDY, "max_new_tokens": 4}, "return_logprob": True}
    events = stream_all(server, body)
    chunks = events[:-1]
    for c in chunks:
        assert len(c["meta_info"]["output_token_logprobs"]) == len(c["output_ids"])
    assert [e[1] for e in chunks[-1]["meta_info"]["output_token_logprobs"]] == chunks[-1]["output_ids"]


# ------------------------------------------------------------------------------ prefix cache / flush
def test_repeated_prompt_hits_cache_and_flush_clears_it(server):
    wait_idle(server)
    assert requests.post(server.base_url + "/flush_cache", timeout=TIMEOUT).status_code == 200  # a clean start
    prompt = ids_for(20, 40)
    first = gen(server, {"input_ids": prompt, "sampling_params": GREEDY})
    assert first["meta_info"]["cached_tokens"] == 0
    second = gen(server, {"input_ids": prompt, "sampling_params": GREEDY})
    assert 0 < second["meta_info"]["cached_tokens"] <= 40
    assert second["output_ids"] == first["output_ids"]
    wait_idle(server)
    r = requests.post(server.base_url + "/flush_cache", timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    third = gen(server, {"input_ids": prompt, "sampling_params": GREEDY})
    assert third["meta_info"]["cached_tokens"] == 0
    assert third["output_ids"] == first["output_ids"]
    # RuntimeEndpoint.flush_cache sends a JSON body; POST only (tests/test_http_hardening.py)
    wait_idle(server)
    r = requests.post(server.base_url + "/flush_cache", json={"empty_cache": True}, timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    assert requests.get(server.base_url + "/flush_cache", timeout=TIMEOUT).status_code == 405


def test_flush_cache_refused_while_busy_and_abort_request_ends_stream(server):
    wait_idle(server)
    body = {"input_ids": ids_for(21, 8), "rid": "abort-me", "stream": True,
            "sampling_params": {"temperature": 0, "max_new_tokens": 1500, "ignore_eos": True}}
    t0 = time.monotonic()
    with requests.post(server.base_url + "/generate", json=body, stream=True, timeout=TIMEOUT) as r:
        assert r.status_code == 200
        it = sse_events(r)
        first = [next(it), next(it)]
        assert all(e["meta_info"]["finish_reason"] is None for e in first)
        fr = requests.post(server.base_url + "/flush_cache", timeout=TIMEOUT)
        assert fr.status_code == 400, fr.text
        a = requests.post(server.base_url + "/abort_request", json={"rid": "abort-me"}, timeout=TIMEOUT)
        assert a.status_code == 200
        rest = list(it)
    assert time.monotonic() - t0 < 30
    assert rest[-1] == "[DONE]"
    last = rest[-2] if len(rest) >= 2 else first[-1]
    assert last["meta_info"]["finish_reason"]["type"] == "abort"
    assert last["meta_info"]["completion_tokens"] < 1500
    wait_idle(server)
    assert requests.post(server.base_url + "/flush_cache", timeout=TIMEOUT).status_code == 200


def test_abort_all_ends_every_stream(server):
    wait_idle(server)
    results: Dict[int, List[Any]] = {}
    started = threading.Barrier(3, timeout=TIMEOUT)

    def client(i: int) -> None:
        body = {"input_ids": ids_for(30 + i, 6), "stream": True,
                "sampling_params": {"temperature": 0, "max_new_tokens": 1500, "ignore_eos": True}}
        with requests.post(server.base_url + "/generate", json=body, stream=True, timeout=TIMEOUT) as r:
            it = sse_events(r)
            evs = [next(it)]
            started.wait()
            evs += list(it)
        results[i] = evs

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(2)]
    for t in threads:
        t.start()
    started.wait()
    assert requests.post(server.base_url + "/abort_request", json={"abort_all": True},
                         timeout=TIMEOUT).status_code == 200
    for t in threads:
        t.join(timeout=TIMEOUT)
        assert not t.is_alive()
    for evs in results.values():
        assert evs[-1] == "[DONE]"
        assert evs[-2]["meta_info"]["finish_reason"]["type"] == "abort"
    assert len(results) == 2
    wait_idle(server)


# ------------------------------------------------------------------------------ health / info / metrics
@pytest.mark.parametrize("route", ["/health", "/health_generate"])
def test_health(server, route):
    r = requests.get(server.base_url + route, timeout=TIMEOUT)
    assert r.status_code == 200


def test_get_model_info(server, model_path):
    for route in ("/get_model_info", "/model_info"):
        info = requests.get(server.base_url + route, timeout=TIMEOUT).json()
        assert info["model_path"] == model_path
        assert info["tokenizer_path"] == model_path
        assert info["is_generation"] is True
        assert "preferred_sampling_params" in info and "weight_version" in info


def test_get_server_info(server, model_path):
    gen(server, {"input_ids": ids_for(40, 6), "sampling_params": GREEDY})
    info = server_info(server)
    for f in dataclasses.fields(ServerArgs):
        assert f.name in info, f"ServerArgs field {f.name} missing from /get_server_info"
    assert info["model_path"] == model_path
    assert info["port"] == server.port
    assert info["enable_metrics"] is True
    assert isinstance(info["version"], str)
    assert isinstance(info["internal_states"], list) and info["internal_states"]
    assert isinstance(info["max_total_num_tokens"], int) and info["max_total_num_tokens"] > 0
    for key in ("num_running_reqs", "num_queue_reqs"):
        v = info_stat(info, key)
        assert isinstance(v, int) and v >= 0
    for key in ("token_usage", "cache_hit_rate"):
        v = info_stat(info, key)
        assert isinstance(v, (int, float)) and 0.0 <= v <= 1.0
    assert info_stat(info, "max_total_num_tokens") == info["max_total_num_tokens"]
    assert requests.get(server.base_url + "/server_info", timeout=TIMEOUT).status_code == 200


def parse_metrics(text: str) -> Dict[str, float]:
    vals = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_labels, value = line.rsplit(" ", 1)
        vals[name_labels.split("{", 1)[0]] = float(value)
    return vals


def test_metrics(server):
    gen(server, {"input_ids": ids_for(41, 7), "sampling_params": GREEDY})
    r = requests.get(server.base_url + "/metrics", timeout=TIMEOUT)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    vals = parse_metrics(r.text)
    for name in ("sglang:num_running_reqs", "sglang:cache_hit_rate", "sglang:prompt_tokens_total",
                 "sglang:num_queue_reqs", "sglang:token_usage", "sglang:generation_tokens_total"):
        assert name in vals, name
    assert vals["sglang:num_running_reqs"] == 0
    assert vals["sglang:prompt_tokens_total"] >= 7
    assert vals["sglang:generation_tokens_total"] >= 8
    assert 0 <= vals["sglang:cache_hit_rate"] <= 1
    assert 'model_name="' in r.text


# ------------------------------------------------------------------------------ validation
LONG = ids_for(50, 40) * 60  # 2400 tokens > context 2048
BAD_BODIES = [
    ("temperature_negative", {"text": "x", "sampling_params": {"temperature": -1}}, ["temperature"]),
    ("temperature_not_number", {"text": "x", "sampling_params": {"temperature": "hot"}}, ["temperature"]),
    ("top_p_zero", {"text": "x", "sampling_params": {"top_p": 0}}, ["top_p"]),
    ("top_k_zero", {"text": "x", "sampling_params": {"top_k": 0}}, ["top_k"]),
    ("max_new_tokens_negative", {"text": "x", "sampling_params": {"max_new_tokens": -1}}, ["max_new_tokens"]),
    ("n_zero", {"text": "x", "sampling_params": {"n": 0}}, ["n must"]),
    ("unknown_sampling_field", {"text": "x", "sampling_params": {"bogus_knob": 1}}, ["bogus_knob"]),
    ("sampling_params_not_dict", {"text": "x", "sampling_params": "greedy"}, ["sampling_params"]),
    ("unknown_top_level_field", {"text": "x", "bogus_field": 1}, ["bogus_field"]),
    ("empty_text", {"text": ""}, ["empty"]),
    ("empty_text_batch", {"text": []}, ["empty"]),
    ("text_not_string", {"text": 123}, ["text"]),
    ("empty_input_ids", {"input_ids": []}, ["empty"]),
    ("input_ids_out_of_vocab", {"input_ids": [1, 2, VOCAB]}, ["input_ids", str(VOCAB)]),
    ("input_ids_negative", {"input_ids": [-1]}, ["input_ids", "-1"]),
    ("input_ids_not_ints", {"input_ids": ["a", "b"]}, ["input_ids"]),
    ("prompt_longer_than_context", {"input_ids": LONG}, ["context length", str(len(LONG))]),
    ("prompt_plus_max_new_tokens_too_long", {"input_ids": LONG[:2000], "sampling_params": {"max_new_tokens": 100}},
     ["context length", "max_new_tokens"]),
    ("neither_text_nor_input_ids", {"sampling_params": {"max_new_tokens": 1}}, ["text", "input_ids"]),
    ("both_text_and_input_ids", {"text": "x", "input_ids": [1]}, ["text", "input_ids"]),
    ("top_logprobs_num_negative", {"text": "x", "return_logprob": True, "top_logprobs_num": -1},
     ["top_logprobs_num"]),
    ("duplicate_rids", {"text": ["a", "b"], "rid": ["same", "same"]}, ["rid"]),
    ("rid_list_wrong_length", {"text": ["a", "b"], "rid": ["only-one"]}, ["rid"]),
    ("stream_with_bad_input", {"text": "", "stream": True}, ["empty"]),
    ("body_is_json_array", ["not", "an", "object"], ["json object"]),
]


@pytest.mark.parametrize("name,body,words", BAD_BODIES, ids=[b[0] for b in BAD_BODIES])
def test_bad_input_is_400_naming_the_field(server, name, body, words):
    assert_error(post(server, body), 400, *words)


def test_non_json_body_is_400(server):
    r = requests.post(server.base_url + "/generate", data=b"{this is not json",
                      headers={"Content-Type": "application/json"}, timeout=TIMEOUT)
    assert_error(r, 400, "json")
    r = requests.post(server.base_url + "/generate", data=b"", timeout=TIMEOUT)
    assert_error(r, 400, "json")


def test_server_keeps_serving_after_bad_inputs(server):
    for _, body, _ in BAD_BODIES:
        assert post(server, body).status_code == 400
    out = gen(server, {"text": "still alive?", "sampling_params": GREEDY})
    assert out["meta_info"]["completion_tokens"] == 8
    info = wait_idle(server)
    assert info["num_in_flight_requests"] == 0
    assert requests.get(server.base_url + "/health", timeout=TIMEOUT).status_code == 200


# ------------------------------------------------------------------------------ SGLang frontend traffic
FRONTEND_SP_OLD = {"skip_special_tokens": True, "spaces_between_special_tokens": True, "max_new_tokens": 6,
                   "stop": [], "temperature": 0, "top_p": 1.0, "top_k": -1, "frequency_penalty": 0.0,
                   "presence_penalty": 0.0, "ignore_eos": False, "regex": None}


def test_runtime_endpoint_generate_body(server):
    sp = {**FRONTEND_SP_OLD, "stop_token_ids": [], "min_p": 0.0}
    out = gen(server, {"text": "Q: what is 1+1? A:", "sampling_params": sp})
    assert isinstance(out["text"], str) and "meta_info" in out
    # with logprob options (the frontend adds those that are not null)
    out = gen(server, {"text": "Q: what?", "sampling_params": sp, "return_logprob": True, "top_logprobs_num": 2,
                       "return_text_in_logprobs": True})
    assert len(out["meta_info"]["output_token_logprobs"]) == out["meta_info"]["completion_tokens"]
    # cache_prefix / commit_lazy_operations
    out = gen(server, {"text": "A shared prefix that the frontend caches", "sampling_params": {"max_new_tokens": 0}})
    assert out["meta_info"]["prompt_tokens"] > 0



def test_runtime_endpoint_generate_body_newer_frontend(server):
    """Newer SGLang frontends send null-valued fields (stop_regex, ...): null means the default."""
    sp = {**FRONTEND_SP_OLD, "stop_token_ids": None, "min_p": 0.0, "stop_regex": None, "json_schema": None,
          "ebnf": None, "n": None}
    out = gen(server, {"text": "Q: what is 1+1? A:", "sampling_params": sp})
    assert isinstance(out["text"], str) and out["meta_info"]["completion_tokens"] >= 1


def test_api_key(model_path):
    key = "s3cret-key"
    with cleaned_up(ServerProcess(model_path, ["--api-key", key])) as s:
        body = {"text": "auth", "sampling_params": GREEDY}
        r = requests.post(s.base_url + "/generate", json=body, timeout=TIMEOUT)
        assert_error(r, 401)
        r = requests.post(s.base_url + "/generate", json=body, headers={"Authorization": "Bearer wrong"},
                          timeout=TIMEOUT)
        assert r.status_code == 401
        r = requests.post(s.base_url + "/generate", json=body, headers={"Authorization": key}, timeout=TIMEOUT)
        assert r.status_code == 401
        auth = {"Authorization": f"Bearer {key}"}
        r = requests.post(s.base_url + "/generate", json=body, headers=auth, timeout=TIMEOUT)
        assert r.status_code == 200 and r.json()["meta_info"]["completion_tokens"] == 8
        for route in ("/get_model_info", "/get_server_info", "/v1/models"):
            assert requests.get(s.base_url + route, timeout=TIMEOUT).status_code == 401, route
            assert requests.get(s.base_url + route, headers=auth, timeout=TIMEOUT).status_code == 200, route
        assert requests.post(s.base_url + "/flush_cache", timeout=TIMEOUT).status_code == 401
        assert requests.post(s.base_url + "/flush_cache", headers=auth, timeout=TIMEOUT).status_code == 200
        r = requests.get(s.base_url + "/health", headers=auth, timeout=TIMEOUT)
        assert r.status_code == 200
