"""Request limits and grammar compilation (issue 11, "Hardening").

* RequestBuilder (offline, no model): n, prompts per batch, top_logprobs_num, count and length of stop
  strings, size of regex / EBNF / JSON schema, prompt length before tokenizing, max_new_tokens and other
  integers, lone UTF-16 surrogates, the grammar check's deadline: each a ValueError naming the field
  (and the flag), raised before any expensive work.
* XGrammarBackend: construction is quick (the tokenizer scan happens on the worker), every compile
  future completes within the timeout even when the compile never returns, the cache is a bounded LRU.
* The HTTP server (one per module, small limits): every limit answers a 400 naming the field within
  milliseconds, native and OpenAI routes alike, and the server keeps serving; request building runs
  off the asyncio loop; a forced tool call is compact JSON; an aborted OpenAI request is an error,
  never finish_reason "abort".
"""

from __future__ import annotations

import asyncio
import json
import threading
import time

import openai
import pytest
import requests

from radixlm.managers.request_builder import RequestBuilder, RequestLimits
from radixlm.server_args import ServerArgs
from tests.server_utils import ServerProcess

VOCAB = 515
CTX = 2048
SMALL = RequestLimits(max_n=4, max_batch_prompts=3, max_top_logprobs_num=5, max_stop_strings=2,
                      max_stop_string_len=8, max_grammar_bytes=2000, grammar_compile_timeout=0.5)
FLAGS = ["--max-n", "4", "--max-batch-prompts", "3", "--max-top-logprobs-num", "5", "--max-stop-strings", "2",
         "--max-stop-string-len", "8", "--max-grammar-bytes", "2000"]
BIG_SCHEMA = {"type": "object", "properties": {f"field_{i}": {"type": "integer"} for i in range(200)}}


@pytest.fixture(scope="module")
def tok(qwen2_path):
    from radixlm.managers.tokenizer import get_tokenizer

    return get_tokenizer(qwen2_path)


@pytest.fixture()
def builder(tok):
    return RequestBuilder(tok, VOCAB, CTX, "xgrammar", SMALL)


class _NoEncode:
    """A tokenizer that fails the test when asked to tokenize."""

    def __init__(self, tok):
        self.tok = tok

    def get_vocab(self):
        return self.tok.get_vocab()

    def encode(self, *a, **k):
        raise AssertionError("tokenized before the cheap checks")


# ------------------------------------------------------------------------------ RequestBuilder
def test_limits_come_from_server_args():
    args = ServerArgs(model_path="m", max_n=3, max_batch_prompts=5, max_top_logprobs_num=7, max_stop_strings=9,
                      max_stop_string_len=11, max_grammar_bytes=13, grammar_compile_timeout=2.5)
    assert RequestLimits.from_server_args(args) == RequestLimits(3, 5, 7, 9, 11, 13, 2.5)
    defaults = ServerArgs(model_path="m")
    assert RequestLimits() == RequestLimits.from_server_args(defaults)
    from radixlm.constrained import xgrammar_backend as xb

    assert (xb.DEFAULT_COMPILE_TIMEOUT, xb.DEFAULT_CACHE_SIZE) == (defaults.grammar_compile_timeout,
                                                                   defaults.grammar_cache_size)


@pytest.mark.parametrize("kwargs, field, flag", [
    (dict(input_ids=[5, 6], sampling_params={"n": 5}), "n", "--max-n"),
    (dict(text=["a", "b", "c", "d"]), "text", "--max-batch-prompts"),
    (dict(input_ids=[[5]] * 4), "input_ids", "--max-batch-prompts"),
    (dict(input_ids=[5], return_logprob=True, top_logprobs_num=6), "top_logprobs_num", "--max-top-logprobs-num"),
    (dict(input_ids=[5], sampling_params={"stop": ["a", "b", "c"]}), "stop", "--max-stop-strings"),
    (dict(input_ids=[5], sampling_params={"stop": "x" * 9}), "stop", "--max-stop-string-len"),
    (dict(input_ids=[5], sampling_params={"regex": "a" * 2001}), "regex", "--max-grammar-bytes"),
    (dict(input_ids=[5], sampling_params={"ebnf": "root ::= " + '"a" ' * 600}), "ebnf", "--max-grammar-bytes"),
    (dict(input_ids=[5], sampling_params={"json_schema": BIG_SCHEMA}), "json_schema", "--max-grammar-bytes"),
    (dict(input_ids=[5], sampling_params={"json_schema": json.dumps(BIG_SCHEMA)}), "json_schema",
     "--max-grammar-bytes"),
])
def test_each_limit_names_field_and_flag(tok, kwargs, field, flag):
    b = RequestBuilder(_NoEncode(tok), VOCAB, CTX, "xgrammar", SMALL)  # all refused before tokenizing
    with pytest.raises(ValueError, match=f"^{field}: .*\\({flag}\\)"):
        b.build(**kwargs)


def test_at_the_limits_is_accepted(builder):
    msgs, _ = builder.build(text=["a", "b", "c"], sampling_params={"n": 4, "stop": ["x" * 8, "y"], "regex": "a+"},
                            return_logprob=True, top_logprobs_num=5)
    assert len(msgs) == 12


def test_default_limits(tok):
    b = RequestBuilder(tok, VOCAB, CTX)
    b.build(input_ids=[5], sampling_params={"n": 128, "max_new_tokens": 1})
    with pytest.raises(ValueError, match="^n: 129 .*--max-n"):
        b.build(input_ids=[5], sampling_params={"n": 129})
    with pytest.raises(ValueError, match="^top_logprobs_num: 21 .*--max-top-logprobs-num"):
        b.build(input_ids=[5], return_logprob=True, top_logprobs_num=21)


def test_long_text_refused_before_tokenizing(tok):
    b = RequestBuilder(_NoEncode(tok), VOCAB, CTX, "xgrammar", SMALL)
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match="^text: the input \\(4000000 characters\\) is longer than the model's "
                                         "context length"):
        b.build(text="ab " * 1333333 + "c")
    assert time.perf_counter() - t0 < 0.5


def test_long_input_ids_refused_before_walking_them(builder):
    ids = [5] * (CTX + 10) + ["not a token"]  # the length alone decides
    with pytest.raises(ValueError, match="longer than the model's context length"):
        builder.build(input_ids=ids)


@pytest.mark.parametrize("sp, field", [
    ({"max_new_tokens": 2 ** 70}, "max_new_tokens"),
    ({"top_k": 2 ** 70}, "top_k"),
    ({"min_new_tokens": 2 ** 64}, "min_new_tokens"),
    ({"min_new_tokens": CTX}, "min_new_tokens"),  # max_new_tokens unset: bounded by what the context leaves
    ({"max_new_tokens": CTX}, "max_new_tokens"),
])
def test_integers_are_sane(builder, sp, field):
    with pytest.raises(ValueError, match=field):
        builder.build(input_ids=[5, 6], sampling_params=sp)


@pytest.mark.parametrize("kwargs, field", [
    (dict(text="ab\ud800cd"), "text"),
    (dict(text=["ok", "\udfff"]), "text"),
    (dict(input_ids=[5], sampling_params={"stop": ["ok", "x\ud83d"]}), "sampling_params.stop"),
    (dict(input_ids=[5], sampling_params={"regex": "a\ud800"}), "sampling_params.regex"),
    (dict(input_ids=[5], sampling_params={"json_schema": {"type": "object", "title": "\ud800"}}),
     "sampling_params.json_schema"),
    (dict(input_ids=[5], rid="r\ud800"), "rid"),
])
def test_lone_surrogates_are_400_not_500(builder, kwargs, field):
    with pytest.raises(ValueError, match=f"^{field}.*surrogate"):
        builder.build(**kwargs)


def test_grammar_check_has_a_deadline(builder, monkeypatch):
    import radixlm.managers.request_builder as rb

    release = threading.Event()
    monkeypatch.setattr(rb, "check_grammar_syntax", lambda key: release.wait(30))
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match="^regex: checking the grammar took longer than 0.5 s "
                                         "\\(--grammar-compile-timeout\\)"):
        builder.build(input_ids=[5], sampling_params={"regex": "a+"})
    assert time.perf_counter() - t0 < 3
    monkeypatch.setattr(rb, "check_grammar_syntax", lambda key: None)
    builder.build(input_ids=[5], sampling_params={"regex": "a+"})  # the stuck check does not hold the next one
    release.set()


# ------------------------------------------------------------------------------ grammar backend
@pytest.fixture()
def make_backend(tok):
    made = []

    def make(**kw):
        from radixlm.constrained.xgrammar_backend import XGrammarBackend

        b = XGrammarBackend(tok, VOCAB, [tok.eos_token_id], **kw)
        made.append(b)
        return b

    yield make


def test_backend_construction_does_not_wait_for_the_tokenizer_scan(tok, make_backend, monkeypatch):
    import xgrammar as xgr

    real = xgr.TokenizerInfo.from_huggingface

    def slow(*a, **k):
        time.sleep(1.5)
        return real(*a, **k)

    monkeypatch.setattr(xgr.TokenizerInfo, "from_huggingface", slow)
    t0 = time.perf_counter()
    b = make_backend()
    assert time.perf_counter() - t0 < 0.5  # the scheduler thread is free
    compiled = b.compile_async(("regex", "ab+")).result(timeout=30)  # the first compile waited for it
    m = b.new_matcher(compiled)
    assert all(m.accept_token(t) for t in tok.encode("abbb", add_special_tokens=False))
    assert not m.accept_token(tok.encode("c", add_special_tokens=False)[0])


def test_compile_future_completes_within_the_timeout(make_backend):
    from radixlm.constrained.xgrammar_backend import GrammarCompileTimeout

    b = make_backend(compile_timeout=0.5)
    b.wait_ready(30)
    release = threading.Event()
    real = b.compiler.compile_regex

    def compile_regex(text):
        if text == "stuck":
            release.wait(60)  # a compile that does not come back in time
        return real(text)

    b.compiler.compile_regex = compile_regex
    t0 = time.perf_counter()
    stuck = b.compile_async(("regex", "stuck"))
    time.sleep(0.3)
    queued = b.compile_async(("regex", "a|b"))  # queued behind the stuck one on the same worker
    with pytest.raises(GrammarCompileTimeout, match="^regex: grammar compilation took longer than 0.5 s "
                                                    "\\(--grammar-compile-timeout\\)"):
        stuck.result(timeout=5)
    assert time.perf_counter() - t0 < 2
    assert queued.result(timeout=5) is not None  # moved to a fresh worker, within its own deadline
    assert b.compile_async(("json", '{"type": "integer"}')).result(timeout=5) is not None
    assert b.compile_async(("regex", "stuck")) is stuck  # failures are cached: no recompiling storms
    release.set()
    deadline = time.time() + 10
    while b.compile_async(("regex", "stuck")).exception(timeout=5) is not None:  # late success replaces it
        assert time.time() < deadline
        time.sleep(0.05)


def test_compile_cache_is_a_bounded_lru(make_backend):
    b = make_backend(cache_size=2)
    fa = b.compile_async(("regex", "a+"))
    b.compile_async(("regex", "b+"))
    assert b.compile_async(("regex", "a+")) is fa  # hit: a+ is now the most recent
    b.compile_async(("regex", "c+"))  # evicts b+
    assert list(b.cache) == [("regex", "a+"), ("regex", "c+")]
    assert b.compile_async(("regex", "a+")) is fa
    for f in list(b.cache.values()):
        assert f.result(timeout=30) is not None


# ------------------------------------------------------------------------------ HTTP server
@pytest.fixture(scope="module")
def srv(qwen2_path):
    with ServerProcess(qwen2_path, FLAGS) as s:
        yield s


@pytest.fixture(scope="module")
def client(srv):
    return openai.OpenAI(base_url=srv.base_url + "/v1", api_key="x", max_retries=0, timeout=60)


def _post(srv, route, body):
    t0 = time.perf_counter()
    r = requests.post(srv.base_url + route, data=json.dumps(body), headers={"Content-Type": "application/json"},
                      timeout=30)
    return r, time.perf_counter() - t0


CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
CMPL = {"model": "m", "prompt": "hi", "max_tokens": 2}
GEN = {"text": "hi", "sampling_params": {"max_new_tokens": 2}}


def _with(base, **kw):
    out = json.loads(json.dumps(base))
    for k, v in kw.items():
        if k == "sampling_params":
            out[k].update(v)
        else:
            out[k] = v
    return out


CASES = [
    ("/generate", _with(GEN, sampling_params={"n": 5}), "n"),
    ("/generate", _with(GEN, text=["a", "b", "c", "d"]), "text"),
    ("/generate", _with(GEN, return_logprob=True, top_logprobs_num=6), "top_logprobs_num"),
    ("/generate", _with(GEN, sampling_params={"stop": ["a", "b", "c"]}), "stop"),
    ("/generate", _with(GEN, sampling_params={"stop": "x" * 9}), "stop"),
    ("/generate", _with(GEN, sampling_params={"json_schema": json.dumps(BIG_SCHEMA)}), "json_schema"),
    ("/generate", _with(GEN, text="hi \ud800"), "text"),
    ("/generate", _with(GEN, text="word " * 30000), "text: the input (150000 characters)"),
    ("/generate", _with(GEN, sampling_params={"max_new_tokens": 2 ** 62}), "max_new_tokens"),
    ("/v1/completions", _with(CMPL, n=5), "n"),
    ("/v1/completions", _with(CMPL, prompt=["a", "b", "c", "d"]), "prompt"),
    ("/v1/completions", _with(CMPL, logprobs=6), "logprobs"),
    ("/v1/completions", _with(CMPL, logprobs=21), "logprobs"),
    ("/v1/completions", _with(CMPL, stop=["a", "b", "c"]), "stop"),
    ("/v1/completions", _with(CMPL, stop="x" * 9), "stop"),
    ("/v1/completions", _with(CMPL, regex="a" * 2001), "regex"),
    ("/v1/completions", _with(CMPL, prompt="hi \ud800"), "prompt"),
    ("/v1/chat/completions", _with(CHAT, n=5), "n"),
    ("/v1/chat/completions", _with(CHAT, logprobs=True, top_logprobs=6), "top_logprobs"),
    ("/v1/chat/completions", _with(CHAT, logprobs=True, top_logprobs=21), "top_logprobs"),
    ("/v1/chat/completions", _with(CHAT, stop=["a", "b", "c"]), "stop"),
    ("/v1/chat/completions", _with(CHAT, response_format={"type": "json_schema", "json_schema": {
        "name": "x", "schema": BIG_SCHEMA}}), "response_format"),
    ("/v1/chat/completions", _with(CHAT, messages=[{"role": "user", "content": "a\udc00"}]),
     "messages.0.content"),
    ("/v1/chat/completions", _with(CHAT, messages=[{"role": "user", "content": "word " * 30000}]),
     "messages: the input"),
    ("/v1/chat/completions", _with(CHAT, tools=[{"type": "function", "function": {
        "name": "f", "parameters": BIG_SCHEMA}}], tool_choice="required"), "tools"),
    ("/v1/chat/completions", _with(CHAT, max_tokens=2 ** 62), "maximum context length"),
]


@pytest.mark.parametrize("route, body, field", CASES, ids=[f"{r}-{f}-{i}" for i, (r, _, f) in enumerate(CASES)])
def test_limits_answer_400_naming_the_field(srv, route, body, field):
    r, took = _post(srv, route, body)
    assert r.status_code == 400, r.text
    err = r.json()
    msg = err.get("message") or err["error"]["message"]
    assert field in msg, msg
    assert took < 2.0, took  # refused before any expensive work (generous for a shared 2-core machine)
    ok = requests.post(srv.base_url + "/generate", json=GEN, timeout=30)
    assert ok.status_code == 200, ok.text


def test_forced_tool_call_is_compact_and_fits_the_budget(client):
    """With free JSON whitespace a random-weight model spent max_tokens=160 on padding (finish
    "length"); compact JSON leaves it no whitespace to choose."""
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Oslo"]},
                                         "days": {"type": "integer", "minimum": 1, "maximum": 9}},
        "required": ["city", "days"]}}}]
    r = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Weather?"}], tools=tools,
                                       tool_choice="required", max_tokens=160, temperature=1, seed=3, n=4)
    for ch in r.choices:
        assert ch.finish_reason == "tool_calls", ch
        args = ch.message.tool_calls[0].function.arguments
        assert json.loads(args)["city"] in ("Paris", "Oslo")
        assert args == json.dumps(json.loads(args)), args  # compact: exactly the ", " / ": " separators


def test_forced_call_grammar_has_no_free_whitespace():
    from radixlm.entrypoints.openai.protocol import ChatCompletionRequest
    from radixlm.entrypoints.openai.tools import prepare_tools

    req = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "x"}], tool_choice="required",
                                tools=[{"type": "function", "function": {"name": "f", "parameters": {
                                    "type": "object", "properties": {"a": {"type": "array", "items": {
                                        "type": "integer"}}}}}}])
    setup = prepare_tools(req, ServerArgs(model_path="m"), "<tool_call>", False)
    assert "[ \\n\\t]" not in setup.ebnf and "[ \\t\\n]" not in setup.ebnf, setup.ebnf


def test_aborted_openai_stream_is_an_error_not_finish_reason_abort(srv):
    body = {"model": "m", "prompt": "hello", "max_tokens": 1500, "ignore_eos": True, "stream": True,
            "rid": "limits-abort-1"}
    reasons, errors = [], []
    with requests.post(srv.base_url + "/v1/completions", json=body, stream=True, timeout=60) as r:
        assert r.status_code == 200
        aborted = False
        for line in r.iter_lines():
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            d = json.loads(line[6:])
            if "error" in d:
                errors.append(d["error"])
                continue
            reasons += [c["finish_reason"] for c in d["choices"] if c.get("finish_reason")]
            if not aborted:
                aborted = True
                assert requests.post(srv.base_url + "/abort_request", json={"rid": "limits-abort-1"},
                                     timeout=10).status_code == 200
    assert reasons == [] and len(errors) == 1, (reasons, errors)
    assert errors[0]["code"] == 400


# ------------------------------------------------------------------------------ off the event loop
def test_request_building_runs_off_the_event_loop(qwen2_path, monkeypatch):
    """Tokenizing, grammar checks and the forced-call grammar never run on the server's asyncio loop."""
    from fastapi.testclient import TestClient

    from radixlm.entrypoints.http_server import create_app
    from radixlm.managers.tokenizer_manager import TokenizerManager

    tm = TokenizerManager(ServerArgs(model_path=qwen2_path))
    on_loop = []

    def probe(name, fn):
        def wrapped(*a, **k):
            try:
                asyncio.get_running_loop()
                on_loop.append(name)
            except RuntimeError:
                pass
            return fn(*a, **k)
        return wrapped

    monkeypatch.setattr(tm.builder, "build", probe("build", tm.builder.build))
    monkeypatch.setattr(tm.builder, "encode", probe("encode", tm.builder.encode))
    import radixlm.entrypoints.openai.serving_chat as chat

    monkeypatch.setattr(chat, "prepare_tools", probe("prepare_tools", chat.prepare_tools))

    async def no_submit(msgs):
        raise ValueError("probe: not submitted")

    monkeypatch.setattr(tm, "submit", no_submit)
    client = TestClient(create_app(tm))
    try:
        for route, body in [("/generate", {"text": "hi", "sampling_params": {"regex": "a+"}}),
                            ("/v1/completions", {"model": "m", "prompt": "hi", "regex": "a+"}),
                            ("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "hi"}],
                                                      "tools": [{"type": "function", "function": {"name": "f"}}],
                                                      "tool_choice": "required"})]:
            r = client.post(route, json=body)
            assert r.status_code == 400 and "probe" in r.text, r.text
    finally:
        tm.shutdown()
    assert on_loop == [], on_loop
