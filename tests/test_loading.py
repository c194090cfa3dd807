"""Loading (issue 17): hub ids through an on-disk hub cache (HF_HUB_OFFLINE=1, no network), one-line
errors for missing models, generation_config.json sampling defaults, --chat-template, dtype auto."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import requests
import torch

from radixlm.managers.request_builder import RequestBuilder
from radixlm.managers.tokenizer import get_tokenizer
from radixlm.models.hub import prepare_args, resolve_model_path
from radixlm.models.model_config import ModelConfig, read_sampling_defaults
from radixlm.server_args import ServerArgs

HASH_MAIN = "a" * 40
HASH_V1 = "b" * 40
GEN_DEFAULTS = {"temperature": 0.6, "top_p": 0.95, "top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1}


@pytest.fixture(scope="module")
def plain_model(model_factory, tmp_path_factory):
    """The tiny qwen2 checkpoint with sampling defaults in generation_config.json and no chat template."""
    out = tmp_path_factory.mktemp("plain") / "m"
    shutil.copytree(model_factory("qwen2"), out)
    gen = json.loads((out / "generation_config.json").read_text())
    (out / "generation_config.json").write_text(json.dumps({**gen, **GEN_DEFAULTS}))
    tc = json.loads((out / "tokenizer_config.json").read_text())
    tc.pop("chat_template", None)
    (out / "tokenizer_config.json").write_text(json.dumps(tc))
    for f in out.glob("*.jinja"):
        f.unlink()
    return str(out)


@pytest.fixture
def hub(plain_model, tmp_path, monkeypatch):
    """HF_HOME with org/tiny laid out as huggingface_hub caches it (main -> HASH_MAIN, v1 -> HASH_V1)."""
    home = tmp_path / "hf"
    repo = home / "hub" / "models--org--tiny"
    for h in (HASH_MAIN, HASH_V1):
        shutil.copytree(plain_model, repo / "snapshots" / h)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(HASH_MAIN)
    (repo / "refs" / "v1").write_text(HASH_V1)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return repo


def test_hub_id_resolves_from_the_cache(hub):
    assert resolve_model_path("org/tiny") == str(hub / "snapshots" / HASH_MAIN)
    assert resolve_model_path("org/tiny", revision="v1") == str(hub / "snapshots" / HASH_V1)
    assert resolve_model_path("org/tiny", revision=HASH_V1) == str(hub / "snapshots" / HASH_V1)
    args = prepare_args(ServerArgs(model_path="org/tiny", revision="v1"))
    assert args.model_path == str(hub / "snapshots" / HASH_V1)
    assert args.hub_model_id == "org/tiny" and args.served_model_name == "org/tiny"
    cfg = ModelConfig.from_path("org/tiny")
    assert cfg.model_path == str(hub / "snapshots" / HASH_MAIN) and cfg.architecture == "Qwen2ForCausalLM"


@pytest.mark.parametrize("model,revision", [("org/missing", None), ("org/tiny", "nope"), ("./no/such/dir", None)])
def test_missing_model_is_one_line_naming_model_path(hub, model, revision):
    with pytest.raises(ValueError) as e:
        resolve_model_path(model, revision)
    msg = str(e.value)
    assert msg.startswith("model_path: ") and "\n" not in msg and model in msg
    if model.startswith("org/"):
        assert "HF_HUB_OFFLINE" in msg


def test_engine_loads_a_hub_id_and_refuses_a_missing_one(hub):
    import radixlm

    with pytest.raises(ValueError, match="^model_path: 'org/missing'"):
        radixlm.Engine(model_path="org/missing", device="cpu")
    with radixlm.Engine(model_path="org/tiny", device="cpu", log_level="warning", max_total_tokens=512) as eng:
        assert eng.server_args.hub_model_id == "org/tiny"
        out = eng.generate(prompt="Hello", sampling_params={"max_new_tokens": 4, "temperature": 0})
        assert out["meta_info"]["completion_tokens"] == 4
        assert eng.builder.sampling_defaults == GEN_DEFAULTS


def test_server_missing_model_exits_1_with_one_line(hub):
    p = subprocess.run([sys.executable, "-m", "radixlm.launch_server", "--model-path", "org/missing"],
                       capture_output=True, text=True, timeout=120, env=dict(os.environ))
    assert p.returncode == 1
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("radixlm: model_path: 'org/missing'"), p.stderr
    assert "Traceback" not in p.stderr + p.stdout


# ---------------------------------------------------------------------- sampling defaults
def _builder(model_path, **kw):
    args = ServerArgs(model_path=model_path, **kw)
    return RequestBuilder.from_server_args(args, None, 1000, 256)


def test_generation_config_defaults_fill_unset_fields(plain_model):
    assert read_sampling_defaults(plain_model) == GEN_DEFAULTS
    b = _builder(plain_model)
    (m,), _ = b.build(input_ids=[1, 2, 3], sampling_params={"max_new_tokens": 2})
    sp = m.sampling_params
    assert (sp.temperature, sp.top_p, sp.top_k, sp.min_p, sp.repetition_penalty) == (0.6, 0.95, 20, 0.05, 1.1)
    # a value given wins; null counts as unset
    (m,), _ = b.build(input_ids=[1, 2, 3], sampling_params={"temperature": 0, "top_k": None, "top_p": 0.5})
    sp = m.sampling_params
    assert (sp.temperature, sp.top_k, sp.top_p, sp.min_p) == (0, 20, 0.5, 0.05)
    (m,), _ = b.build(input_ids=[1, 2, 3], sampling_params=None)
    assert m.sampling_params.temperature == 0.6
    # --sampling-defaults openai: the plain defaults
    (m,), _ = _builder(plain_model, sampling_defaults="openai").build(input_ids=[1, 2, 3])
    sp = m.sampling_params
    assert (sp.temperature, sp.top_p, sp.top_k, sp.min_p, sp.repetition_penalty) == (1.0, 1.0, -1, 0.0, 1.0)


def test_openai_request_takes_the_model_defaults(plain_model):
    from radixlm.entrypoints.openai import common
    from radixlm.entrypoints.openai.protocol import ChatCompletionRequest

    req = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], top_p=0.9)
    sp_dict = common.sampling_params(req, 4, 1000)
    (m,), _ = _builder(plain_model).build(input_ids=[1, 2, 3], sampling_params=sp_dict)
    assert (m.sampling_params.temperature, m.sampling_params.top_p, m.sampling_params.top_k) == (0.6, 0.9, 20)


def test_hf_top_k_zero_means_disabled(tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps({"top_k": 0, "do_sample": True, "eos_token_id": 2}))
    assert read_sampling_defaults(str(tmp_path)) == {"top_k": -1}
    assert read_sampling_defaults(str(tmp_path / "none")) == {}


# ---------------------------------------------------------------------- chat template
def test_chat_template_flag(plain_model, tmp_path):
    assert not getattr(get_tokenizer(plain_model), "chat_template", None)
    msgs = [{"role": "user", "content": "hi"}]
    tok = get_tokenizer(plain_model, chat_template="chatml")
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    f = tmp_path / "t.jinja"
    f.write_text("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}")
    tok = get_tokenizer(plain_model, chat_template=str(f))
    assert tok.apply_chat_template(msgs, tokenize=False) == "[user] hi\n"
    j = tmp_path / "t.json"
    j.write_text(json.dumps({"chat_template": "X{{ messages[0]['content'] }}"}))
    assert get_tokenizer(plain_model, chat_template=str(j)).apply_chat_template(msgs, tokenize=False) == "Xhi"
    with pytest.raises(ValueError, match="^chat_template: 'nope' is neither a file nor a built-in"):
        prepare_args(ServerArgs(model_path=plain_model, chat_template="nope"))


def test_server_hub_id_model_info_and_chat_template(hub):
    from tests.server_utils import ServerProcess

    with ServerProcess("org/tiny", ["--chat-template", "chatml", "--max-total-tokens", "512"]) as s:
        info = requests.get(s.base_url + "/get_model_info", timeout=10).json()
        assert info["model_path"] == "org/tiny" and info["preferred_sampling_params"] == GEN_DEFAULTS
        r = requests.post(s.base_url + "/v1/chat/completions", timeout=60, json={
            "model": "org/tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3})
        assert r.status_code == 200, r.text
        assert r.json()["model"] == "org/tiny" and r.json()["usage"]["prompt_tokens"] > 3
    with ServerProcess("org/tiny", ["--max-total-tokens", "512", "--sampling-defaults", "openai"]) as s:
        info = requests.get(s.base_url + "/get_model_info", timeout=10).json()
        assert info["preferred_sampling_params"] is None
        r = requests.post(s.base_url + "/v1/chat/completions", timeout=60, json={
            "model": "org/tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3})
        assert r.status_code == 400, r.text  # no chat template and no --chat-template


# ---------------------------------------------------------------------- dtype auto
def test_dtype_auto_follows_checkpoint_and_device(plain_model, tmp_path):
    assert json.loads(open(os.path.join(plain_model, "config.json")).read()).get("torch_dtype") in (None, "float32")
    assert ModelConfig.from_path(plain_model, device="cpu").dtype == torch.float32
    assert ModelConfig.from_path(plain_model, device="cuda").dtype == torch.bfloat16
    assert ModelConfig.from_path(plain_model, device="cuda:1").dtype == torch.bfloat16
    assert ModelConfig.from_path(plain_model, "float16", device="cpu").dtype == torch.float16
    bf = tmp_path / "bf16"
    shutil.copytree(plain_model, bf)
    cfg = json.loads((bf / "config.json").read_text())
    (bf / "config.json").write_text(json.dumps({**cfg, "torch_dtype": "bfloat16"}))
    assert ModelConfig.from_path(str(bf), device="cpu").dtype == torch.bfloat16
