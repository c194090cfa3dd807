"""SGLang 0.5.x wire compatibility (issue 13): every GenerateReqInput / SamplingParams field is known
(managers/sglang_fields.py), accepted at its default and a 400 naming it otherwise; stop_regex,
structural_tag, per-request stream_interval, custom_params, extra_key / cache_salt namespaces and
priority scheduling work; what sglang-router 0.3.2 and the frontend send is answered 2xx."""

from __future__ import annotations

import ast
import dataclasses
import json
import pathlib
import random

import pytest
import requests

from radixlm.core import Req
from radixlm.managers import sglang_fields as sf
from radixlm.managers.detokenizer import IncrementalDetokenizer
from radixlm.managers.io_struct import DetokenizeParams, decode, encode, to_req
from radixlm.managers.request_builder import RequestBuilder, RequestLimits
from radixlm.mem.allocator import TokenToKVPoolAllocator
from radixlm.mem.radix_cache import RadixCache
from radixlm.sampling_params import SamplingParams, compile_stop_regexes, regex_max_width
from radixlm.sched.schedule_policy import order_waiting
from tests.sched_harness import assert_idle_and_clean, drive, make_req, make_scheduler
from tests.server_utils import ServerProcess

FIXTURES = pathlib.Path(__file__).parent / "fixtures"

# sglang 0.5.23's field names (reference §11), kept here so CI checks the table without the package
GENERATE_0_5_23 = """rid session_id text input_ids input_embeds image_data video_data audio_data mm_hashes
mm_content_hashes use_audio_in_video video_config sampling_params watermark return_logprob logprob_start_len
top_logprobs_num token_ids_logprob return_sampling_mask sampling_logprobs_mode return_text_in_logprobs
return_flat_raw_top_logprobs return_flat_raw_output_top_logprobs stream log_metrics return_hidden_states
return_routed_experts routed_experts_start_len return_indexer_topk modalities session_params lora_path lora_id
custom_logit_processor positional_embed_overrides bootstrap_host bootstrap_port bootstrap_room bootstrap_pair_key
decode_tp_size routed_dp_rank data_parallel_rank disagg_prefill_dp_rank routing_key conversation_id
http_worker_ipc background require_reasoning max_thinking_tokens priority extra_key no_logs custom_labels
return_bytes return_entropy return_prompt_token_ids external_trace_header received_time need_wait_for_mm_inputs
num_items_assigned encoder_urls max_dynamic_patch min_dynamic_patch image_max_dynamic_patch
video_max_dynamic_patch images_config mm_processor_kwargs multi_item_delimiter_indices token_indices_to_pool
cache_salt kv_hints""".split()
SAMPLING_0_5_23 = """max_new_tokens stop stop_token_ids stop_regex temperature top_p top_k min_p frequency_penalty
presence_penalty repetition_penalty min_new_tokens n beam_width json_schema regex ebnf structural_tag ignore_eos
skip_special_tokens spaces_between_special_tokens no_stop_trim stream_interval logit_bias sampling_seed
custom_params watermark stop_strs stop_regex_strs stop_str_max_len stop_regex_max_len is_normalized
ebnf_full_assistant""".split()
# what sglang-router 0.3.2 adds to a forwarded /generate (reference §11)
ROUTER_BODY = {"text": "Hello", "sampling_params": {"max_new_tokens": 4, "temperature": 0}, "model": None,
               "return_text_in_logprobs": False, "stream": False, "log_metrics": True,
               "return_hidden_states": False, "background": False, "no_logs": False, "return_bytes": False,
               "return_entropy": False}


# ------------------------------------------------------------------------------ the table
def test_table_covers_every_sglang_field():
    assert set(GENERATE_0_5_23) <= set(sf.GENERATE_FIELDS)
    assert set(SAMPLING_0_5_23) <= set(sf.SAMPLING_FIELDS)
    sp_fields = {f.name for f in dataclasses.fields(SamplingParams)}
    assert set(sf.names(sf.SAMPLING_FIELDS, sf.HANDLED)) - {"seed"} == sp_fields  # handled = implemented
    assert set(sf.DEFAULTS) <= set(sf.GENERATE_FIELDS) | set(sf.SAMPLING_FIELDS)


def _dataclass_fields(source: pathlib.Path, cls: str):
    tree = ast.parse(source.read_text())
    node = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls)
    return {st.target.id for st in node.body if isinstance(st, ast.AnnAssign)}


def test_table_matches_installed_sglang():
    """With the real package installed: its GenerateReqInput / SamplingParams have no field the
    table lacks (read from the source: importing sglang.srt needs GPU packages)."""
    import importlib.util

    spec = importlib.util.find_spec("sglang")
    if spec is None:
        pytest.skip("sglang is not installed (pip install --no-deps sglang==0.5.23)")
    root = pathlib.Path(spec.origin).parent / "srt"
    gen = _dataclass_fields(root / "managers" / "io_struct.py", "GenerateReqInput")
    samp = _dataclass_fields(root / "sampling" / "sampling_params.py", "SamplingParams")
    assert gen - set(sf.GENERATE_FIELDS) == set()
    assert samp - set(sf.SAMPLING_FIELDS) == set()


def test_defaults_accepted_non_defaults_named():
    sf.check_generate_fields(ROUTER_BODY)
    every_default = {k: None for k in sf.GENERATE_FIELDS}
    every_default.update({"image_data": [], "lora_path": [None, None], "routed_dp_rank": 0,
                          "routed_experts_start_len": 0, "custom_labels": {"team": "x"}, "model": "m"})
    sf.check_generate_fields(every_default)
    for name, value in [("background", True), ("return_hidden_states", True), ("return_entropy", True),
                        ("image_data", "data:image/png;base64,AA"), ("lora_id", "a"),
                        ("session_params", {"id": "s"}), ("bootstrap_pair_key", "k"), ("routed_dp_rank", 1),
                        ("input_embeds", [[0.1]]), ("return_prompt_token_ids", True)]:
        with pytest.raises(ValueError, match=f"^{name}: "):
            sf.check_generate_fields({"text": "x", name: value})
    with pytest.raises(ValueError, match="Unknown request field.*bogus"):
        sf.check_generate_fields({"text": "x", "bogus": 1})
    assert sf.check_sampling_fields({"beam_width": 1, "watermark": None, "stop_regex": None, "n": 1}) == \
        {"stop_regex": None, "n": 1}
    with pytest.raises(ValueError, match="^sampling_params.beam_width: beam search"):
        sf.check_sampling_fields({"beam_width": 4})
    with pytest.raises(ValueError, match="Unknown sampling_params field.*nope"):
        sf.check_sampling_fields({"nope": 1})


# ------------------------------------------------------------------------------ request builder
class _Tok:
    def encode(self, text, add_special_tokens=True):
        return [ord(c) % 90 + 5 for c in text]

    def get_vocab(self):
        return {"a": 0}


def _builder(**kw):
    return RequestBuilder(_Tok(), 100, 256, limits=RequestLimits(max_stop_strings=3, max_stop_string_len=16), **kw)


def test_builder_new_sampling_fields():
    b = _builder()
    msgs, _ = b.build(text="hi", sampling_params={"stop_regex": [r"\d+", "x"], "stream_interval": 3,
                                                  "custom_params": {"k": [1, 2]}, "max_new_tokens": 4})
    sp = msgs[0].sampling_params
    assert sp.stop_regex_strs == [r"\d+", "x"] and sp.stream_interval == 3 and sp.custom_params == {"k": [1, 2]}
    assert decode(encode(msgs[0])).sampling_params == sp  # crosses the codec
    for bad, match in [({"stop_regex": ["a"] * 4}, "stop_regex: 4 patterns; at most 3"),
                       ({"stop_regex": "a" * 17}, "stop_regex: a pattern of 17 characters"),
                       ({"stop_regex": "(a"}, "stop_regex: invalid pattern"),
                       ({"stop_regex": [""]}, "stop_regex must be"),
                       ({"stream_interval": 0}, "stream_interval must be a positive integer"),
                       ({"custom_params": [1]}, "custom_params must be a JSON object"),
                       ({"regex": "a", "structural_tag": "{}"}, "Only one of regex, json_schema, ebnf or "
                                                               "structural_tag"),
                       ({"structural_tag": '{"type": "structural_tag", "format": {"type": "bogus"}}'},
                        "Invalid structural_tag")]:
        with pytest.raises(ValueError, match=match):
            b.build(text="hi", sampling_params=bad)


def test_builder_structural_tag_shapes_accepted():
    b = _builder()
    legacy = {"type": "structural_tag", "triggers": ["<f>"],
              "structures": [{"begin": "<f>", "schema": {"type": "object"}, "end": "</f>"}]}
    current = {"type": "structural_tag", "format": {"type": "triggered_tags", "triggers": ["<f>"], "tags": [
        {"begin": "<f>", "content": {"type": "json_schema", "json_schema": {"type": "object"}}, "end": "</f>"}]}}
    for tag in (legacy, json.dumps(current)):
        msgs, _ = b.build(text="hi", sampling_params={"structural_tag": tag, "max_new_tokens": 4})
        assert msgs[0].sampling_params.structural_tag == tag


def test_builder_namespaces_and_priority():
    b = _builder()
    msgs, _ = b.build(text=["a", "b", "c"], sampling_params={"max_new_tokens": 1}, extra_key=["k1", "", "k1"],
                      cache_salt="s")
    assert [m.cache_namespace for m in msgs] == [("k1", "s"), (None, "s"), ("k1", "s")]
    msgs, _ = b.build(text="a", sampling_params={"max_new_tokens": 1}, extra_key="")
    assert msgs[0].cache_namespace is None
    with pytest.raises(ValueError, match="extra_key: a list of 3 strings"):
        b.build(text=["a", "b", "c"], extra_key=["k"])
    with pytest.raises(ValueError, match="^priority: priority scheduling is disabled.*--enable-priority-scheduling"):
        b.build(text="a", priority=5)
    msgs, _ = b.build(text="a", priority=None)  # the default is fine without the flag
    pb = _builder(enable_priority_scheduling=True)
    msgs, _ = pb.build(text="a", priority=-3)
    assert to_req(msgs[0]).priority == -3
    with pytest.raises(ValueError, match="priority must be a 64-bit integer"):
        pb.build(text="a", priority="high")


# ------------------------------------------------------------------------------ radix namespaces
@pytest.mark.parametrize("page_size", [1, 2])
def test_radix_namespaces_never_share(page_size):
    alloc = TokenToKVPoolAllocator(64, page_size=page_size)
    cache = RadixCache(alloc, page_size=page_size)
    key = [1, 2, 3, 4, 5, 6]
    for ns in (None, ("a", None), (None, "a")):
        assert len(cache.match_prefix(key, ns).indices) == 0
        assert cache.insert(key, alloc.alloc(len(key)), ns) == 0
        cache.check_integrity()
    seen = [cache.match_prefix(key, ns).indices.tolist() for ns in (None, ("a", None), (None, "a"))]
    assert all(len(s) == 6 for s in seen) and len({tuple(s) for s in seen}) == 3  # three copies, own slots
    assert len(cache.match_prefix(key[:4] + [9, 9], ("a", None)).indices) == 4  # splits stay in the namespace
    cache.check_integrity()
    m = cache.match_prefix(key, ("a", None))
    cache.inc_lock_ref(m.last_node)
    assert cache.evict(100) == 12  # the two unlocked namespaces go, the locked one stays
    assert cache.match_prefix(key, ("a", None)).indices.tolist() == seen[1]
    assert len(cache.match_prefix(key).indices) == 0
    cache.dec_lock_ref(m.last_node)
    cache.check_integrity()
    assert cache.evict(100) == 6 and alloc.available_size() == alloc.size


def test_scheduler_namespaces_and_cached_tokens():
    sched = make_scheduler(512)
    reqs = [make_req(f"r{i}", 40, 3, seed=7) for i in range(4)]  # one prompt, four requests
    reqs[1].cache_namespace = ("tenant-a", None)
    reqs[2].cache_namespace = ("tenant-a", None)
    reqs[3].cache_namespace = (None, "salt")
    run = drive(sched, {0: [reqs[0]], 5: [reqs[1]], 10: [reqs[2]], 15: [reqs[3]]})
    assert [r.cached_tokens for r in reqs] == [0, 0, 39, 0]  # same key shares, others never do
    assert len({tuple(v) for v in run.outputs.values()}) == 1  # the KV is the same: so are the tokens
    assert_idle_and_clean(sched)


def test_priority_order():
    rng = random.Random(0)
    reqs = [make_req(f"r{i}", 4, 1, seed=i) for i in range(5)]
    for i, (r, p) in enumerate(zip(reqs, [None, 5, -1, 5, 2])):
        r.priority, r.arrival_seq = p, i
    cache = RadixCache(TokenToKVPoolAllocator(64))
    ids = lambda rs: [r.rid for r in rs]  # noqa: E731
    assert ids(order_waiting(reqs, "fcfs", cache, rng)) == ["r0", "r1", "r2", "r3", "r4"]
    assert ids(order_waiting(reqs, "fcfs", cache, rng, priority_sign=1)) == ["r1", "r3", "r4", "r0", "r2"]
    assert ids(order_waiting(reqs, "lpm", cache, rng, priority_sign=-1)) == ["r2", "r0", "r4", "r1", "r3"]


def test_scheduler_admits_by_priority():
    sched = make_scheduler(512, max_running=1, enable_priority_scheduling=True)
    first = make_req("first", 8, 2, seed=1)
    low, high = make_req("low", 8, 2, seed=2), make_req("high", 8, 2, seed=3)
    low.priority, high.priority = 1, 9
    run = drive(sched, {0: [first], 1: [low, high]})
    assert run.token_step["high"][-1] < run.token_step["low"][0]
    sched = make_scheduler(512, max_running=1, enable_priority_scheduling=True,
                           schedule_low_priority_values_first=True)
    low, high = make_req("low", 8, 2, seed=2), make_req("high", 8, 2, seed=3)
    low.priority, high.priority = 1, 9
    run = drive(sched, {0: [make_req("first", 8, 2, seed=1)], 1: [high, low]})
    assert run.token_step["low"][-1] < run.token_step["high"][0]


# ------------------------------------------------------------------------------ stop_regex
def test_regex_width():
    assert regex_max_width("abc") == 3 and regex_max_width(r"\d{2,5}") == 5 and regex_max_width("a+") is None


def test_stop_regex_in_scheduler():
    """The stub model's text is its token ids, space separated: a regex over it stops the request."""
    sched = make_scheduler(512)
    sched.out.decode_tail = lambda ids: " ".join(map(str, ids))
    probe = make_req("probe", 6, 8, seed=4)
    drive(sched, {0: [probe]})
    third = probe.output_ids[2]
    req = make_req("r", 6, 8, seed=4, stop_regex=[rf"\b{third}\b", "zzz"])
    req.stop_regexes = compile_stop_regexes(req.sampling_params.stop_regex)
    run = drive(sched, {0: [req]})
    assert run.finish["r"] == {"type": "stop", "matched": rf"\b{third}\b"}
    assert len(run.outputs["r"]) == 3


class _CharTok:
    """One token per character."""

    def decode(self, ids, skip_special_tokens=True, spaces_between_special_tokens=True):
        return "".join(chr(i) for i in ids)


def test_detokenizer_holds_back_and_trims_stop_regex():
    from radixlm.core import FinishReason

    det = IncrementalDetokenizer(_CharTok(), DetokenizeParams(stop_regex=[r"END\d"]))
    shown = "".join(det.add([ord(c)]) for c in "abcdEND")
    assert shown == "abcd"  # "END" could be the start of a match: held (width 4 - 1)
    shown += det.add([ord("7")], FinishReason("stop", matched=r"END\d"))
    assert shown == "abcd" and det.text == "abcd"
    det = IncrementalDetokenizer(_CharTok(), DetokenizeParams(stop_regex=[r"END\d"], no_stop_trim=True))
    text = "".join(det.add([ord(c)]) for c in "abEND") + det.add([ord("1")], FinishReason("stop", matched=r"END\d"))
    assert text == "abEND1"


# ------------------------------------------------------------------------------ live server
@pytest.fixture(scope="module")
def server(qwen2_path):
    with ServerProcess(qwen2_path, ["--enable-priority-scheduling"]) as s:
        yield s


def _gen(server, body, **kw):
    return requests.post(server.base_url + "/generate", json=body, timeout=60, **kw)


def test_server_router_body_and_frontend_sampling_keys(server):
    r = _gen(server, ROUTER_BODY)
    assert r.status_code == 200, r.text
    frontend_sp = {"max_new_tokens": 4, "min_new_tokens": 0, "n": 1, "stop": [], "stop_token_ids": [],
                   "stop_regex": None, "temperature": 0, "top_p": 1.0, "top_k": -1, "min_p": 0.0,
                   "frequency_penalty": 0.0, "presence_penalty": 0.0, "ignore_eos": False, "regex": None,
                   "json_schema": None, "skip_special_tokens": True, "spaces_between_special_tokens": True}
    r = _gen(server, {"text": "Hi", "sampling_params": frontend_sp})
    assert r.status_code == 200, r.text
    r = _gen(server, {**ROUTER_BODY, "return_hidden_states": True})
    assert r.status_code == 400 and "return_hidden_states" in r.text
    r = _gen(server, {**ROUTER_BODY, "priority": 3, "extra_key": "k", "cache_salt": "s"})
    assert r.status_code == 200, r.text


def test_server_stop_regex(server):
    body = {"text": "Once upon a time", "sampling_params": {"max_new_tokens": 16, "temperature": 0}}
    full = _gen(server, body).json()
    assert full["meta_info"]["completion_tokens"] > 1 and full["text"]
    pat = r"[\s\S]"  # matches the first character generated
    out = _gen(server, {**body, "sampling_params": {**body["sampling_params"], "stop_regex": pat}}).json()
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": pat}
    assert out["text"] == ""
    kept = _gen(server, {**body, "sampling_params": {**body["sampling_params"], "stop_regex": [pat],
                                                     "no_stop_trim": True}}).json()
    assert kept["text"] and full["text"].startswith(kept["text"])


def test_server_stream_interval_per_request(server):
    def chunks(sp):
        body = {"text": "Hello", "stream": True, "sampling_params": {"max_new_tokens": 12, "temperature": 0,
                                                                      "ignore_eos": True, **sp}}
        with _gen(server, body, stream=True) as r:
            assert r.status_code == 200
            return [ln for ln in r.iter_lines() if ln.startswith(b"data: {")]

    assert len(chunks({})) > 3
    got = [json.loads(c[6:])["meta_info"]["completion_tokens"] for c in chunks({"stream_interval": 5})]
    assert len(got) <= 3 and got[-1] == 12 and all(b - a >= 5 for a, b in zip([0] + got[:-2], got[:-1]))


def test_server_cache_namespaces(server):
    requests.post(server.base_url + "/flush_cache", timeout=30)
    ids = list(range(10, 90))
    sp = {"max_new_tokens": 1, "temperature": 0}

    def cached(**kw):
        return _gen(server, {"input_ids": ids, "sampling_params": sp, **kw}).json()["meta_info"]["cached_tokens"]

    assert cached() == 0
    assert cached() > 70
    assert cached(extra_key="a") == 0
    assert cached(extra_key="a") > 70
    assert cached(cache_salt="a") == 0  # a salt is not an extra_key of the same text
    assert cached(extra_key="a", cache_salt="a") == 0


def test_server_structural_tag(server):
    tag = {"type": "structural_tag", "format": {"type": "const_string", "value": "<ok/>"}}
    out = _gen(server, {"text": "x", "sampling_params": {"max_new_tokens": 16, "temperature": 0,
                                                         "structural_tag": tag}})
    assert out.status_code == 200, out.text
    assert out.json()["text"] == "<ok/>"


def test_replay_recorded_frontend_requests(server):
    """Every request SGLang's frontend (sglang 0.5.23 RuntimeEndpoint) sent while running the 7
    basic programs (tests/fixtures/sglang_frontend_0.5.23.json, recorded by
    tests/test_sglang_frontend.py) is answered 2xx."""
    rec = json.loads((FIXTURES / "sglang_frontend_0.5.23.json").read_text())
    assert rec["client"] == "sglang 0.5.23 RuntimeEndpoint" and len(rec["requests"]) >= 10
    for q in rec["requests"]:
        kw = {} if q["body"] is None else {"json": q["body"]}
        r = requests.request(q["method"], server.base_url + q["path"], timeout=60, **kw)
        r.content  # noqa: B018 - a stream read to its end
        assert 200 <= r.status_code < 300, (q["method"], q["path"], r.status_code, r.text[:300])


def test_req_defaults_unchanged():
    r = Req("x", [1, 2], SamplingParams())
    assert r.priority is None and r.cache_namespace is None and r.stop_regexes == []


def test_openai_routes_take_sglang_extensions(server):
    url = server.base_url + "/v1/chat/completions"
    base = {"model": "default", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8, "temperature": 0}
    r = requests.post(url, json={**base, "stop_regex": r"[\s\S]", "extra_key": "k", "cache_salt": "s",
                                 "priority": 1, "lora_path": None, "return_hidden_states": False}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == "" and r.json()["choices"][0]["finish_reason"] == "stop"
    r = requests.post(url, json={**base, "lora_path": "adapter"}, timeout=60)
    assert r.status_code == 400 and "lora_path" in r.json()["message"]
    r = requests.post(server.base_url + "/v1/completions", json={"model": "default", "prompt": "Hi", "max_tokens": 4,
                                                                 "stop_regex": ["("]}, timeout=60)
    assert r.status_code == 400 and "stop_regex" in r.json()["message"]
    r = requests.post(server.base_url + "/v1/completions", json={
        "model": "default", "prompt": "x", "max_tokens": 8, "temperature": 0,
        "response_format": {"type": "structural_tag", "format": {"type": "const_string", "value": "<ok/>"}}},
        timeout=60)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == "<ok/>", r.text


def test_engine_passes_namespaces(path):
    """The offline Engine takes extra_key / cache_salt like /generate: no cache sharing across keys."""
    import radixlm

    ids = list(range(5, 90))
    with radixlm.Engine(model_path=path, log_level="warning") as eng:
        sp = {"max_new_tokens": 1, "temperature": 0}
        eng.generate(input_ids=ids, sampling_params=sp, extra_key="a")
        same = eng.generate(input_ids=ids, sampling_params=sp, extra_key="a")
        other = eng.generate(input_ids=ids, sampling_params=sp, extra_key="b")
        salted = eng.generate(input_ids=ids, sampling_params=sp, extra_key="a", cache_salt="s")
    assert same["meta_info"]["cached_tokens"] == len(ids) - 1
    assert other["meta_info"]["cached_tokens"] == 0 and salted["meta_info"]["cached_tokens"] == 0
