"""Multi-LoRA serving: PEFT adapters made here with `peft` on the tiny llama checkpoint, against HF
transformers + peft greedy decoding.

Adapters: `all8` (rank 8, every projection) and `qv16` (rank 16, q_proj/v_proj only), both with a
random (non-zero) B so that their outputs differ from the base model's. Covered: the segmented LoRA
delta (grouped torch and the Triton kernels under the interpreter) against the per-row reference;
one mixed batch of base + both adapters with chunked prefill and the radix cache equal to HF + peft;
no cache sharing across adapters; the slot pool smaller than the adapters in use; bad adapters as
clear errors; and over HTTP: per-prompt lora_path, OpenAI `model: "base:adapter"`, /v1/models, run-time
load and unload (refused while in use), 400s, KV back to idle.
"""

from __future__ import annotations

import os
import shutil
from typing import Dict, List, Optional

import pytest
import requests
import torch

pytest.importorskip("peft")

from radixlm.lora.layers import LoRABatchInfo  # noqa: E402
from radixlm.lora.ops import lora_delta_grouped, lora_delta_reference  # noqa: E402
from tests.sched_harness import assert_idle_and_clean  # noqa: E402

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTERS = {"all8": (8, ALL), "qv16": (16, ["q_proj", "v_proj"])}
NEW = 6
GREEDY = {"temperature": 0, "max_new_tokens": NEW, "ignore_eos": True}


def make_adapter(base_path: str, out_dir: str, rank: int, targets: List[str], seed: int) -> str:
    """A PEFT LoRA adapter with random A and B (init_lora_weights=False), saved as PEFT does."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, lora_dropout=0.0, init_lora_weights=False)
    get_peft_model(model, cfg).save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="module")
def lora_env(path, tmp_path_factory):
    """(base checkpoint, {adapter name: directory}, greedy reference)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("adapters")
    dirs = {n: make_adapter(path, str(root / n), r, t, seed=i + 1) for i, (n, (r, t)) in enumerate(ADAPTERS.items())}
    models: Dict[Optional[str], object] = {None: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)}
    for n, d in dirs.items():
        models[n] = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), d)
    cache: Dict[tuple, List[int]] = {}

    @torch.inference_mode()
    def greedy(adapter: Optional[str], ids: List[int], n: int = NEW) -> List[int]:
        key = (adapter, tuple(ids), n)
        if key not in cache:
            seq, out = list(ids), []
            for _ in range(n):
                tid = int(models[adapter].eval()(input_ids=torch.tensor([seq])).logits[0, -1].argmax())
                out.append(tid)
                seq.append(tid)
            cache[key] = out
        return cache[key]

    return path, dirs, greedy


PROMPTS = [[5 + 3 * i + j for j in range(7 + 5 * i)] for i in range(3)]  # 7, 12, 17 tokens


def mixed(names):
    """Every prompt under every adapter name, interleaved (one batch mixes them all)."""
    return [p for p in PROMPTS for _ in names], [n for _ in PROMPTS for n in names]


# ---------------------------------------------------------------------------------------- kernels
def _random_case(seed=0, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    S, R, K = 3, 16, 40
    pieces_sizes = [24, 8, 8]  # a packed qkv
    pieces = [(0, 24), (24, 8), (32, 8)]
    A = torch.randn(S, 3 * R, K, generator=g)
    B = torch.randn(S, sum(pieces_sizes), R, generator=g)
    A[1, :, :][R - 4:R] = 0  # slot 1 holds a rank-12 adapter, zero-padded
    lens, slots = [5, 1, 7, 3, 1, 20, 2], [0, -1, 2, 0, 1, -1, 2]
    x = torch.randn(sum(lens), K, generator=g)
    info = LoRABatchInfo.build(slots, lens, device)
    return [t.to(device, dtype) for t in (x, A, B)], pieces, info


def test_grouped_lora_delta_matches_per_row_reference():
    (x, A, B), pieces, info = _random_case()
    want = lora_delta_reference(x, A, B, pieces, info.row_slots)
    base = torch.randn(x.shape[0], B.shape[1])
    got = lora_delta_grouped(x, A, B, pieces, info.groups, base.clone())
    torch.testing.assert_close(got - base, want, rtol=1e-4, atol=1e-4)
    assert (want[[5]] == 0).all()  # a base row gets no delta
    assert info.seg_slots == [0, -1, 2, 0, 1, -1, 2] and info.seg_lens == [5, 1, 7, 3, 1, 20, 2]
    merged = LoRABatchInfo.build([1, 1, -1, -1, 1], [2, 3, 1, 1, 4], "cpu")
    assert merged.seg_slots == [1, -1, 1] and merged.seg_lens == [5, 2, 4]


def _check_triton_sgmv(dtype, tol):
    pytest.importorskip("triton")
    from radixlm.lora.triton_ops import lora_delta_triton
    from tests.triton_env import DEVICE  # (sets the interpreter before triton loads)

    (x, A, B), pieces, info = _random_case(seed=1, dtype=dtype, device=DEVICE)
    want = lora_delta_reference(x.float(), A.float(), B.float(), pieces, info.row_slots)
    base = torch.randn(x.shape[0], B.shape[1], device=DEVICE, dtype=dtype)
    got = lora_delta_triton(x, A, B, pieces, info.seg_indptr, info.seg_slots_t, base.clone())
    torch.testing.assert_close((got.float() - base.float()), want, rtol=tol, atol=tol * 10)


def test_triton_sgmv_matches_per_row_reference():
    _check_triton_sgmv(torch.float32, 1e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_triton_sgmv_bf16_on_gpu_matches_reference():
    """The compiled kernel (not the interpreter) in the serving dtype; run by scripts/gpu_check.sh."""
    _check_triton_sgmv(torch.bfloat16, 3e-2)


# ---------------------------------------------------------------------------------------- engine
def test_mixed_batch_matches_hf_peft_with_chunking_and_radix_cache(lora_env):
    import radixlm

    path, dirs, greedy = lora_env
    names = [None, "all8", "qv16"]
    prompts, loras = mixed(names)
    with radixlm.Engine(model_path=path, lora_paths=[f"{n}={d}" for n, d in dirs.items()], chunked_prefill_size=8,
                        enable_debug_integrity_check=True, log_level="warning") as eng:
        for round_ in range(2):  # the second round is served from each adapter's own cached prefix
            outs = eng.generate(input_ids=prompts, sampling_params=GREEDY, lora_path=loras)
            for p, n, o in zip(prompts, loras, outs):
                assert o["output_ids"] == greedy(n, p), (n, len(p), round_)
                cached = o["meta_info"]["cached_tokens"]
                assert cached == (0 if round_ == 0 else len(p) - 1), (n, round_)  # never another adapter's KV
        by = {n: [o["output_ids"] for o, m in zip(outs, loras) if m == n] for n in names}
        assert by[None] != by["all8"] and by[None] != by["qv16"] and by["all8"] != by["qv16"]
        eng.loop.call(assert_idle_and_clean)


def test_fewer_slots_than_adapters_swaps_them_in(lora_env):
    """Two slots for base + two adapters: a batch never holds more, adapters move in and out of the
    slots from host memory, and every output is still HF + peft's."""
    import radixlm

    path, dirs, greedy = lora_env
    prompts, loras = mixed(["all8", None, "qv16"])
    with radixlm.Engine(model_path=path, lora_paths=[f"{n}={d}" for n, d in dirs.items()], max_loras_per_batch=2,
                        enable_debug_integrity_check=True, log_level="warning") as eng:
        lm = eng.scheduler.runner.lora_manager
        seen = []
        prepare = lm.prepare

        def spy(names, lens):
            seen.append(set(names))
            return prepare(names, lens)

        lm.prepare = spy
        outs = eng.generate(input_ids=prompts, sampling_params=GREEDY, lora_path=loras)
        for p, n, o in zip(prompts, loras, outs):
            assert o["output_ids"] == greedy(n, p)
        assert max(len(s) for s in seen) <= 2 and lm.num_slot_loads >= 2
        eng.loop.call(assert_idle_and_clean)


def test_bad_adapters_are_clear_errors_and_the_engine_keeps_serving(lora_env, tmp_path):
    import radixlm

    path, dirs, greedy = lora_env
    with radixlm.Engine(model_path=path, lora_paths=[f"all8={dirs['all8']}"], max_lora_rank=8,
                        log_level="warning") as eng:
        with pytest.raises(ValueError, match="unknown LoRA adapter 'nope'"):
            eng.generate(input_ids=PROMPTS[0], sampling_params=GREEDY, lora_path="nope")
        with pytest.raises(ValueError, match="rank 16 is above --max-lora-rank 8"):
            eng.load_lora_adapter("qv16", dirs["qv16"])
        corrupt = tmp_path / "corrupt"
        shutil.copytree(dirs["all8"], corrupt)
        st = corrupt / "adapter_model.safetensors"
        st.write_bytes(st.read_bytes()[:100])
        with pytest.raises(ValueError, match="corrupt or unreadable"):
            eng.load_lora_adapter("c", str(corrupt))
        alien = tmp_path / "alien"
        shutil.copytree(dirs["all8"], alien)
        from safetensors.torch import load_file, save_file

        w = load_file(str(alien / "adapter_model.safetensors"))
        save_file({k.replace("o_proj", "fc_proj"): v for k, v in w.items()}, str(alien / "adapter_model.safetensors"))
        with pytest.raises(ValueError, match="target module 'fc_proj' does not exist"):
            eng.load_lora_adapter("alien", str(alien))
        with pytest.raises(ValueError, match="not a directory"):
            eng.load_lora_adapter("missing", str(tmp_path / "missing"))
        assert eng.load_lora_adapter("again", dirs["all8"]) == {"all8": dirs["all8"], "again": dirs["all8"]}
        out = eng.generate(input_ids=PROMPTS[1], sampling_params=GREEDY, lora_path="again")
        assert out["output_ids"] == greedy("all8", PROMPTS[1])
        assert eng.unload_lora_adapter("again") == {"all8": dirs["all8"]}
        with pytest.raises(ValueError, match="unknown LoRA adapter 'again'"):
            eng.generate(input_ids=PROMPTS[1], sampling_params=GREEDY, lora_path="again")
    with pytest.raises(ValueError, match="lora_target_modules"):
        radixlm.Engine(model_path=path, lora_paths=[f"all8={dirs['all8']}"], lora_target_modules=["mlp"])
    with radixlm.Engine(model_path=path, enable_lora=True, lora_target_modules=["q_proj", "v_proj"],
                        log_level="warning") as eng:
        with pytest.raises(ValueError, match="target modules down_proj, gate_proj, k_proj, o_proj, up_proj are "
                                             "not enabled"):
            eng.load_lora_adapter("all8", dirs["all8"])
        eng.load_lora_adapter("qv16", dirs["qv16"])  # max rank 64 by default
        assert eng.generate(input_ids=PROMPTS[2], sampling_params=GREEDY, lora_path="qv16")["output_ids"] == \
            greedy("qv16", PROMPTS[2])


# ---------------------------------------------------------------------------------------- server
@pytest.mark.slow
def test_server_routes_load_unload_and_errors(lora_env, tmp_path):
    from tests.server_utils import ServerProcess, info_stat, wait_idle

    path, dirs, greedy = lora_env
    with ServerProcess(path, ["--lora-paths", f"all8={dirs['all8']}", "--max-loras-per-batch", "3",
                              "--max-lora-rank", "16", "--chunked-prefill-size", "8"]) as srv:
        url = srv.base_url
        models = requests.get(url + "/v1/models", timeout=30).json()["data"]
        assert [m["id"] for m in models] == [path, f"{path}:all8"]
        assert requests.get(url + f"/v1/models/{path}:all8", timeout=30).json()["parent"] == path
        r = requests.post(url + "/load_lora_adapter", json={"lora_name": "qv16", "lora_path": dirs["qv16"]},
                          timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["loaded_adapters"] == {"all8": dirs["all8"], "qv16": dirs["qv16"]}
        prompts, loras = mixed([None, "all8", "qv16"])
        r = requests.post(url + "/generate", json={"input_ids": prompts, "sampling_params": GREEDY,
                                                   "lora_path": loras}, timeout=60)
        assert r.status_code == 200, r.text
        for p, n, o in zip(prompts, loras, r.json()):
            assert o["output_ids"] == greedy(n, p), n
        r = requests.post(url + "/v1/completions", json={"model": f"{path}:qv16", "prompt": PROMPTS[1],
                                                         "max_tokens": NEW, "temperature": 0}, timeout=60)
        assert r.status_code == 200, r.text
        ids = requests.post(url + "/generate", json={"input_ids": PROMPTS[1], "sampling_params": GREEDY,
                                                     "lora_path": "qv16"}, timeout=60).json()["output_ids"]
        assert ids == greedy("qv16", PROMPTS[1])
        # errors: 400 naming the problem; the server keeps serving
        r = requests.post(url + "/generate", json={"input_ids": PROMPTS[0], "lora_path": "nope"}, timeout=30)
        assert r.status_code == 400 and "unknown LoRA adapter 'nope'" in r.text
        r = requests.post(url + "/v1/chat/completions", json={"model": "x:nope", "messages": [
            {"role": "user", "content": "hi"}]}, timeout=30)
        assert r.status_code == 400 and "nope" in r.text
        bad = tmp_path / "bad"
        os.makedirs(bad)
        (bad / "adapter_config.json").write_text("{not json")
        r = requests.post(url + "/load_lora_adapter", json={"lora_name": "bad", "lora_path": str(bad)}, timeout=30)
        assert r.status_code == 400 and "adapter_config.json is not valid JSON" in r.json()["error_message"]
        # unloading an adapter in use is refused; once its requests finish it goes
        body = {"input_ids": PROMPTS[0], "lora_path": "qv16", "stream": True,
                "sampling_params": {"temperature": 0, "max_new_tokens": 2000, "ignore_eos": True}}
        with requests.post(url + "/generate", json=body, stream=True, timeout=60) as s:
            lines = s.iter_lines(chunk_size=1)  # kept: a dropped iterator closes the stream (an abort)
            first = next(lines)
            assert first.startswith(b"data:") and b"abort" not in first, first  # a first token: it runs
            r = requests.post(url + "/unload_lora_adapter", json={"lora_name": "qv16"}, timeout=30)
            assert r.status_code == 400 and "in use" in r.json()["error_message"], r.text
            assert requests.post(url + "/abort_request", json={"abort_all": True}, timeout=30).status_code == 200
        info = wait_idle(url)
        r = requests.post(url + "/unload_lora_adapter", json={"lora_name": "qv16"}, timeout=30)
        assert r.status_code == 200 and r.json()["loaded_adapters"] == {"all8": dirs["all8"]}
        r = requests.post(url + "/generate", json={"input_ids": PROMPTS[0], "lora_path": "qv16"}, timeout=30)
        assert r.status_code == 400
        info = wait_idle(url)
        assert info_stat(info, "protected_kv_tokens") == 0
        assert info_stat(info, "free_kv_tokens") + info_stat(info, "evictable_kv_tokens") == \
            info_stat(info, "max_total_num_tokens")
