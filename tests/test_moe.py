"""Mixture-of-Experts: Qwen3-MoE and Mixtral against HF transformers, and the expert runners against
the reference.

* Router top-k: softmax over all experts, top-k, renormalised only when asked (HF's order).
* Runners: torch_grouped and the Triton kernel (CPU: Triton's interpreter) equal the plain
  per-expert loop on random inputs (empty experts, one token, top-1 .. top-4, bf16).
* Tensor-parallel layout: each rank's shard (w13 rows, w2 columns) gives a partial sum; the sum over
  ranks equals the unsharded experts; a real TP=2 engine (2 gloo ranks) gives HF's tokens.
* Greedy tokens equal HF's on the tiny generated checkpoints, with every runner; a Qwen3-MoE with
  dense layers (mlp_only_layers, decoder_sparse_step) and no renormalisation; the fused tensor
  layout of transformers 5 (gate_up_proj / down_proj) loads too; a missing expert is an error.
* A live server on a MoE checkpoint answers and its KV returns to idle.
"""

from __future__ import annotations

import json
import shutil

import pytest
import requests
import torch

import radixlm
from radixlm.distributed import parallel_state
from radixlm.layers.moe import moe_grouped, moe_reference, select_experts
from radixlm.layers.moe.layer import FusedMoE
from tests.conftest import assert_matches_hf, greedy_run, random_prompts
from tests.sched_harness import assert_idle_and_clean
from tests.triton_env import DEVICE, gpu  # (sets TRITON_INTERPRET before triton is imported)

NEW = 8
LENGTHS = [1, 5, 33, 70]


def _case(t, h, inter, e, k, dtype=torch.float32, seed=0, skew=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, h, generator=g).to(dtype)
    w13 = (torch.randn(e, 2 * inter, h, generator=g) / h ** 0.5).to(dtype)
    w2 = (torch.randn(e, h, inter, generator=g) / inter ** 0.5).to(dtype)
    logits = torch.randn(t, e, generator=g) * 3
    if skew:  # experts 0 and 1 take almost everything: the others get few tokens or none
        logits[:, :2] += 20
    weights, ids = select_experts(logits, k, renormalize=True)
    return x, w13, w2, weights, ids


# ------------------------------------------------------------------------------------ routing
def test_topk_routing_normalisation():
    logits = torch.tensor([[1.0, 3.0, 2.0, -1.0], [0.5, 0.5, 4.0, 0.0]])
    w, ids = select_experts(logits, 2, renormalize=False)
    probs = torch.softmax(logits, -1)
    assert ids.tolist() == [[1, 2], [2, 0]] or ids.tolist() == [[1, 2], [2, 1]]
    assert torch.allclose(w, probs.gather(1, ids.long()))
    assert (w.sum(-1) < 1).all()
    wn, idn = select_experts(logits, 2, renormalize=True)
    assert torch.equal(idn, ids)
    assert torch.allclose(wn.sum(-1), torch.ones(2))
    # Mixtral: renormalised top-k probabilities == softmax over the top-k logits
    assert torch.allclose(wn, torch.softmax(logits.gather(1, ids.long()), -1))
    assert w.dtype == torch.float32 and ids.dtype == torch.int32
    with pytest.raises(ValueError, match="top_k"):
        select_experts(logits, 5, renormalize=True)


# ------------------------------------------------------------------------------------ runners
@pytest.mark.parametrize("t,h,inter,e,k,dtype,skew", [
    (1, 32, 16, 4, 2, torch.float32, False),
    (13, 48, 40, 8, 2, torch.float32, True),
    (37, 64, 24, 6, 4, torch.float32, False),
    (9, 32, 32, 5, 1, torch.float32, True),
    (21, 64, 48, 8, 2, torch.bfloat16, False),
], ids=["t1", "skewed_empty_experts", "top4", "top1", "bf16"])
def test_runners_match_reference(t, h, inter, e, k, dtype, skew):
    from radixlm.layers.moe.triton_moe import fused_moe_triton

    x, w13, w2, weights, ids = _case(t, h, inter, e, k, dtype, skew=skew)
    ref = moe_reference(x, w13, w2, weights, ids)
    # the reference itself against a dense loop over tokens (float32)
    dense = torch.zeros(t, h)
    for i in range(t):
        for j in range(k):
            ex = int(ids[i, j])
            gu = w13[ex].float() @ x[i].float()
            dense[i] += weights[i, j] * (w2[ex].float() @ (torch.nn.functional.silu(gu[:inter]) * gu[inter:]))
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(ref.float(), dense, atol=tol, rtol=tol)
    torch.testing.assert_close(moe_grouped(x, w13, w2, weights, ids).float(), ref.float(), atol=tol, rtol=tol)
    dev = DEVICE
    tri = fused_moe_triton(x.to(dev), w13.to(dev), w2.to(dev), weights.to(dev), ids.to(dev))
    torch.testing.assert_close(tri.float().cpu(), ref.float(), atol=tol, rtol=tol)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("t", [1, 7, 300])
def test_triton_runner_on_gpu_bf16(t):
    """Real shapes on CUDA (Qwen3-30B-A3B-like: 128 experts, top-8, I=768 on one rank)."""
    from radixlm.layers.moe.triton_moe import fused_moe_triton

    x, w13, w2, weights, ids = _case(t, 2048, 768, 128, 8, torch.bfloat16)
    args = [a.cuda() for a in (x, w13, w2, weights, ids)]
    ref = moe_reference(*args).float()
    torch.testing.assert_close(fused_moe_triton(*args).float(), ref, atol=3e-2, rtol=3e-2)


def test_align_block_size_groups_pairs_by_expert():
    from radixlm.layers.moe.triton_moe import align_block_size

    ids = torch.tensor([[3, 0], [3, 1], [0, 3], [3, 2], [1, 3]], dtype=torch.int32)  # expert 4 empty
    sorted_ids, block_expert, total = align_block_size(ids, 5, 4)
    n = ids.numel()
    assert int(total) == 20  # experts 0, 1, 2: 2, 2, 1 pairs -> one block each; 3: 5 -> two; 4: none
    flat = ids.flatten()
    for b in range(int(total) // 4):
        block = sorted_ids[4 * b:4 * b + 4]
        real = block[block < n]
        assert (flat[real.long()] == block_expert[b]).all()
    assert sorted(sorted_ids[sorted_ids < n].tolist()) == list(range(n))  # every pair exactly once


# ------------------------------------------------------------------------------------ tensor parallel
def test_tp_shards_sum_to_full(monkeypatch):
    e, h, inter, tp = 4, 32, 24, 2
    x, w13, w2, weights, ids = _case(7, h, inter, e, 2)
    gate, up = w13[:, :inter], w13[:, inter:]
    full = moe_reference(x, w13, w2, weights, ids)
    partial = torch.zeros_like(full)
    for rank in range(tp):
        monkeypatch.setattr(parallel_state, "_GROUP", parallel_state.TPGroup(rank=rank, size=tp))
        layer = FusedMoE(e, h, inter)
        for ex in range(e):  # HF's per-expert tensors, whole: the loader takes this rank's shard
            layer.weight_loader(layer.w13_weight, gate[ex], ex, "w1")
            layer.weight_loader(layer.w13_weight, up[ex], ex, "w3")
            layer.weight_loader(layer.w2_weight, w2[ex], ex, "w2")
        assert layer.w13_weight.shape == (e, 2 * inter // tp, h) and layer.w2_weight.shape == (e, h, inter // tp)
        fused = FusedMoE(e, h, inter)  # transformers 5's all-experts layout gives the same shard
        fused.weight_loader(fused.w13_weight, w13, None, "w13")
        fused.weight_loader(fused.w2_weight, w2, None, "w2")
        assert torch.equal(fused.w13_weight, layer.w13_weight) and torch.equal(fused.w2_weight, layer.w2_weight)
        partial += layer(x, weights, ids, "torch_grouped")
    torch.testing.assert_close(partial, full, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="shape"):
        layer.weight_loader(layer.w2_weight, w2[0, :, :5], 0, "w2")


# ------------------------------------------------------------------------------------ HF parity
@pytest.fixture(scope="module", params=["qwen3_moe", "mixtral"])
def moe_setup(request, model_factory, hf_reference_factory):
    path = model_factory(request.param)
    ref = hf_reference_factory(path)
    return path, ref, random_prompts(3, LENGTHS, 512)


@pytest.mark.parametrize("runner", ["torch_grouped", "torch_reference", "triton"])
def test_greedy_matches_hf(moe_setup, runner):
    path, ref, prompts = moe_setup
    prompts = prompts if runner != "triton" else prompts[:2]  # the interpreter is slow
    with radixlm.Engine(model_path=path, log_level="warning", moe_runner_backend=runner,
                        chunked_prefill_size=32) as eng:
        outs = greedy_run(eng, prompts, NEW)
        assert_matches_hf(outs, prompts, ref, NEW)
        assert_idle_and_clean(eng.scheduler)


def test_qwen3_moe_dense_layers_and_unnormalised_router(model_factory, hf_reference_factory):
    # layer 0 dense (mlp_only_layers), layer 1 sparse, layer 2 dense ((2 + 1) % 2 != 0)
    path = model_factory("qwen3_moe", norm_topk_prob=False, decoder_sparse_step=2, mlp_only_layers=(0,))
    ref = hf_reference_factory(path)
    with radixlm.Engine(model_path=path, log_level="warning") as eng:
        kinds = [type(layer.mlp).__name__ for layer in eng.scheduler.runner.model.model.layers]
        assert kinds == ["LlamaMLP", "SparseMoeBlock", "LlamaMLP"]
        prompts = random_prompts(5, LENGTHS[:3], 512)
        assert_matches_hf(greedy_run(eng, prompts, NEW), prompts, ref, NEW)


def test_transformers5_fused_layout_loads(model_factory, hf_reference_factory, tmp_path):
    """The tensor names of transformers 5's in-memory MoE modules (experts.gate_up_proj [E, 2I, H],
    experts.down_proj [E, H, I]; Mixtral under mlp.) load as well as the hub's per-expert names
    (which is what save_pretrained of transformers 5.25 writes back)."""
    from safetensors.torch import save_file

    src = model_factory("mixtral")
    ref = hf_reference_factory(src)
    state = {k: v.contiguous() for k, v in ref.model.state_dict().items()}
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in state)
    for f in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json"):
        shutil.copy(f"{src}/{f}", tmp_path / f)
    save_file(state, str(tmp_path / "model.safetensors"))
    prompts = random_prompts(9, [4, 20], 512)
    with radixlm.Engine(model_path=str(tmp_path), log_level="warning") as eng:
        assert_matches_hf(greedy_run(eng, prompts, NEW), prompts, ref, NEW)


def test_unknown_runner_is_refused(model_factory):
    with pytest.raises(ValueError, match="moe_runner_backend"):
        radixlm.Engine(model_path=model_factory("mixtral"), log_level="warning", moe_runner_backend="cutlass")


def test_missing_expert_is_an_error(model_factory, tmp_path):
    from safetensors.torch import load_file, save_file

    src = model_factory("qwen3_moe")
    for f in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json"):
        shutil.copy(f"{src}/{f}", tmp_path / f)
    state = load_file(f"{src}/model.safetensors")
    del state["model.layers.1.mlp.experts.5.up_proj.weight"]
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="expert 5's w3"):
        radixlm.Engine(model_path=str(tmp_path), log_level="warning")
    assert json.loads((tmp_path / "config.json").read_text())["num_experts"] == 8


def test_tensor_parallel_2_matches_hf(model_factory, hf_reference_factory):
    """TP=2 on CPU (gloo, 127.0.0.1): each rank loads half of every expert's intermediate size."""
    path = model_factory("qwen3_moe")
    ref = hf_reference_factory(path)
    prompts = random_prompts(3, LENGTHS[:3], 512)
    with radixlm.Engine(model_path=path, log_level="warning", tp_size=2, max_total_tokens=2048) as eng:
        assert_matches_hf(greedy_run(eng, prompts, NEW), prompts, ref, NEW, tol=1e-3)
        procs = list(eng._tp_procs)
    for p in procs:
        assert not p.is_alive() and p.exitcode == 0


def test_bench_runs_every_runner(model_factory):
    from radixlm.bench.moe import run, table

    res = run(model_factory("mixtral"), [2], input_len=8, output_len=3, repeats=1)
    assert set(res["decode"]) == {("torch_reference", 2), ("torch_grouped", 2)}
    assert all(v > 0 for v in res["decode"].values()) and all(v > 0 for v in res["layer"].values())
    assert "torch_grouped decode tok/s" in table(res, [2])


# ------------------------------------------------------------------------------------ server
def test_server_smoke_kv_returns_to_idle(model_factory):
    from tests.server_utils import ServerProcess, info_stat, wait_idle

    path = model_factory("mixtral")
    with ServerProcess(path, ["--moe-runner-backend", "torch_reference", "--max-total-tokens", "2048"]) as s:
        body = {"input_ids": [[5, 6, 7, 8, 9], [10, 11, 12]],
                "sampling_params": {"temperature": 0, "max_new_tokens": 6, "ignore_eos": True}}
        r = requests.post(s.base_url + "/generate", json=body, timeout=60)
        assert r.status_code == 200, r.text
        assert [len(o["output_ids"]) for o in r.json()] == [6, 6]
        info = wait_idle(s)
        free = info_stat(info, "free_kv_tokens") + info_stat(info, "evictable_kv_tokens")
        assert free == info_stat(info, "max_total_num_tokens")
        bad = requests.post(s.base_url + "/generate", json={"text": "hi", "sampling_params": {"max_new_tokens": -1}},
                            timeout=30)
        assert bad.status_code == 400
