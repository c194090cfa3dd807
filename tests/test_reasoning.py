"""Reasoning output (--reasoning-parser qwen3 | deepseek-r1): the parser on text (non-stream split,
streams cut at every character boundary, tags never leaked), the tiny checkpoints' reasoning chat
templates, and against a real server on a tiny qwen3 checkpoint with Qwen3's template: the think block
in message.reasoning_content / delta.reasoning_content, separate_reasoning, stream_reasoning,
chat_template_kwargs.enable_thinking, and tool calls parsed from the answer only. A random-weight model
emits no think tags by itself: the server tests force its output with a regex constraint."""

from __future__ import annotations

import json
import random

import pytest
import requests

from radixlm.entrypoints.openai.reasoning_parser import (
    REASONING_PARSERS,
    ReasoningParser,
    reasoning_format,
    reasoning_token_count,
    separate_reasoning,
    starts_in_reasoning,
    thinking_template_kwargs,
)
from radixlm.entrypoints.openai.tool_parser import parse_tool_calls
from tests.server_utils import ServerProcess

TEXTS = [
    "<think>\nLet me think.\nStep 1.\n</think>\n\nThe answer is 4.",
    "<think>a</think>b",
    "<think></think>answer",
    "<think>\n\n</think>\n\nanswer only",
    "  <think> lead ws </think>  trail  ",
    "no tags at all",
    "",
    "   ",
    "<think>never closed, cut by max_tokens",
    "reasoning without an opening tag</think>\n\nthe answer",
    "<thi not a tag",
    "<think>x</thin not closed</think>answer with </think> twice",
    "<think>a < b and c </ d</think>\nans <think> inner",
    "text then <think>late tag</think> rest",
    "<think>\n<tool_call>{\"name\": \"f\", \"arguments\": {}}</tool_call>\n</think>\n\n<tool_call>",
    "<think>héllo wörld 🙂</think>ünïcode 🙂",
]
CASES = [(name, forced) for name in REASONING_PARSERS for forced in (True, False)]


def feed_pieces(text, name, forced, cuts, stream_reasoning=True):
    """The parser fed `text` cut at `cuts`; returns the list of (reasoning, answer) deltas."""
    p = ReasoningParser(name, forced, stream_reasoning)
    out, prev = [], 0
    for c in list(cuts) + [len(text)]:
        out.append(p.feed(text[prev:c]))
        prev = c
    out.append(p.finish())
    return out


def joined(deltas):
    return "".join(r for r, _ in deltas) or None, "".join(a for _, a in deltas)


# ---------------------------------------------------------------------------------- parser (no server)
def test_registry_and_starting_state():
    assert set(REASONING_PARSERS) == {"qwen3", "deepseek-r1"}
    with pytest.raises(ValueError, match="deepseek-r1, qwen3"):
        reasoning_format("bogus")
    assert starts_in_reasoning("deepseek-r1", None)
    assert starts_in_reasoning("deepseek-r1", {"enable_thinking": False})  # the template always opens it
    assert starts_in_reasoning("qwen3", None) and starts_in_reasoning("qwen3", {"enable_thinking": True})
    assert not starts_in_reasoning("qwen3", {"enable_thinking": False})


def test_non_stream_split():
    s = separate_reasoning
    for name in REASONING_PARSERS:
        for forced in (True, False):
            assert s("<think>\nLet me think.\n</think>\n\nThe answer is 4.", name, forced) == \
                ("Let me think.", "The answer is 4.")
            assert s("<think>\n<tool_call>x</tool_call>\n</think>\n\nok", name, forced) == \
                ("<tool_call>x</tool_call>", "ok")
            assert s("<think>cut by max_tokens", name, forced) == ("cut by max_tokens", "")
            assert s("<think>a < b </ c</think>x", name, forced) == ("a < b </ c", "x")
            assert s("<think></think>answer", name, forced) == (None, "answer")
    # the output starts inside the block (deepseek-r1; qwen3 with thinking on): no opening tag needed
    assert s("thinking\n</think>\n\nanswer", "deepseek-r1", True) == ("thinking", "answer")
    assert s("all reasoning", "deepseek-r1", True) == ("all reasoning", "")
    # qwen3 with enable_thinking=false: the template closed the block, the output is the answer as is
    assert s("thinking</think>answer ", "qwen3", False) == (None, "thinking</think>answer ")
    assert s("  plain answer\n", "qwen3", False) == (None, "  plain answer\n")
    assert s("text then <think>late</think> rest", "qwen3", False) == (None, "text then <think>late</think> rest")
    assert s("<thi", "qwen3", False) == (None, "<thi")
    assert s("", "qwen3", False) == (None, "")
    # only the first </think> closes the block
    assert s("<think>a</think>b</think>c", "qwen3", True) == ("a", "b</think>c")


@pytest.mark.parametrize("name,forced", CASES)
def test_stream_cut_at_every_boundary_equals_non_stream(name, forced):
    for text in TEXTS:
        want = separate_reasoning(text, name, forced)
        for c in range(len(text) + 1):  # one cut at each character boundary
            deltas = feed_pieces(text, name, forced, [c])
            assert joined(deltas) == want, (text, c)
        deltas = feed_pieces(text, name, forced, range(1, len(text)))  # one character at a time
        assert joined(deltas) == want, text
        rng = random.Random(hash(text) & 0xFFFF)
        for _ in range(20):
            cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(1, 6)))) if len(text) > 1 \
                else []
            assert joined(feed_pieces(text, name, forced, cuts)) == want, (text, cuts)


@pytest.mark.parametrize("name,forced", CASES)
def test_tags_never_leak_into_deltas(name, forced):
    text = "<think>\nstep one\nstep two\n</think>\n\nfinal answer"
    for c1 in range(len(text) + 1):
        for c2 in range(c1, len(text) + 1, 3):
            for r, a in feed_pieces(text, name, forced, [c1, c2]):
                for tag in ("<think>", "</think>"):
                    assert tag not in r and tag not in a
                assert "<" not in r and "<" not in a  # the text holds no '<' but the tags'
    # reasoning deltas all come before the first answer delta
    deltas = feed_pieces(text, name, forced, range(1, len(text)))
    kinds = [k for r, a in deltas for k, v in (("r", r), ("a", a)) if v]
    assert kinds == sorted(kinds, reverse=True) and kinds[0] == "r" and kinds[-1] == "a"


def test_stream_reasoning_false_sends_the_reasoning_at_once():
    text = "<think>\nstep one\nstep two\n</think>\n\nfinal answer"
    for cuts in ([5], range(1, len(text)), [20, 30]):
        deltas = feed_pieces(text, "qwen3", True, cuts, stream_reasoning=False)
        reasoning = [r for r, _ in deltas if r]
        assert reasoning == ["step one\nstep two"]
        assert joined(deltas) == ("step one\nstep two", "final answer")
    deltas = feed_pieces("never closed", "deepseek-r1", True, range(1, 12), stream_reasoning=False)
    assert [r for r, _ in deltas if r] == ["never closed"]  # at the end


def test_tool_calls_come_from_the_answer_only():
    call = '<tool_call>{"name": "get_weather", "arguments": {"city": "%s"}}</tool_call>'
    text = f"<think>\nmaybe {call % 'Paris'}\n</think>\n\n{call % 'Rome'}"
    reasoning, answer = separate_reasoning(text, "qwen3", True)
    assert reasoning == f"maybe {call % 'Paris'}"
    content, calls = parse_tool_calls(answer, "hermes", ["get_weather"])
    assert content is None and [json.loads(c["function"]["arguments"]) for c in calls] == [{"city": "Rome"}]


def test_reasoning_effort_template_kwargs():
    assert thinking_template_kwargs("qwen3", None, None) == {}
    assert thinking_template_kwargs("qwen3", "none", None) == {"reasoning_effort": "none", "enable_thinking": False}
    assert thinking_template_kwargs("qwen3", "high", {"x": 1})["enable_thinking"] is True
    # a kwarg the request sets itself wins
    assert thinking_template_kwargs("qwen3", "none", {"enable_thinking": True})["enable_thinking"] is True
    assert thinking_template_kwargs(None, "low", None) == {"reasoning_effort": "low"}
    assert thinking_template_kwargs("deepseek-r1", "high", None) == {"reasoning_effort": "high"}
    with pytest.raises(ValueError, match="always reasons"):
        thinking_template_kwargs("deepseek-r1", "none", None)


def test_reasoning_token_count_matches_brute_force():
    """Tokens are characters here: the count is the length of the shortest prefix that holds the
    closing tag, both by bisection over decoded prefixes and with the tag as one token."""
    def decode(ids):
        return "".join(chr(i) for i in ids)

    for text in TEXTS:
        ids = [ord(c) for c in text]
        for name, forced in CASES:
            end = reasoning_format(name).end
            has_block = bool(ids) and (forced or text.lstrip().startswith(reasoning_format(name).start))
            want = 0
            if has_block:
                want = next((k for k in range(1, len(ids) + 1) if end in text[:k]), len(ids))
            assert reasoning_token_count(ids, decode, name, forced) == want, (text, name, forced)
            # the same with the closing tag as a single token (id 0 stands for it)
            k = text.find(end)
            one = ids if k < 0 else ids[:k] + [0] + ids[k + len(end):]
            decode1 = lambda ids: "".join(end if i == 0 else chr(i) for i in ids)  # noqa: E731
            assert reasoning_token_count(one, decode1, name, forced, end_token_id=0) == (
                0 if not has_block else one.index(0) + 1 if 0 in one else len(one)), (text, name, forced)


def test_tiny_model_reasoning_templates(tmp_path):
    from transformers import AutoTokenizer

    from radixlm.tools.make_tiny_model import main

    msgs = [{"role": "user", "content": "hi"}]
    tail = {}
    for style in ("chatml", "qwen3", "deepseek-r1"):
        out = tmp_path / style
        assert main([str(out), "--arch", "qwen3", "--chat-template-style", style, "--set", "num_hidden_layers=1"]) == 0
        tok = AutoTokenizer.from_pretrained(str(out))
        for kw in ({}, {"enable_thinking": True}, {"enable_thinking": False}):
            text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, **kw)
            tail[style, tuple(kw.items())] = text.split("<|im_start|>assistant\n", 1)[1]
        assert json.loads((out / "tokenizer_config.json").read_text())["model_max_length"] > 0
    assert {v for (style, _), v in tail.items() if style == "chatml"} == {""}
    assert tail["qwen3", ()] == tail["qwen3", (("enable_thinking", True),)] == ""
    assert tail["qwen3", (("enable_thinking", False),)] == "<think>\n\n</think>\n\n"
    assert {v for (style, _), v in tail.items() if style == "deepseek-r1"} == {"<think>\n"}
    with pytest.raises(ValueError, match="chat_template_style"):
        from radixlm.tools.make_tiny_model import make_tiny_model
        make_tiny_model(tmp_path / "bad", arch="qwen3", chat_template_style="nope")


def test_server_args_flag():
    from radixlm.server_args import ServerArgs

    assert ServerArgs(model_path="m").reasoning_parser is None
    assert ServerArgs(model_path="m", reasoning_parser="deepseek-r1").reasoning_parser == "deepseek-r1"
    with pytest.raises(ValueError, match="deepseek-r1, qwen3"):
        ServerArgs(model_path="m", reasoning_parser="bogus")


# ---------------------------------------------------------------------------------- server
def rx(s: str) -> str:
    """`s` as a literal in the grammar backend's regex syntax."""
    return "".join("\\" + ch if ch in "\\.^$*+?()[]{}|/" else "\\n" if ch == "\n" else ch for ch in s)


# free parts in the thinking and the answer (several decode steps, so several stream chunks), then a
# fixed end that makes the model stop
THOUGHT = "<think>\n" + "[a-z]{2,5}( [a-z]{2,5}){1,3}" + rx("\n</think>\n\n") + "[a-z]{2,5}( [a-z]{2,5}){0,2}" + rx(".")
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                          "required": ["city"]}}}
CALL = '<tool_call>{"name": "get_weather", "arguments": {"city": "%s"}}</tool_call>'


@pytest.fixture(scope="module")
def srv(model_factory):
    path = model_factory("qwen3", chat_template_style="qwen3", num_hidden_layers=1)
    with ServerProcess(path, ["--reasoning-parser", "qwen3", "--tool-call-parser", "hermes"]) as s:
        yield s


def chat(srv, **body):
    body = {"model": "default", "messages": [{"role": "user", "content": "What is 2+2?"}], "max_tokens": 80,
            "temperature": 0, **body}
    r = requests.post(srv.base_url + "/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def chat_stream(srv, **body):
    body = {"model": "default", "messages": [{"role": "user", "content": "What is 2+2?"}], "max_tokens": 80,
            "temperature": 0, "stream": True, **body}
    deltas = []
    with requests.post(srv.base_url + "/v1/chat/completions", json=body, stream=True, timeout=120) as r:
        assert r.status_code == 200, r.text
        for line in r.iter_lines():
            if not line:
                continue
            assert line.startswith(b"data: ")
            if line == b"data: [DONE]":
                break
            ev = json.loads(line[6:])
            assert "error" not in ev, ev
            deltas += [(c["delta"], c["finish_reason"]) for c in ev["choices"]]
    return deltas


def raw_text(srv, regex, **body):
    """The model's whole output under `regex`, with the parser off for the request."""
    return chat(srv, regex=regex, separate_reasoning=False, **body)["choices"][0]["message"]["content"]


def test_chat_reasoning_content(srv):
    raw = raw_text(srv, THOUGHT)
    assert raw.startswith("<think>\n") and "\n</think>\n\n" in raw  # separate_reasoning=false: as is
    want_r, want_a = raw[len("<think>\n"):].split("\n</think>\n\n")
    msg = chat(srv, regex=THOUGHT)["choices"][0]["message"]
    assert (msg["reasoning_content"], msg["content"]) == (want_r, want_a)
    deltas = chat_stream(srv, regex=THOUGHT)
    assert deltas[0][0] == {"role": "assistant", "content": ""}
    reasoning = [d["reasoning_content"] for d, _ in deltas if d.get("reasoning_content")]
    content = [d["content"] for d, _ in deltas[1:] if d.get("content")]
    assert len(reasoning) > 1 and content  # streamed as it came
    assert "".join(reasoning) == want_r and "".join(content) == want_a
    kinds = [("content" in d) for d, _ in deltas[1:] if d.get("reasoning_content") or d.get("content")]
    assert kinds == sorted(kinds)  # reasoning first, then the answer
    for d, _ in deltas:
        assert "think>" not in json.dumps(d)
    assert deltas[-1][1] == "stop"
    # stream_reasoning=false: the reasoning in one delta
    deltas = chat_stream(srv, regex=THOUGHT, stream_reasoning=False)
    assert [d["reasoning_content"] for d, _ in deltas if d.get("reasoning_content")] == [want_r]
    # separate_reasoning=false streams the text as is
    deltas = chat_stream(srv, regex=THOUGHT, separate_reasoning=False)
    assert "".join(d.get("content") or "" for d, _ in deltas) == raw
    assert not any("reasoning_content" in d for d, _ in deltas)


def test_enable_thinking(srv):
    # thinking on (default): the output starts inside the block, no opening tag needed
    body = "[a-z]{2,5}( [a-z]{2,5}){1,3}" + rx("</think>\n\nok.")
    raw = raw_text(srv, body)
    msg = chat(srv, regex=body)["choices"][0]["message"]
    assert (msg["reasoning_content"], msg["content"]) == (raw.split("</think>")[0], "ok.")
    # enable_thinking=false: the template closed an empty block; the output is the answer as it is
    kw = {"chat_template_kwargs": {"enable_thinking": False}}
    plain = "[a-z]{2,5}( [a-z]{2,5}){1,3}" + rx(".")
    raw = raw_text(srv, plain, **kw)
    msg = chat(srv, regex=plain, **kw)["choices"][0]["message"]
    assert msg["content"] == raw and msg["reasoning_content"] is None
    r = chat(srv, regex=plain, **kw)
    assert r["usage"]["prompt_tokens"] > chat(srv, regex=plain)["usage"]["prompt_tokens"]  # the closed block


@pytest.fixture(scope="module")
def scripted(model_factory):
    """The real app and chat route in process, with the model's output scripted at the text level: the
    tokenizer manager's states receive `script[0]` in pieces of `script[1]` characters."""
    import asyncio

    from fastapi.testclient import TestClient

    from radixlm.core import FinishReason
    from radixlm.entrypoints.http_server import create_app
    from radixlm.managers.tokenizer_manager import ReqState, TokenizerManager
    from radixlm.server_args import ServerArgs

    path = model_factory("qwen3", chat_template_style="qwen3", num_hidden_layers=1)
    tm = TokenizerManager(ServerArgs(model_path=path, reasoning_parser="qwen3", tool_call_parser="hermes"))
    script = ["", 1]

    async def produce(states):
        text, size = script
        for k in range(0, len(text), size):
            await asyncio.sleep(0)
            for st in states:
                st.text += text[k:k + size]
                st.output_ids.append(3)
                st.event.set()
        for st in states:
            st.finished_reason = FinishReason("stop", matched=2)
            st.event.set()

    async def submit(msgs):
        states = [ReqState(m) for m in msgs]
        asyncio.get_running_loop().create_task(produce(states))
        return states

    tm.submit = submit
    try:
        yield TestClient(create_app(tm)), script
    finally:
        tm.shutdown()


def test_tool_calls_from_the_answer_only(scripted):
    client, script = scripted
    body = {"model": "m", "messages": [{"role": "user", "content": "weather?"}], "tools": [WEATHER]}
    script[0] = "<think>\nmaybe " + CALL % "Paris" + "\n</think>\n\n" + CALL % "Rome"
    choice = client.post("/v1/chat/completions", json=body).json()["choices"][0]
    msg = choice["message"]
    assert msg["reasoning_content"] == "maybe " + CALL % "Paris"
    assert msg["content"] is None and choice["finish_reason"] == "tool_calls"
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in msg["tool_calls"]] == \
        [("get_weather", {"city": "Rome"})]
    for size in (1, 2, 3, 7):  # tags cut everywhere across the stream's chunks
        script[1] = size
        with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
            events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
        deltas = [(c["delta"], c["finish_reason"]) for ev in events for c in ev["choices"]]
        reasoning = "".join(d.get("reasoning_content") or "" for d, _ in deltas)
        calls = [tc for d, _ in deltas for tc in d.get("tool_calls") or []]
        assert reasoning == "maybe " + CALL % "Paris"
        assert [tc["function"]["name"] for tc in calls if "id" in tc] == ["get_weather"]
        assert json.loads("".join(tc["function"]["arguments"] for tc in calls)) == {"city": "Rome"}
        assert not any(d.get("content") for d, _ in deltas[1:]) and deltas[-1][1] == "tool_calls", deltas[-3:]
        assert "think>" not in json.dumps(deltas)
    # separate_reasoning=false: the think block is left in the text; the call inside it is parsed too
    script[1] = 1
    r = client.post("/v1/chat/completions", json={**body, "separate_reasoning": False})
    msg = r.json()["choices"][0]["message"]
    assert "reasoning_content" not in msg and "<think>" in msg["content"]
    assert [json.loads(c["function"]["arguments"])["city"] for c in msg["tool_calls"]] == ["Paris", "Rome"]
    # no tools, enable_thinking=false: the answer is the text as is
    script[0] = "just an answer </think> here"
    msg = client.post("/v1/chat/completions", json={"model": "m", "messages": body["messages"],
                                                    "chat_template_kwargs": {"enable_thinking": False}}).json()
    assert msg["choices"][0]["message"]["content"] == "just an answer </think> here"
    assert msg["choices"][0]["message"]["reasoning_content"] is None


def test_reasoning_effort_and_reasoning_tokens(srv):
    plain = "[a-z]{2,5}( [a-z]{2,5}){1,3}" + rx(".")
    off = chat(srv, regex=plain, chat_template_kwargs={"enable_thinking": False})
    none = chat(srv, regex=plain, reasoning_effort="none")
    assert none["usage"]["prompt_tokens"] == off["usage"]["prompt_tokens"]  # the template closed the block
    assert none["choices"][0]["message"]["reasoning_content"] is None
    assert none["usage"]["reasoning_tokens"] == 0
    high = chat(srv, regex=plain, reasoning_effort="high")
    assert high["usage"]["prompt_tokens"] == chat(srv, regex=plain)["usage"]["prompt_tokens"]
    r = requests.post(srv.base_url + "/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "hi"}], "reasoning_effort": "extreme"}, timeout=60)
    assert r.status_code == 400 and "reasoning_effort" in r.text
    # reasoning_tokens: the output tokens up to the closing tag, the same streamed and not
    out = chat(srv, regex=THOUGHT)
    u = out["usage"]
    assert 0 < u["reasoning_tokens"] < u["completion_tokens"]
    assert chat(srv, regex=THOUGHT, separate_reasoning=False)["usage"]["reasoning_tokens"] == 0
    body = {"model": "default", "messages": [{"role": "user", "content": "What is 2+2?"}], "max_tokens": 80,
            "temperature": 0, "stream": True, "regex": THOUGHT, "stream_options": {"include_usage": True}}
    with requests.post(srv.base_url + "/v1/chat/completions", json=body, stream=True, timeout=120) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line and line != b"data: [DONE]"]
    assert events[-1]["usage"]["reasoning_tokens"] == u["reasoning_tokens"]


def test_separate_reasoning_route(srv):
    raw = raw_text(srv, THOUGHT)
    msg = chat(srv, regex=THOUGHT)["choices"][0]["message"]
    r = requests.post(srv.base_url + "/separate_reasoning", json={"text": raw}, timeout=30)
    assert r.status_code == 200, r.text
    assert r.json() == {"text": msg["content"], "reasoning_text": msg["reasoning_content"]}
    r = requests.post(srv.base_url + "/separate_reasoning", json={"text": raw, "reasoning_parser": "deepseek-r1"},
                      timeout=30)
    assert r.json()["text"] == msg["content"]
    for bad, field in (({"text": raw, "reasoning_parser": "nope"}, "reasoning_parser"), ({"text": 3}, "text")):
        r = requests.post(srv.base_url + "/separate_reasoning", json=bad, timeout=30)
        assert r.status_code == 400 and field in r.text


def test_assistant_history_with_reasoning_content(srv):
    msgs = [{"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello", "reasoning_content": "greet back"},
            {"role": "user", "content": "bye"}]
    msg = chat(srv, messages=msgs, regex=THOUGHT)["choices"][0]["message"]
    assert msg["reasoning_content"] and msg["content"]


def test_deepseek_r1_server(model_factory):
    path = model_factory("qwen3", chat_template_style="deepseek-r1", num_hidden_layers=1)
    with ServerProcess(path, ["--reasoning-parser", "deepseek-r1"]) as s:
        # the template opened the block: what comes before </think> is reasoning
        body = "[a-z]{2,5}( [a-z]{2,5}){1,3}" + rx("\n</think>\n\nok.")
        raw = raw_text(s, body, chat_template_kwargs={"enable_thinking": False})  # no effect on deepseek-r1
        msg = chat(s, regex=body)["choices"][0]["message"]
        assert (msg["reasoning_content"], msg["content"]) == (raw.split("\n</think>")[0], "ok.")
        deltas = chat_stream(s, regex=body)
        assert "".join(d.get("reasoning_content") or "" for d, _ in deltas) == msg["reasoning_content"]
        assert "".join(d.get("content") or "" for d, _ in deltas) == "ok."
        r = requests.post(s.base_url + "/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "hi"}], "reasoning_effort": "none"}, timeout=60)
        assert r.status_code == 400 and "always reasons" in r.text
