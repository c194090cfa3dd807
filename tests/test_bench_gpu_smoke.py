"""CPU smoke test of `python -m radixlm.bench.gpu`: its whole control flow, end to end.

The GPU benchmark runs once on a borrowed GPU, where a Python error in it would waste the run. Here
`main()` runs every workload on a tiny model shape on CPU: the bench is unchanged, the test only
monkeypatches its surroundings (a tiny entry in SHAPES, the CUDA probes, and make_engine's device,
attention backend and dtype: CPU, torch_native, float32).
"""

from __future__ import annotations

import json
import sys

import pytest
import torch

from radixlm.bench import gpu

TINY = {
    "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 64,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
    "intermediate_size": 128, "vocab_size": 600, "tie_word_embeddings": True, "hidden_act": "silu",
    "max_position_embeddings": 8192, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "rope_scaling": None,
    "attention_bias": False, "bos_token_id": 0, "eos_token_id": 1, "torch_dtype": "float32",
}
NUM_OFFLINE = 12

# per workload: measured figures that must be > 0, roofline figures that must be floats >= 0
# (on a tiny model an H200 roofline is so fast that the rounded fractions may well be 0.0)
FIGURES = {
    "decode_b1": (["tokens_per_s", "new_tokens", "ttft_s"], ["roofline_tokens_per_s", "roofline_fraction"]),
    "decode_b1_no_cuda_graph": (["tokens_per_s", "new_tokens", "ttft_s"],
                                ["roofline_tokens_per_s", "roofline_fraction"]),
    "ttft_4096": (["ttft_s"], ["roofline_s", "roofline_fraction"]),
    "shared_prefix_ttft": (["median_ttft_s", "first_ttft_s", "cached_tokens_median"],
                           ["roofline_s", "roofline_fraction"]),
    "throughput_64": (["output_tokens_per_s", "seconds", "output_tokens"],
                      ["roofline_output_tokens_per_s", "roofline_fraction"]),
    "offline_1000": (["output_tokens_per_s", "seconds", "output_tokens", "requests", "mean_in", "mean_out"],
                     ["roofline_output_tokens_per_s", "roofline_fraction"]),
}


def emitted_name(workload: str) -> str:
    """offline_1000 reports offline_<n> when --num-offline is not 1000."""
    return f"offline_{NUM_OFFLINE}" if workload == "offline_1000" else workload


@pytest.fixture
def on_cpu(monkeypatch):
    """The bench on CPU: CUDA 'available' to main()'s check only, harmless CUDA memory probes, and
    every engine on CPU / torch_native / float32. Returns the (backend, kwargs) of each make_engine call."""
    monkeypatch.setitem(gpu.SHAPES, "tiny", TINY)
    monkeypatch.setattr(gpu, "MAX_TOTAL_TOKENS", 32768)  # every workload fits; 16 MB of float32 KV

    real_available = torch.cuda.is_available
    main_code = gpu.main.__code__
    monkeypatch.setattr(torch.cuda, "is_available",
                        lambda: sys._getframe(1).f_code is main_code or real_available())
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "cpu (smoke test)")
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *a, **k: 0)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)

    calls = []
    real_make_engine = gpu.make_engine

    def cpu_engine(path, backend, **kw):
        calls.append((backend, dict(kw)))
        kw.update(device="cpu", dtype="float32")
        return real_make_engine(path, "torch_native", **kw)

    monkeypatch.setattr(gpu, "make_engine", cpu_engine)
    return calls


def test_bench_gpu_main_end_to_end_on_cpu(on_cpu, monkeypatch, capsys):
    assert set(FIGURES) == set(gpu.WORKLOADS), "a workload was added to the bench: add its figures here"
    monkeypatch.setattr(gpu, "ABLATION_SHAPE", "tiny")  # decode_b1_no_cuda_graph runs for it too
    calls = on_cpu

    rc = gpu.main(["--shapes", "tiny", "--num-offline", str(NUM_OFFLINE), "--max-running", "16", "--skip-kernel-timing",
                   "--skip-correctness", "--time-budget", "120"])
    out = capsys.readouterr().out
    lines = [json.loads(line) for line in out.splitlines() if line.strip()]
    dump = "\n".join(out.splitlines())
    assert rc == 0, dump

    # the bench asked for triton engines: the main one, then the ablation's without CUDA graphs
    assert [b for b, _ in calls] == ["triton", "triton"], calls
    assert calls[0][1] == {"max_running_requests": 16}
    assert calls[1][1].get("disable_cuda_graph") is True

    assert not [x for x in lines if "error" in x or x.get("metric") == "error"], dump
    assert not [x for x in lines if "skipped" in x], dump
    assert lines[0]["metric"] == "device" and lines[-1]["metric"] == "done" and lines[-1]["correct"] is True, dump

    ready = [x for x in lines if x["metric"] == "engine_ready"]
    assert len(ready) == 1, dump
    ready = ready[0]
    assert ready["shape"] == "tiny" and ready["params"] > 0 and ready["kv_bytes_per_token"] > 0
    assert ready["cuda_graph_bs"] == [] and ready["cuda_graph_capture_s"] is None  # no graphs on CPU

    for workload, (measured, roofline) in FIGURES.items():
        name = emitted_name(workload)
        got = [x for x in lines if x["metric"] == name]
        assert len(got) == 1, f"{name}: {len(got)} lines\n{dump}"
        res = got[0]
        assert res["shape"] == "tiny", res
        for key in measured:
            assert isinstance(res[key], (int, float)) and res[key] > 0, (name, key, res)
        for key in roofline:
            assert isinstance(res[key], float) and res[key] >= 0, (name, key, res)

    by = {x["metric"]: x for x in lines}
    for name in ("decode_b1", "decode_b1_no_cuda_graph"):
        assert by[name]["new_tokens"] == 256 and by[name]["cuda_graph"] is False, by[name]
    assert len(by["ttft_4096"]["all_s"]) == 3
    assert by["shared_prefix_ttft"]["cached_tokens_median"] >= 3000, by["shared_prefix_ttft"]  # radix hits
    tp = by["throughput_64"]
    assert tp["truncated"] is False and tp["output_tokens"] == 64 * 256, tp
    off = by[emitted_name("offline_1000")]
    assert off["truncated"] is False and off["requests"] == NUM_OFFLINE, off
    assert off["output_tokens"] == sum(gpu.sharegpt_like_lengths(NUM_OFFLINE)[1]), off


def test_bench_gpu_correctness_check_on_cpu(on_cpu, monkeypatch, tmp_path, capsys):
    """run_correctness (skipped above): its dummy Qwen3-0.6B engine pair gets the tiny shape, the real
    small checkpoint stays. Both backends are torch_native here, so this checks the control flow and
    the JSON it prints, not triton."""
    monkeypatch.setitem(gpu.SHAPES, "qwen3-0.6b", TINY)
    assert gpu.run_correctness(str(tmp_path), gpu.Budget(60)) is True
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert [x["metric"] for x in lines] == ["greedy_agreement"] * 2, lines
    for res in lines:
        assert "error" not in res and res["agree"] is True, res
        assert res["agreeing_prefix_per_prompt"] == [32] * 5 and res["distinct_tokens"] > 0, res
        assert res["triton_cuda_graph_bs"] == 0 and len(res["triton_first"]) == 8, res
    assert [b for b, _ in on_cpu] == ["triton", "torch_native"] * 2
    assert all(kw["cuda_graph_max_bs"] == 8 for _, kw in on_cpu)
