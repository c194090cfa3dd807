"""The frontend language (radixlm.lang): every example in examples/ runs against both the in-process
EngineBackend and a RuntimeEndpoint on a live `python -m radixlm.launch_server` (tiny random-weight
qwen2 with a ChatML template). Checked: role rendering equals the model's chat template, prefix
reuse (cached_tokens) for fork branches and run_batch, select scores equal log-probabilities
computed directly with /generate, regex/JSON outputs validate, streaming, per-program errors,
connection errors, the tracer's graph, the exact select traffic, the OpenAI and Runtime backends.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import re
import subprocess
import sys
from typing import Any, Dict, List

import jsonschema  # declared test dependencies (pyproject [test]): a broken install fails loudly
import openai  # noqa: F401
import pytest
import requests

import radixlm
import radixlm as rl
from tests.server_utils import ServerProcess, free_port

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def example(name: str):
    if EXAMPLES not in sys.path:
        sys.path.insert(0, EXAMPLES)
    return importlib.import_module(name)


def common_len(a: List[int], b: List[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


# ------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def server(qwen2_server):
    return qwen2_server


@pytest.fixture(scope="module")
def engine(qwen2_path):
    with radixlm.Engine(model_path=qwen2_path, log_level="warning") as e:
        yield e


@pytest.fixture(scope="module")
def tok(engine):
    return engine.tokenizer


@pytest.fixture(scope="module")
def backends(engine, server):
    return {"engine": rl.EngineBackend(engine), "http": rl.RuntimeEndpoint(server.base_url)}


@pytest.fixture(params=["engine", "http"])
def backend(request, backends):
    return backends[request.param]


def generate_direct(server: ServerProcess, body: Dict[str, Any]) -> Any:
    r = requests.post(server.base_url + "/generate", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def direct_choice_scores(server, tok, prefix: str, choices: List[str]) -> List[float]:
    """Mean log-probability of each choice's tokens after `prefix`, one plain /generate per choice."""
    p_ids = tok.encode(prefix)
    out = []
    for c in choices:
        ids = tok.encode(prefix + c)
        first = common_len(p_ids, ids)
        meta = generate_direct(server, {"input_ids": ids, "sampling_params": {"max_new_tokens": 0},
                                        "return_logprob": True, "logprob_start_len": 0})["meta_info"]
        lps = [e[0] for e in meta["input_token_logprobs"][first:] if e[0] is not None]
        out.append(sum(lps) / len(lps))
    return out


# ------------------------------------------------------------------------------------ examples
def test_chat_example_renders_the_chat_template(backend, tok):
    chat = example("chat_multi_turn")
    state = chat.main(backend)
    assert state.error() is None
    msgs = state.messages()
    assert [m["role"] for m in msgs] == ["system"] + ["user", "assistant"] * len(chat.QUESTIONS)
    assert state.text() == tok.apply_chat_template(msgs, tokenize=False)
    for i in range(len(chat.QUESTIONS)):
        assert msgs[2 + 2 * i]["content"] == state[f"answer_{i}"]
        meta = state.get_meta_info(f"answer_{i}")
        assert meta["completion_tokens"] <= 24 and meta["prompt_tokens"] > 0


def test_streaming_text_iter_equals_final_text(backend):
    chat = example("chat_multi_turn")
    state = chat.multi_turn_chat.run(questions=chat.QUESTIONS[:2], max_tokens=12, temperature=0, stream=True,
                                     backend=backend)
    chunks = list(state.text_iter())
    assert "".join(chunks) == state.text()
    assert len(chunks) > 1  # text arrives piece by piece, not in one block
    state = chat.multi_turn_chat.run(questions=chat.QUESTIONS[:1], max_tokens=12, temperature=0, stream=True,
                                     backend=backend)
    assert "".join(state.text_iter("answer_0")) == state["answer_0"]

    async def collect(st):
        return [c async for c in st.text_async_iter()]

    state = chat.multi_turn_chat.run(questions=chat.QUESTIONS[:1], max_tokens=6, stream=True, backend=backend)
    assert "".join(asyncio.run(collect(state))) == state.text()


@rl.function
def state_features(s, nested=False):
    s += rl.user_begin()
    s += "Start."
    s += rl.user_end()
    with s.assistant():
        with s.var_scope("part"):
            s += "Hello " + rl.gen("g", max_tokens=3, temperature=0)
        with s.copy() as c:
            c += " extra" + rl.gen("h", max_tokens=2)
        s["manual"] = 5
    if nested:
        s += rl.user_begin() + rl.assistant_begin()


def test_state_features(backends, tok):
    st = state_features.run(backend=backends["engine"])
    assert st.error() is None
    assert st["part"] == "Hello " + st["g"] and st["manual"] == 5 and "manual" in st and "nope" not in st
    assert len(st["h"]) == 1 and isinstance(st["h"][0], str)
    assert st.messages() == [{"role": "user", "content": "Start."},
                             {"role": "assistant", "content": st["part"]}]
    assert st.text() == tok.apply_chat_template(st.messages(), tokenize=False)
    st = state_features.run(nested=True, backend=backends["engine"])
    assert isinstance(st.error(), ValueError) and "nest" in str(st.error())


def test_tree_of_thought_forks_reuse_the_prefix(backend, tok):
    tot = example("tree_of_thought")
    state = tot.main(backend)
    assert len(state["thought"]) == 3 and all(v in ("yes", "no") for v in state["verdict"])
    text = state.text()
    marker = "Let me think about this in several ways.\n"
    fork_prefix = text[:text.index(marker) + len(marker)]
    n_prefix = len(tok.encode(fork_prefix))
    metas = state.get_meta_info("thought")
    assert len(metas) == 3
    for m in metas:  # every branch starts from the committed fork prefix
        assert m["cached_tokens"] >= n_prefix - 1, (m, n_prefix)
    for m in state.get_meta_info("verdict"):
        assert all(c >= n_prefix for c in m["cached_tokens"])
    for i, (t, v) in enumerate(zip(state["thought"], state["verdict"])):
        assert f"{i + 1}. {t} (sound: {v})\n" in text
    assert state.get_meta_info("answer")["cached_tokens"] >= n_prefix - 1


def test_json_extraction_outputs_validate(backend):
    ex = example("json_extraction")
    states, results = ex.main(backend)
    assert len(results) == len(ex.DOCUMENTS)
    for st, rec in zip(states, results):
        assert re.fullmatch(ex.NAME_REGEX, st["name"]), st["name"]
        assert re.fullmatch(ex.PHONE_REGEX, st["phone"]), st["phone"]
        assert re.fullmatch(r"[-+]?[0-9]+", st["age"]), st["age"]
        jsonschema.validate(rec["record"], ex.SCHEMA)
        assert f"Record: {st['record']}" in st.text()


def test_classifier_select_scores_match_direct_logprobs(backend, server, tok):
    ex = example("classifier")
    states = ex.main(backend)
    for st in states:
        label = st["label"]
        assert label in ex.LABELS
        meta = st.get_meta_info("label")
        text = st.text()
        prefix = text[:text.index("Sentiment: ") + len("Sentiment: ")]
        want = direct_choice_scores(server, tok, prefix, ex.LABELS)
        got = meta["normalized_prompt_logprobs"]
        assert max(abs(a - b) for a, b in zip(got, want)) < 1e-4, (got, want)
        assert label == ex.LABELS[max(range(len(want)), key=want.__getitem__)]
        assert meta["scores"] == got
        assert min(meta["cached_tokens"]) >= meta["prompt_tokens"] - 3  # the scoring batch reused the prefix


def test_select_without_a_local_tokenizer(server, tok):
    """A remote server (no tokenizer here): choice tokens are found from the per-token texts."""
    ep = rl.RuntimeEndpoint(server.base_url, chat_template_name="chatml")
    assert ep.tokenizer is None
    ex = example("classifier")
    for st in ex.main(ep):
        text = st.text()
        prefix = text[:text.index("Sentiment: ") + len("Sentiment: ")]
        want = direct_choice_scores(server, tok, prefix, ex.LABELS)
        got = st.get_meta_info("label")["normalized_prompt_logprobs"]
        assert max(abs(a - b) for a, b in zip(got, want)) < 1e-4, (got, want)


@pytest.mark.parametrize("method", ["greedy_token_selection", "unconditional_likelihood_normalized"])
def test_other_choice_methods(backend, method):
    ex = example("classifier")
    states = ex.main(backend, choices_method=getattr(rl, method))
    for st in states:
        meta = st.get_meta_info("label")
        assert st["label"] in ex.LABELS and meta["choices_method"] == method
        assert len(meta["scores"]) == len(ex.LABELS)
        if method == "unconditional_likelihood_normalized":
            unc = meta["unconditional_token_logprobs"]
            assert [len(u) for u in unc] == [len(x) for x in meta["input_token_logprobs"]]
            assert all(u is not None for row in unc for u in row)


def test_batch_of_32_with_prefix_hint_and_progress_bar(backend, tok, capsys):
    ex = example("batch_run")
    hints: List[str] = []
    original = backend.cache_prefix
    backend.cache_prefix = lambda p: (hints.append(p), original(p))[1]
    try:
        states = ex.main(backend, n=32)
    finally:
        del backend.cache_prefix
    assert "32/32" in capsys.readouterr().err  # tqdm's progress bar
    assert len(states) == 32 and all(st.error() is None for st in states)
    assert len(hints) == 1 and len(hints[0]) > 64
    texts = [st.text() for st in states]
    assert all(t.startswith(hints[0]) for t in texts)
    shared = len(tok.encode(hints[0]))
    cached = [st.get_meta_info("answer")["cached_tokens"] for st in states]
    assert all(c >= shared - 1 for c in cached), (shared, cached)


# ------------------------------------------------------------------------------------ errors
@rl.function
def maybe_fails(s, i):
    s += rl.user(f"Question number {i}: say something.")
    s += rl.assistant(rl.gen("answer", max_tokens=4))
    if i == 3:
        raise ValueError("program 3 fails on purpose")
    s += "done"


def test_run_batch_keeps_per_program_errors(backend):
    states = maybe_fails.run_batch([{"i": i} for i in range(6)], temperature=0, backend=backend, num_threads=3)
    bad = states[3]
    assert isinstance(bad.error(), ValueError) and "on purpose" in str(bad.error())
    assert "raise ValueError" in bad.traceback() and "maybe_fails" in bad.traceback()
    assert isinstance(bad["answer"], str)  # what ran before the failure is kept
    for i, st in enumerate(states):
        if i != 3:
            assert st.error() is None and st.text().endswith("done")
    # a request the runtime rejects: the error is kept, reading the variable says why
    st = maybe_fails.run(i=0, top_p=5.0, backend=backend)
    assert isinstance(st.error(), rl.lang.BackendError) and "top_p" in str(st.error())
    with pytest.raises(rl.ProgramError):
        st["answer"]


def test_connection_errors(server):
    dead = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ConnectionError, match="cannot reach"):
        rl.RuntimeEndpoint(dead)
    ep = rl.RuntimeEndpoint(server.base_url)
    ep.base_url = dead  # the server "went away"
    st = maybe_fails.run(i=0, backend=ep)
    assert isinstance(st.error(), ConnectionError) and dead in str(st.error())


# ------------------------------------------------------------------------------------ tracer
def test_trace_graph():
    tot = example("tree_of_thought")
    g = tot.tree_of_thought.trace()  # question omitted: an argument placeholder
    kinds = [n.kind for n in g.nodes]
    for k in ("role_begin", "text", "arg", "fork", "gen", "select", "join", "var_ref", "role_end"):
        assert k in kinds, k
    fork = next(n for n in g.nodes if n.kind == "fork")
    assert len(fork.branches) == 3
    thoughts = [n for n in g.gens() if n.name == "thought"]
    assert sorted(n.branch for n in thoughts) == sorted(fork.branches)
    assert all(n.arguments == ["question"] and n.inputs == [] for n in thoughts)
    verdicts = [n for n in g.gens() if n.name == "verdict"]
    assert all(n.inputs == ["thought"] and n.params["choices"] == ["yes", "no"] for n in verdicts)
    join = next(n for n in g.nodes if n.kind == "join")
    assert join.params["variables"] == ["thought", "verdict"]
    answer = next(n for n in g.gens() if n.name == "answer")
    assert g.inputs_of("answer") == ["$question", "thought", "verdict"]
    edges = g.edges
    assert (join.id, answer.id, "thought") in edges and (join.id, answer.id, "verdict") in edges
    for t, v in zip(thoughts, verdicts):  # each branch's verdict reads its own branch's thought
        assert (t.id, v.id, "thought") in edges
    assert sum(1 for e in edges if e[1] == join.id) == 6
    listing = str(g)
    for word in ("fork", "join", "gen", "select", "dataflow", "$question"):
        assert word in listing
    # with the argument given, it is constant text, part of the prefix
    g2 = tot.tree_of_thought.trace(question="Why is the sky blue?")
    assert g2.error is None and "arg" not in [n.kind for n in g2.nodes]
    prefix = g2.constant_prefix()
    assert prefix.startswith("<|im_start|>system\n") and "Why is the sky blue?" in prefix
    assert prefix.endswith("Let me think about this in several ways.\n")


def test_http_traffic(backends):
    """gen sends SGLang's frontend body; select sends the prefix once (max_new_tokens 0), then ONE
    batch scoring all choices."""
    ep = backends["http"]
    bodies: List[Dict[str, Any]] = []
    original = ep._generate
    ep._generate = lambda body: (bodies.append(json.loads(json.dumps(body))), original(body))[1]
    try:
        st = maybe_fails.run(i=0, temperature=0, top_k=5, backend=ep)
        assert st.error() is None
        assert bodies == [{"text": st.text()[:-len(st["answer"] + "<|im_end|>\ndone")], "sampling_params": {
            "skip_special_tokens": True, "spaces_between_special_tokens": True, "max_new_tokens": 4,
            "stop": ["<|im_end|>"], "stop_token_ids": [], "temperature": 0, "top_p": 1.0, "top_k": 5, "min_p": 0.0,
            "frequency_penalty": 0.0, "presence_penalty": 0.0, "ignore_eos": False, "regex": None}}]
        bodies.clear()
        st = example("classifier").classify.run(review="Fine.", backend=ep)
    finally:
        del ep._generate
    assert st.error() is None
    prefix = st.text()[:st.text().index("Sentiment: ") + len("Sentiment: ")]
    assert bodies[0] == {"text": prefix, "sampling_params": {"max_new_tokens": 0}}
    b = bodies[1]
    assert b["text"] == [prefix + c for c in ("positive", "negative", "neutral")]
    assert b["sampling_params"] == {"max_new_tokens": 0, "temperature": 0}
    assert b["return_logprob"] is True and b["return_text_in_logprobs"] is True
    assert 0 <= b["logprob_start_len"] <= st.get_meta_info("label")["prompt_tokens"] - 2
    assert len(bodies) == 2


# ------------------------------------------------------------------------------------ other backends
def test_openai_backend_on_the_v1_api(server):
    info = requests.get(server.base_url + "/get_model_info", timeout=10).json()
    oa = rl.OpenAI(info["served_model_name"], base_url=server.base_url + "/v1", api_key="none")
    chat = example("chat_multi_turn")
    st = chat.multi_turn_chat.run(questions=chat.QUESTIONS[:2], max_tokens=8, temperature=0, backend=oa)
    assert st.error() is None and [m["role"] for m in st.messages()][-1] == "assistant"
    labels = example("classifier").LABELS

    @rl.function
    def classify_chat(s, review):  # on a chat API a select must start the assistant turn
        s += rl.user("Sentiment of this review? " + review)
        s += rl.assistant(rl.select("label", choices=labels))

    st = classify_chat.run(review="Great!", backend=oa)
    assert st.error() is None and st["label"] in labels
    assert st.get_meta_info("label")["method"] == "regex" and oa.regex_supported is True
    # a gen outside an assistant turn is a clear error on a chat API
    bad = rl.function(lambda s: s.__iadd__("Hi " + rl.gen("x", max_tokens=2)))
    assert "assistant turn" in str(bad.run(backend=oa).error())


def test_runtime_starts_and_stops_a_server(qwen2_path):
    rt = rl.Runtime(model_path=qwen2_path, log_level="warning", api_key="sekret")
    try:
        assert rt.endpoint.base_url == rt.url
        st = maybe_fails.run(i=1, temperature=0, backend=rt)  # a Runtime is usable as a backend
        assert st.error() is None and st.text().endswith("done")
        assert "max_total_num_tokens" in rl.get_server_info(rt)
        assert "flush" in rl.flush_cache(rt).lower()
        with pytest.raises(rl.lang.BackendError, match="401"):  # the key is required
            rl.RuntimeEndpoint(rt.url)
    finally:
        rt.shutdown()
    st = maybe_fails.run(i=1, backend=rt)  # the server is gone
    assert isinstance(st.error(), ConnectionError)


# ------------------------------------------------------------------------------------ no model
def test_import_is_lazy():
    code = ("import sys, radixlm as rl\n"
            "f = rl.function(lambda s: None); rl.gen('x'); rl.select('y', ['a', 'b']); rl.user_begin()\n"
            "heavy = [m for m in ('torch', 'transformers', 'requests', 'openai') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_choice_methods_and_helpers():
    from radixlm.lang.backend.openai_backend import closest_choice, regex_escape

    choices = ["ab", "abc", "x"]
    lps = [[-1.0, -1.0], [-1.0, -0.5, -3.0], [-2.0]]
    assert rl.token_length_normalized(choices, lps).decision == "ab"
    # greedy: first token ties between ab and abc, second token favours abc
    assert rl.greedy_token_selection(choices, lps).decision == "abc"
    unc = [[-1.0, -1.0], [-1.0, -0.5, -3.0], [-5.0]]
    d = rl.unconditional_likelihood_normalized(choices, lps, unc)
    assert d.decision == "x" and d.meta_info["scores"] == [0.0, 0.0, 3.0]
    with pytest.raises(ValueError):
        rl.unconditional_likelihood_normalized(choices, lps, [[-1.0], [], []])
    assert re.fullmatch(regex_escape("a.b(c)|d"), "a.b(c)|d")
    assert closest_choice(" positive.", ["negative", "positive"])[0] == 1
    with pytest.raises(ValueError):
        rl.select("x", [])
    with pytest.raises(ValueError):
        rl.gen("x", regex="(")


def test_chat_template_derivation(tok):
    from radixlm.lang.chat_template import CHATML, from_tokenizer

    assert from_tokenizer(tok).roles == CHATML.roles
    import copy

    t2 = copy.deepcopy(tok)
    t2.chat_template = ("{{ bos_token }}{% if messages[0]['role'] != 'system' %}[SYS]default[/SYS]{% endif %}"
                        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</{{ m['role'] }}>{% endfor %}"
                        "{% if add_generation_prompt %}<assistant>{% endif %}")
    ct = from_tokenizer(t2)
    assert ct.roles["user"] == ("<user>", "</user>") and ct.roles["assistant"] == ("<assistant>", "</assistant>")
    assert ct.default_preamble.endswith("[SYS]default[/SYS]") and ct.stop_str == ("</assistant>",)
    assert ct.begin_text("user", first_role=True) == ct.default_preamble + "<user>"
