"""The OpenAI-compatible API as a user of the `openai` client sees it, against a real server on the
tiny qwen2 checkpoint: models, completions and chat (plain, streamed, n, logprobs, echo, stop, seed,
usage, radix-cache reuse, response_format json_schema), refusals with OpenAI's 400 error shape, and
abort on client disconnect."""

from __future__ import annotations

import json
import re
import time

import openai
import pytest
import requests

from tests.server_utils import ServerProcess

GREEDY = {"temperature": 0, "extra_body": {"ignore_eos": True}}
SYSTEM = " ".join(["You are a helpful assistant that answers questions about the weather and the sea."] * 8)


@pytest.fixture(scope="module")
def srv(model_factory):
    with ServerProcess(model_factory("qwen2")) as s:
        yield s


@pytest.fixture(scope="module")
def client(srv):
    return openai.OpenAI(base_url=srv.base_url + "/v1", api_key="x", max_retries=0, timeout=60)


def chat_stream(client, **kw):
    return list(client.chat.completions.create(model="m", stream=True, **kw))


def running(srv) -> int:
    info = requests.get(srv.base_url + "/get_server_info", timeout=10).json()["scheduler_info"]
    return info["num_running_reqs"] + info["num_queue_reqs"]


# ---------------------------------------------------------------------------------- models
def test_models(srv, client):
    models = client.models.list().data
    assert len(models) == 1
    m = models[0]
    assert m.object == "model" and m.max_model_len == 2048
    assert client.models.retrieve(m.id).id == m.id
    r = requests.get(srv.base_url + "/v1/models/no-such-model", timeout=10)
    assert r.status_code == 404 and r.json()["object"] == "error"


# ---------------------------------------------------------------------------------- completions
def test_completion_stream_equals_non_stream(client):
    full = client.completions.create(model="anything", prompt="The quick brown fox", max_tokens=20, **GREEDY)
    assert full.id.startswith("cmpl-") and full.object == "text_completion" and full.model == "anything"
    ch = full.choices[0]
    assert ch.index == 0 and ch.finish_reason == "length" and ch.text
    assert full.usage.completion_tokens == 20 and full.usage.prompt_tokens > 0
    assert full.usage.total_tokens == full.usage.prompt_tokens + 20
    chunks = list(client.completions.create(model="m", prompt="The quick brown fox", max_tokens=20, stream=True,
                                            **GREEDY))
    assert "".join(c.choices[0].text for c in chunks) == ch.text
    assert [c.choices[0].finish_reason for c in chunks][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1


def test_completion_prompt_forms_n_and_echo(client):
    one = client.completions.create(model="m", prompt=[5, 6, 7, 8], max_tokens=6, **GREEDY).choices[0].text
    two = client.completions.create(model="m", prompt="Once upon a time", max_tokens=6, **GREEDY).choices[0].text
    r = client.completions.create(model="m", prompt=[[5, 6, 7, 8], [9, 10]], max_tokens=6, **GREEDY)
    assert r.choices[0].text == one
    r = client.completions.create(model="m", prompt=["Once upon a time", "Hello"], n=2, max_tokens=6, **GREEDY)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert r.choices[0].text == r.choices[1].text == two  # prompt-major: choices 0, 1 are the first prompt's
    assert r.usage.completion_tokens == 24
    single = client.completions.create(model="m", prompt="Once upon a time", max_tokens=6, **GREEDY).usage
    hello = client.completions.create(model="m", prompt="Hello", max_tokens=6, **GREEDY).usage
    assert r.usage.prompt_tokens == single.prompt_tokens + hello.prompt_tokens  # each prompt counted once
    echo = client.completions.create(model="m", prompt="Once upon a time", max_tokens=6, echo=True, **GREEDY)
    assert echo.choices[0].text == "Once upon a time" + two
    scored = client.completions.create(model="m", prompt="Once upon a time", max_tokens=6, echo=True, logprobs=1,
                                       **GREEDY)
    lp = scored.choices[0].logprobs
    n_prompt = scored.usage.prompt_tokens
    assert scored.choices[0].text == "Once upon a time" + two and len(lp.tokens) == n_prompt + 6
    assert lp.token_logprobs[0] is None and all(v <= 0 for v in lp.token_logprobs[1:])
    assert "".join(lp.tokens[:n_prompt]) == "Once upon a time"
    streamed = list(client.completions.create(model="m", prompt="Once upon a time", max_tokens=6, echo=True,
                                              logprobs=1, stream=True, **GREEDY))
    assert "".join(c.choices[0].text for c in streamed) == scored.choices[0].text
    assert [t for c in streamed for t in c.choices[0].logprobs.tokens] == lp.tokens


def test_completion_logprobs(client):
    r = client.completions.create(model="m", prompt="Hello world, this is", max_tokens=8, logprobs=3, **GREEDY)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 8
    for tok, chosen, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert chosen <= 0 and 1 <= len(top) <= 3
        best = max(top, key=top.get)
        assert top[best] == pytest.approx(chosen, abs=1e-4) and best == tok  # greedy picks the top-1
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)


def test_completion_stop_string_trims(client):
    text = client.completions.create(model="m", prompt="Once upon a time", max_tokens=24, **GREEDY).choices[0].text
    m = next(m for m in re.finditer(r"[A-Za-z]{2,}", text) if m.start() > 0)
    stop = m.group(0)
    r = client.completions.create(model="m", prompt="Once upon a time", max_tokens=24, stop=[stop], **GREEDY)
    assert r.choices[0].text == text[:text.find(stop)]
    assert r.choices[0].finish_reason == "stop"


def test_seed_determinism(client):
    def run(seed):
        return client.completions.create(model="m", prompt="Hello", max_tokens=32, temperature=1, seed=seed,
                                         extra_body={"ignore_eos": True}).choices[0].text

    a, b, c = run(1), run(1), run(2)
    assert a == b and a != c


def test_completion_include_usage(client):
    chunks = list(client.completions.create(model="m", prompt="Hello", max_tokens=5, stream=True,
                                            stream_options={"include_usage": True}, **GREEDY))
    last = chunks[-1]
    assert last.choices == [] and last.usage.completion_tokens == 5
    assert all(c.usage is None for c in chunks[:-1])


# ---------------------------------------------------------------------------------- chat
def test_chat_non_stream_and_stream(client):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    full = client.chat.completions.create(model="m", messages=msgs, max_tokens=12, **GREEDY)
    assert full.id.startswith("chatcmpl-") and full.object == "chat.completion"
    ch = full.choices[0]
    assert ch.message.role == "assistant" and ch.message.content and ch.finish_reason == "length"
    chunks = chat_stream(client, messages=msgs, max_tokens=12, stream_options={"include_usage": True}, **GREEDY)
    assert chunks[0].object == "chat.completion.chunk"
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].choices[0].delta.content == ""
    body = [c for c in chunks if c.choices]
    assert body[-1].choices[0].finish_reason == "length"
    assert all(c.choices[0].finish_reason is None for c in body[:-1])
    assert "".join(c.choices[0].delta.content or "" for c in body) == ch.message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens
    # text parts render like the plain string
    parts = [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]}, msgs[1]]
    again = client.chat.completions.create(model="m", messages=parts, max_tokens=12, **GREEDY)
    assert again.choices[0].message.content == ch.message.content


def test_chat_n_and_logprobs(client):
    msgs = [{"role": "user", "content": "Tell me about the sea"}]
    r = client.chat.completions.create(model="m", messages=msgs, max_tokens=6, n=2, logprobs=True, top_logprobs=2,
                                       **GREEDY)
    assert [c.index for c in r.choices] == [0, 1]
    assert r.choices[0].message.content == r.choices[1].message.content
    content = r.choices[0].logprobs.content
    assert len(content) == 6
    for e in content:
        assert e.logprob <= 0 and len(e.top_logprobs) == 2 and e.bytes
        assert e.top_logprobs[0].logprob == pytest.approx(e.logprob, abs=1e-4)  # greedy token is the top-1
        assert e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob
    chunks = chat_stream(client, messages=msgs, max_tokens=6, logprobs=True, **GREEDY)
    streamed = [e.logprob for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert streamed == pytest.approx([e.logprob for e in content], abs=1e-4)


def test_chat_prefix_cache_reuse(client):
    msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "What is the weather like?"}]
    first = client.chat.completions.create(model="m", messages=msgs, max_tokens=8, temperature=0)
    assert first.usage.prompt_tokens > 250
    msgs += [{"role": "assistant", "content": first.choices[0].message.content},
             {"role": "user", "content": "And the sea?"}]
    second = client.chat.completions.create(model="m", messages=msgs, max_tokens=8, temperature=0)
    assert second.usage.prompt_tokens_details.cached_tokens >= 250
    third = client.chat.completions.create(model="m", messages=msgs, max_tokens=8, temperature=0)
    assert third.usage.prompt_tokens_details.cached_tokens >= second.usage.prompt_tokens - 1


# ---------------------------------------------------------------------------------- refusals
BAD = [
    ("completions", {"prompt": "hi", "temperature": -1}, "temperature"),
    ("completions", {"prompt": "hi", "n": 0}, "n"),
    ("completions", {"prompt": "hi", "top_p": 1.5}, "top_p"),
    ("completions", {"prompt": "hi", "max_tokens": -1}, "max_tokens"),
    ("completions", {"prompt": "hi", "temperature": "hot"}, "temperature"),
    ("completions", {"prompt": ""}, None),
    ("completions", {"prompt": []}, "prompt"),
    ("completions", {"prompt": [7] * 2100}, None),
    ("completions", {"prompt": "hi", "response_format": {"type": "structural_tag"}}, "response_format"),
    ("completions", {"prompt": "hi", "regex": "(yes|no"}, None),
    ("completions", {"prompt": "hi", "seed": 2 ** 70}, "seed"),
    ("completions", {"prompt": "hi", "stop_token_ids": [10 ** 12], "min_tokens": 2}, "stop_token_ids"),
    ("chat/completions", {"messages": []}, "messages"),
    ("chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
    ("chat/completions", {"messages": "hello"}, "messages"),
    ("chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 5000}, None),
]


def test_bad_inputs_answer_400_and_server_keeps_serving(srv, client):
    for route, body, param in BAD:
        r = requests.post(f"{srv.base_url}/v1/{route}", json={"model": "m", **body}, timeout=30)
        assert r.status_code == 400, (route, body, r.text)
        err = r.json()
        assert err["object"] == "error" and err["type"] == "BadRequestError" and err["code"] == 400
        assert err["message"] and (param is None or err["param"] == param), (body, err)
    r = requests.post(f"{srv.base_url}/v1/completions", data="{not json", timeout=30,
                      headers={"content-type": "application/json"})
    assert r.status_code == 400
    assert client.completions.create(model="m", prompt="hi", max_tokens=3).usage.completion_tokens <= 3


def test_response_format_json_schema(client):
    schema = {"type": "object", "properties": {"color": {"enum": ["red", "green"]}}, "required": ["color"],
              "additionalProperties": False}
    msgs = [{"role": "user", "content": "Pick a color"}]
    r = client.chat.completions.create(model="m", messages=msgs, max_tokens=60, response_format={
        "type": "json_schema", "json_schema": {"name": "color", "schema": schema}})
    assert r.choices[0].finish_reason == "stop"
    assert json.loads(r.choices[0].message.content)["color"] in ("red", "green")
    with pytest.raises(openai.BadRequestError, match="schema is required"):
        client.chat.completions.create(model="m", messages=msgs, response_format={"type": "json_schema"})
    with pytest.raises(openai.BadRequestError, match="json_schema"):
        client.chat.completions.create(model="m", messages=msgs, response_format={
            "type": "json_schema", "json_schema": {"name": "bad", "schema": "{not json"}})


def test_unsupported_features_are_refused(client):
    msgs = [{"role": "user", "content": "x"}]
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    with pytest.raises(openai.BadRequestError, match="functions"):
        client.chat.completions.create(model="m", messages=msgs, functions=[{"name": "f"}])
    auto = client.chat.completions.create(model="m", messages=msgs, tools=tools, max_tokens=2)
    assert auto.choices[0].message.role == "assistant"
    with pytest.raises(openai.BadRequestError, match="tool_choice"):
        client.chat.completions.create(model="m", messages=msgs, tool_choice="required")
    ok = client.chat.completions.create(model="m", messages=msgs, max_tokens=2, response_format={"type": "text"},
                                        tools=tools, tool_choice="none")
    assert ok.choices[0].message.role == "assistant"


# ---------------------------------------------------------------------------------- disconnect
@pytest.mark.parametrize("stream", [True, False])
def test_client_disconnect_aborts(srv, stream):
    body = {"model": "m", "messages": [{"role": "user", "content": "Go on"}], "n": 4, "max_tokens": 2000,
            "ignore_eos": True, "stream": stream}
    url = srv.base_url + "/v1/chat/completions"
    if stream:
        with requests.post(url, json=body, stream=True, timeout=30) as r:
            lines = r.iter_lines()
            first = next(line for line in lines if line)
            assert json.loads(first[len(b"data: "):])["choices"][0]["delta"]["role"] == "assistant"
    else:
        with pytest.raises(requests.Timeout):
            requests.post(url, json=body, timeout=1.0)
    deadline = time.monotonic() + 5.0  # the whole request would take ~25 s
    while running(srv) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert running(srv) == 0
