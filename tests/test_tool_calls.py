"""Tool calling in the OpenAI chat API: the tool-call parsers (hermes and llama3 formats, streaming and
not), the grammar of forced calls (sampled offline with the tiny tokenizer), and, against a real server
on the tiny qwen2 checkpoint with the `openai` client: tool_choice required / named / none / auto,
streamed tool-call deltas, a multi-turn conversation with tool results, and the 400 refusals."""

from __future__ import annotations

import dataclasses
import json
import random

import jsonschema
import openai
import pytest
import requests

from radixlm.entrypoints.openai.tool_parser import ToolCallParser, parse_tool_calls, tool_call_format
from tests.server_utils import ServerProcess

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather forecast for a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "pattern": "^[A-Z][a-z]{0,11}$"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7}},
        "required": ["city", "days"]}}}
TRIP = {"type": "function", "function": {
    "name": "book_trip", "description": "Book a trip",
    "parameters": {"type": "object", "properties": {
        "travellers": {"type": "array", "minItems": 1, "maxItems": 2, "items": {
            "type": "object", "properties": {"name": {"type": "string", "pattern": "^[A-Za-z]{1,6}$"},
                                             "age": {"type": "integer", "minimum": 0, "maximum": 120}},
            "required": ["name", "age"]}},
        "dest": {"type": "object", "properties": {"code": {"enum": ["PAR", "NYC", "TYO"]},
                                                  "nights": {"type": "integer", "minimum": 1, "maximum": 30}},
                 "required": ["code"]},
        "class": {"enum": ["economy", "business"]}},
        "required": ["travellers", "dest"]}}}
ALARM = {"type": "function", "function": {
    "name": "set_alarm", "parameters": {"type": "object", "properties": {
        "hour": {"type": "integer", "minimum": 0, "maximum": 23},
        "label": {"type": "string", "pattern": "^[a-z ]{0,8}$"},
        "loud": {"type": "boolean"}}, "required": ["hour", "loud"]}}}
# strings in the server's tools are ASCII patterns: xgrammar (0.2) lets encoded UTF-16 surrogates
# (ED A0..BF xx) into strings, which decode to three U+FFFD each and could break a maxLength
NOTE = {"type": "function", "function": {
    "name": "take_note", "parameters": {"type": "object", "properties": {
        "text": {"type": "string", "maxLength": 10},
        "score": {"type": "number", "minimum": -1, "maximum": 1}}, "required": ["text"]}}}
TOOLS = [WEATHER, TRIP, ALARM]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS + [NOTE]}
NAMES = [t["function"]["name"] for t in TOOLS]


def check_call(name: str, arguments: str) -> dict:
    assert name in SCHEMAS, name
    args = json.loads(arguments)
    jsonschema.validate(args, SCHEMAS[name])
    return args


# ---------------------------------------------------------------------------------- parser (no server)
def stream_parse(text: str, fmt: str, names, parallel: bool = True, seed: int = 0, max_piece: int = 4):
    """Feeds `text` in random pieces; returns (content, [(name, arguments)], events)."""
    rng = random.Random(seed)
    p = ToolCallParser(fmt, names, parallel)
    events, i = [], 0
    while i < len(text):
        n = rng.randint(1, max_piece)
        events += p.feed(text[i:i + n])
        i += n
    events += p.finish()
    calls = {}
    for ev in events:
        if ev[0] == "call":
            assert ev[1] not in calls and ev[2].startswith("call_")
            calls[ev[1]] = [ev[3], ""]
        elif ev[0] == "args":
            assert ev[1] in calls  # arguments only after the call's header
            calls[ev[1]][1] += ev[2]
    content = "".join(ev[1] for ev in events if ev[0] == "text")
    return content, [tuple(calls[k]) for k in sorted(calls)], events


def non_stream(text: str, fmt: str, names, parallel: bool = True):
    content, calls = parse_tool_calls(text, fmt, names, parallel)
    assert all(c["type"] == "function" and c["id"].startswith("call_") for c in calls)
    return content, [(c["function"]["name"], c["function"]["arguments"]) for c in calls]


def assert_stream_matches(text: str, fmt: str, names, parallel: bool = True):
    content, calls = non_stream(text, fmt, names, parallel)
    for seed in range(25):
        s_content, s_calls, _ = stream_parse(text, fmt, names, parallel, seed, max_piece=1 + seed % 6)
        assert s_calls == calls, (seed, s_calls)
        assert s_content == (content or ""), (seed, s_content)
    return content, calls


HERMES_TEXT = ('Let me check that for you.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Pa}ris\\"",'
               ' "days": 2}}\n</tool_call>\n<tool_call>\n{"arguments": {"hour": 7, "loud": true}, "name": "set_alarm"}'
               '\n</tool_call>')


def test_hermes_text_before_and_multiple_calls():
    content, calls = assert_stream_matches(HERMES_TEXT, "hermes", NAMES)
    assert content == "Let me check that for you."
    assert calls == [("get_weather", '{"city": "Pa}ris\\"", "days": 2}'), ("set_alarm", '{"hour": 7, "loud": true}')]
    assert json.loads(calls[0][1]) == {"city": 'Pa}ris"', "days": 2}
    # parallel_tool_calls=false keeps the first call only
    assert non_stream(HERMES_TEXT, "hermes", NAMES, parallel=False) == (content, calls[:1])
    assert assert_stream_matches(HERMES_TEXT, "hermes", NAMES, parallel=False)[1] == calls[:1]


def test_hermes_streaming_events_are_incremental():
    _, _, events = stream_parse(HERMES_TEXT, "hermes", NAMES, seed=3, max_piece=2)
    kinds = [ev[0] for ev in events if ev[0] != "end"]
    first_call = kinds.index("call")
    assert set(kinds[:first_call]) == {"text"}
    assert kinds.count("call") == 2 and kinds.count("args") > 4  # arguments arrive in fragments


def test_hermes_edge_cases():
    # no call: the text comes back unchanged (also a dangling partial tag and trailing whitespace)
    for text in ["plain answer", "a <tool_ b  ", "  <tool_call", "x < y and </tool_call> z\n"]:
        assert assert_stream_matches(text, "hermes", NAMES) == (text, [])
    # a call without content, arguments given as a JSON string, the closing tag missing
    text = '<tool_call>\n{"name": "set_alarm", "arguments": "{\\"hour\\": 5, \\"loud\\": false}"}'
    assert assert_stream_matches(text, "hermes", NAMES) == (None, [("set_alarm", '{"hour": 5, "loud": false}')])
    # no arguments key: "{}"
    assert non_stream('<tool_call>{"name": "set_alarm"}</tool_call>', "hermes", NAMES) == (None, [("set_alarm", "{}")])
    # an unknown function or a block that is no JSON call is content
    for text in ['<tool_call>\n{"name": "rm_rf", "arguments": {}}\n</tool_call>',
                 "<tool_call>not json</tool_call>", 'ok <tool_call>{"arguments": {}}</tool_call>']:
        assert assert_stream_matches(text, "hermes", NAMES) == (text, [])
    # a call cut off (max_tokens): content when not streaming
    cut = 'Hi <tool_call>\n{"name": "get_weather", "arguments": {"city": "Ro'
    assert non_stream(cut, "hermes", NAMES) == (cut, [])
    # text between and after calls is content
    text = 'A<tool_call>{"name": "set_alarm", "arguments": {"hour": 1, "loud": true}}</tool_call>\nB and C'
    assert assert_stream_matches(text, "hermes", NAMES)[0] == "A\nB and C"


def test_llama3_format():
    text = ('{"name": "get_weather", "parameters": {"city": "Rome", "days": 3}}; '
            '{"name": "set_alarm", "parameters": {"hour": 6, "loud": false}}')
    assert assert_stream_matches(text, "llama3", NAMES) == (
        None, [("get_weather", '{"city": "Rome", "days": 3}'), ("set_alarm", '{"hour": 6, "loud": false}')])
    text = 'Sure thing. <|python_tag|>{"name": "set_alarm", "arguments": {"hour": 6, "loud": true}}'
    assert assert_stream_matches(text, "llama3", NAMES) == ("Sure thing.", [("set_alarm", '{"hour": 6, "loud": true}')])
    # JSON that is no call, or braces in normal text, stay content
    for text in ['{"answer": 42} is the answer', 'Use {"name": "set_alarm"} later',
                 '  {"name": "nope", "parameters": {}}']:
        assert assert_stream_matches(text, "llama3", NAMES) == (text, [])


def test_parser_choice_from_chat_template():
    from radixlm.tools.make_tiny_model import CHAT_TEMPLATE

    assert tool_call_format(None, CHAT_TEMPLATE) == "hermes"
    assert tool_call_format(None, "{{ '<|python_tag|>' }}") == "llama3"
    assert tool_call_format(None, None) == "llama3"
    assert tool_call_format("qwen25", None) == tool_call_format("hermes", None) == "hermes"
    assert tool_call_format("llama3", CHAT_TEMPLATE) == "llama3"


def test_tool_call_parser_flag():
    from radixlm.launch_server import parse_args
    from radixlm.server_args import ServerArgs

    assert parse_args(["--model-path", "m", "--tool-call-parser", "qwen25"]).tool_call_parser == "qwen25"
    assert parse_args(["--model-path", "m"]).tool_call_parser is None
    with pytest.raises(ValueError, match="tool_call_parser"):
        ServerArgs(model_path="m", tool_call_parser="mistral")



LLAMA3_TEXT = ('Sure. <|python_tag|>{"name": "get_weather", "parameters": {"city": "Ro;me", "days": 3}} ; '
               '{"name": "set_alarm", "arguments": "{\\"hour\\": 6, \\"loud\\": false}"}  ')
SPLIT_CASES = [(HERMES_TEXT, "hermes"), (LLAMA3_TEXT, "llama3"),
               ('  {"name": "set_alarm", "parameters": {"hour": 1, "loud": true}}; tail', "llama3"),
               ('Héllo ☃ <tool_call>{"name": "book_trip", "arguments": null}</tool_call> \n<tool_', "hermes"),
               ('<tool_call>{"name": "rm", "arguments": {}}</tool_call>\n<tool_call>{"name": "set_alarm"}', "hermes")]


@pytest.mark.parametrize("text,fmt", SPLIT_CASES)
def test_stream_split_anywhere_equals_whole_text(text, fmt):
    """Cut at every character boundary (one cut, and one character per piece), the stream gives the
    same content and calls as the whole text at once, and each event is well formed."""
    for parallel in (True, False):
        content, calls = non_stream(text, fmt, NAMES, parallel)
        splits = [[text[:k], text[k:]] for k in range(len(text) + 1)] + [list(text)]
        for pieces in splits:
            p = ToolCallParser(fmt, NAMES, parallel)
            events = [ev for piece in pieces for ev in p.feed(piece)] + p.finish()
            assert all(ev[-1] for ev in events if ev[0] in ("text", "args")), events  # never empty
            got = {ev[1]: [ev[3], ""] for ev in events if ev[0] == "call"}
            for ev in events:
                if ev[0] == "args":
                    got[ev[1]][1] += ev[2]
            assert [tuple(got[k]) for k in sorted(got)] == calls, pieces
            assert "".join(ev[1] for ev in events if ev[0] == "text") == (content or ""), pieces


@pytest.mark.parametrize("fmt", ["hermes", "llama3"])
def test_forced_call_text_reads_back(fmt):
    """What the forced-call grammar writes around the arguments (the format's prefix, keys, suffix and
    separator) is what the parser reads, one call or several."""
    from radixlm.entrypoints.openai.tool_formats import get_format

    form = get_format(fmt)
    calls = [("get_weather", '{"city": "Paris", "days": 2}'), ("set_alarm", '{"hour": 7, "loud": true}')]
    texts = [form.forced_call(name)[0] + args + form.forced_call(name)[1] for name, args in calls]
    assert assert_stream_matches(texts[0], fmt, NAMES) == (None, calls[:1])
    assert assert_stream_matches(form.separator.join(texts), fmt, NAMES) == (None, calls)


def test_stream_deltas_merge_fragments():
    from radixlm.entrypoints.openai.tool_parser import tool_call_deltas

    events = [("text", "a"), ("text", "b"), ("call", 0, "call_x", "f"), ("args", 0, '{"a"'), ("args", 0, ": 1}"),
              ("end", 0, True, "raw"), ("call", 1, "call_y", "g"), ("args", 1, "{}")]
    assert tool_call_deltas(events) == [
        {"content": "ab"},
        {"tool_calls": [{"index": 0, "id": "call_x", "type": "function", "function": {"name": "f", "arguments": ""}}]},
        {"tool_calls": [{"index": 0, "function": {"arguments": '{"a": 1}'}}]},
        {"tool_calls": [{"index": 1, "id": "call_y", "type": "function", "function": {"name": "g", "arguments": ""}}]},
        {"tool_calls": [{"index": 1, "function": {"arguments": "{}"}}]}]


def test_tool_call_parser_registry():
    from radixlm.entrypoints.openai.tool_parser import TOOL_CALL_PARSERS
    from radixlm.server_args import ServerArgs, choices_of

    field = next(f for f in dataclasses.fields(ServerArgs) if f.name == "tool_call_parser")
    assert choices_of(field) == tuple(TOOL_CALL_PARSERS) == ("hermes", "qwen25", "qwen", "llama3")
    assert {f.name for f in TOOL_CALL_PARSERS.values()} == {"hermes", "llama3"}
    with pytest.raises(ValueError, match="valid: hermes, qwen25, qwen, llama3"):
        tool_call_format("mistral")
    with pytest.raises(ValueError, match="unknown tool-call format"):
        ToolCallParser("qwen25", NAMES)

@pytest.mark.parametrize("fmt", ["hermes", "llama3"])
def test_forced_grammar_outputs_always_parse(model_factory, fmt):
    """Random walks through the forced-call grammar (as the sampler would take them, token by token
    over the tiny tokenizer) always parse into calls whose arguments validate."""
    import torch
    import xgrammar as xgr
    from transformers import AutoTokenizer

    from radixlm.entrypoints.openai.tools import forced_call_ebnf

    tok = AutoTokenizer.from_pretrained(model_factory("qwen2"))
    info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=515, stop_token_ids=[tok.eos_token_id])
    compiler = xgr.GrammarCompiler(info, max_threads=1)
    names = NAMES + ["take_note"]
    fns = json.dumps([[n, SCHEMAS[n]] for n in names], sort_keys=True)
    # walk over tokens that decode to ASCII where the grammar allows one (see NOTE on surrogates)
    ascii_ids = {t for t in range(len(tok)) if tok.decode([t]).isascii()}
    rng = random.Random(0)
    seen = set()
    for parallel in (False, True):
        for any_ws in (True, False):
            compiled = compiler.compile_grammar(forced_call_ebnf(fmt, fns, parallel, any_ws, 4 if any_ws else None))
            for _ in range(4):
                m = xgr.GrammarMatcher(compiled)
                bitmask = xgr.allocate_token_bitmask(1, 515)
                ids = []
                while not m.is_terminated() and len(ids) < 3000:
                    m.fill_next_token_bitmask(bitmask)
                    logits = torch.zeros(1, 515)
                    xgr.apply_token_bitmask_inplace(logits, bitmask)
                    allowed = torch.nonzero(logits[0] == 0).flatten().tolist()
                    t = rng.choice([t for t in allowed if t in ascii_ids] or allowed)
                    assert m.accept_token(t)
                    if t != tok.eos_token_id:
                        ids.append(t)
                assert m.is_terminated()
                text = tok.decode(ids)
                content, calls = non_stream(text, fmt, names, parallel)
                assert content is None and calls, text
                assert parallel or len(calls) == 1
                for name, args in calls:
                    check_call(name, args)
                    seen.add(name)
                assert stream_parse(text, fmt, names, parallel)[1] == calls
    assert seen == set(names)


# ---------------------------------------------------------------------------------- server
@pytest.fixture(scope="module")
def srv(model_factory):
    # one whitespace character per JSON whitespace run (default 4): the random model pads less and the
    # structure after it is jump-forwarded, which keeps the sampled calls short
    with ServerProcess(model_factory("qwen2"), ["--constrained-json-max-whitespace", "1"]) as s:
        yield s


@pytest.fixture(scope="module")
def client(srv):
    return openai.OpenAI(base_url=srv.base_url + "/v1", api_key="x", max_retries=0, timeout=120)


PROMPTS = ["What's the weather in Paris for two days?", "Book me a trip to Tokyo", "Wake me up at seven"]


def test_required_always_gives_valid_calls(client):
    for k, prompt in enumerate(PROMPTS):
        r = client.chat.completions.create(model="m", messages=[{"role": "user", "content": prompt}], tools=TOOLS,
                                           tool_choice="required", parallel_tool_calls=False, temperature=1,
                                           seed=100 + k, n=2, max_tokens=600)
        for ch in r.choices:
            assert ch.finish_reason == "tool_calls", ch
            assert ch.message.content is None and len(ch.message.tool_calls) == 1
            tc = ch.message.tool_calls[0]
            assert tc.type == "function" and tc.id.startswith("call_")
            check_call(tc.function.name, tc.function.arguments)


def test_named_tool_choice_calls_that_function(client):
    r = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Anything"}], tools=TOOLS,
                                       tool_choice={"type": "function", "function": {"name": "book_trip"}},
                                       temperature=1, seed=7, n=3, max_tokens=600)
    for ch in r.choices:
        assert ch.finish_reason == "tool_calls"
        assert [tc.function.name for tc in ch.message.tool_calls] == ["book_trip"]
        args = check_call("book_trip", ch.message.tool_calls[0].function.arguments)
        assert args["dest"]["code"] in ("PAR", "NYC", "TYO")


def test_stream_equals_non_stream_greedy(client):
    kw = dict(model="m", messages=[{"role": "user", "content": "Weather in Oslo?"}], tools=TOOLS,
              tool_choice="required", parallel_tool_calls=False, temperature=0, max_tokens=600)
    full = client.chat.completions.create(**kw).choices[0]
    assert full.finish_reason == "tool_calls" and len(full.message.tool_calls) == 1
    call = full.message.tool_calls[0]
    check_call(call.function.name, call.function.arguments)
    chunks = list(client.chat.completions.create(stream=True, **kw))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    tool_deltas = [tc for d in deltas for tc in d.tool_calls or []]
    head, rest = tool_deltas[0], tool_deltas[1:]
    assert head.index == 0 and head.id.startswith("call_") and head.type == "function"
    assert head.function.name == call.function.name and not head.function.arguments
    assert rest and all(tc.index == 0 and tc.id is None and tc.function.name is None for tc in rest)
    assert "".join(tc.function.arguments for tc in rest) == call.function.arguments
    assert "".join(d.content or "" for d in deltas) == ""
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "tool_calls" and not any(finishes[:-1])
    assert len({c.id for c in chunks}) == 1


def test_none_and_auto_give_plain_content(client):
    msgs = [{"role": "user", "content": "Say something"}]
    kw = dict(model="m", messages=msgs, tools=TOOLS, max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    none = client.chat.completions.create(tool_choice="none", **kw).choices[0]
    assert none.message.content and not none.message.tool_calls and none.finish_reason == "length"
    auto = client.chat.completions.create(**kw).choices[0]  # auto: a random model writes no <tool_call>
    assert auto.message.content == none.message.content and not auto.message.tool_calls
    assert auto.finish_reason == "length"
    chunks = list(client.chat.completions.create(stream=True, **kw))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == auto.message.content
    # with auto, a response_format wins: the output is JSON content
    r = client.chat.completions.create(model="m", messages=msgs, tools=TOOLS, max_tokens=60,
                                       response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {
                                           "type": "object", "properties": {"ok": {"type": "boolean"}},
                                           "required": ["ok"], "additionalProperties": False}}})
    assert isinstance(json.loads(r.choices[0].message.content)["ok"], bool) and not r.choices[0].message.tool_calls


def test_multi_turn_with_tool_results(srv, client, model_factory):
    from transformers import AutoTokenizer

    msgs = [{"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [{
                "id": "call_1", "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 1}'}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'}]
    r = client.chat.completions.create(model="m", messages=msgs, tools=TOOLS, max_tokens=8, temperature=0)
    ch = r.choices[0]
    assert ch.message.role == "assistant" and ch.finish_reason in ("stop", "length", "tool_calls")
    # the call reaches the template with its arguments as an object (rendered once, not double-encoded)
    tok = AutoTokenizer.from_pretrained(model_factory("qwen2"))
    expected = json.loads(json.dumps(msgs))
    expected[1]["tool_calls"][0]["function"]["arguments"] = {"city": "Paris", "days": 1}
    text = tok.apply_chat_template(expected, tools=TOOLS, tokenize=False, add_generation_prompt=True)
    assert '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris", "days": 1}}</tool_call>' in text
    assert r.usage.prompt_tokens == len(tok.encode(text, add_special_tokens=False))
    # and the conversation goes on with a forced call
    r = client.chat.completions.create(model="m", messages=msgs, tools=TOOLS, max_tokens=400, temperature=0,
                                       tool_choice={"type": "function", "function": {"name": "set_alarm"}})
    check_call("set_alarm", r.choices[0].message.tool_calls[0].function.arguments)


BAD = [
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools.0.function.name"),
    ({"tools": [WEATHER, {"type": "function", "function": {"name": "bad name!"}}]}, "tools.1.function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]},
     "tools.0.function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": ["x"]}}]},
     "tools.0.function.parameters"),
    ({"tools": [{"type": "function"}]}, "tools.0.function"),
    ({"tools": [{"type": "retrieval", "function": {"name": "f"}}]}, "tools.0.type"),
    ({"tools": [WEATHER, WEATHER]}, "tools.1.function.name"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tool_choice": {"type": "function", "function": {"name": "get_weather"}}}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "set_alarm"}},
      "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}},
     "response_format"),
    ({"tools": TOOLS, "tool_choice": "required", "regex": "a+"}, "response_format"),
    ({"functions": [{"name": "f"}]}, "functions"),
    ({"tools": [WEATHER, {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"$ref": "#/$defs/missing"}}}}}], "tool_choice": "required"},
     "tools.1.function.parameters"),
]


def test_bad_tool_requests_answer_400(srv, client):
    for body, param in BAD:
        r = requests.post(f"{srv.base_url}/v1/chat/completions", timeout=30,
                          json={"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2, **body})
        assert r.status_code == 400, (body, r.text)
        err = r.json()
        assert err["object"] == "error" and err["type"] == "BadRequestError" and err["code"] == 400
        assert err["message"] and err["param"] == param, (body, err)
    with pytest.raises(openai.BadRequestError, match="not among the tools"):
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}], tools=[WEATHER],
                                       tool_choice={"type": "function", "function": {"name": "set_alarm"}})
    assert client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}],
                                          max_tokens=2).choices[0].message.role == "assistant"
