"""The demo pair trainer (radixlm.tools.train_demo) at a micro size: the loss goes down, the same seed
writes the same weights, and the written checkpoints load in HF transformers and in radixlm with the
same greedy tokens."""

from __future__ import annotations

import hashlib
import json

import pytest

import radixlm
from radixlm.tools import train_demo
from radixlm.tools.train_demo import Shape
from tests.conftest import assert_matches_hf, greedy_run

MICRO = {"target": Shape(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=128, steps=30, lr=1e-2),
         "draft": Shape(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                        intermediate_size=64, steps=30, lr=1e-2)}


def run(out, parallel=False):
    return train_demo.train_pair(out, seed=3, corpus_bytes=400_000, time_budget=300, batch=4, seq_len=32,
                                 pair=MICRO, progress=False, parallel=parallel)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    out = tmp_path_factory.mktemp("pair")
    return out, run(out)


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_corpus_is_the_stdlib_in_a_fixed_order():
    texts = train_demo.stdlib_corpus(200_000)
    assert texts == train_demo.stdlib_corpus(200_000)
    assert 0 < sum(len(t) for t in texts) <= 200_000
    assert any("def " in t for t in texts)


def test_loss_goes_down_and_the_log_says_so(pair):
    out, logs = pair
    for name in ("target", "draft"):
        log = json.loads((out / name / "train_log.json").read_text())
        assert log == logs[name]
        assert log["steps_done"] == MICRO[name].steps and not log["stopped_early"]
        curve = [p["loss"] for p in log["loss_curve"]]
        assert curve[-1] < curve[0] - 0.5, curve
        assert all(log["samples"][p].startswith(p) for p in train_demo.SAMPLE_PROMPTS), log["samples"]
    assert logs["target"]["parameters"] > logs["draft"]["parameters"]
    table = train_demo.loss_table(logs).splitlines()
    assert table[0].split() == ["step", "target", "loss", "draft", "loss"]
    assert table[1].split()[0] == "0" and table[-2].split()[0] == str(MICRO["target"].steps - 1)
    assert float(table[-1].split()[1]) == pytest.approx(logs["target"]["val_loss"], abs=1e-3)


def test_lr_schedule_follows_the_clock_only_when_the_budget_binds():
    lr = train_demo.lr_at
    assert lr(0, 100, 1.0, warmup=5) == pytest.approx(0.2)
    assert lr(5, 100, 1.0, warmup=5) == pytest.approx(1.0)
    assert lr(99, 100, 1.0, warmup=5) == pytest.approx(0.1, abs=1e-3)
    # the clock behind the steps changes nothing (deterministic); ahead of them it drives the decay
    assert lr(50, 100, 1.0, 5, time_progress=0.2) == lr(50, 100, 1.0, 5)
    assert lr(10, 100, 1.0, 5, time_progress=0.5) == pytest.approx(lr(52.5, 100, 1.0, 5))
    assert lr(10, 100, 1.0, 5, time_progress=1.0) == pytest.approx(0.1)
    # nor does it while less than a fifth of the budget is spent or within 25% of the steps' pace
    assert lr(6, 100, 1.0, 5, time_progress=0.15) == lr(6, 100, 1.0, 5)
    assert lr(43, 100, 1.0, 5, time_progress=0.45) == lr(43, 100, 1.0, 5)


def test_default_pair_draft_is_much_smaller():
    work = train_demo._work
    assert work(train_demo.PAIR["draft"]) * 3 < work(train_demo.PAIR["target"])


def test_same_seed_same_weights(pair, tmp_path):
    """The second run trains both models at once in two processes (the CLI's default): the same weights."""
    out, logs = pair
    again = run(tmp_path, parallel=True)
    assert [p["loss"] for p in again["target"]["loss_curve"]] == [p["loss"] for p in logs["target"]["loss_curve"]]
    for name in ("target", "draft"):
        assert digest(out / name / "model.safetensors") == digest(tmp_path / name / "model.safetensors")
        assert (out / name / "tokenizer.json").read_text() == (tmp_path / name / "tokenizer.json").read_text()


def test_time_budget_stops_early(tmp_path):
    logs = train_demo.train_pair(tmp_path, seed=3, corpus_bytes=200_000, time_budget=0.0, batch=2, seq_len=16,
                                 pair=MICRO, progress=False)
    assert all(log["stopped_early"] and log["steps_done"] == 0 for log in logs.values())


def test_checkpoints_load_in_hf_and_radixlm_alike(pair, hf_reference_factory):
    from transformers import AutoTokenizer

    out, _ = pair
    for name in ("target", "draft"):
        path = str(out / name)
        tok = AutoTokenizer.from_pretrained(path)
        prompts = [tok.encode("def main():\n    return", add_special_tokens=False), tok.encode("import os\n")]
        eng = radixlm.Engine(model_path=path, log_level="warning")
        try:
            assert_matches_hf(greedy_run(eng, prompts, 6), prompts, hf_reference_factory(path), 6)
        finally:
            eng.shutdown()
