"""Shared fixtures: tiny generated checkpoints (one per architecture, built once per session)
and HF transformers references computed on them."""

from __future__ import annotations

import os
import random
from typing import Dict, List, Tuple

import pytest
import torch

ARCHS = ["llama", "qwen2", "qwen3", "mistral"]

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# Without CUDA the Triton kernels run in Triton's interpreter, which TRITON_INTERPRET selects only if
# set before triton is first imported: set here, before any test module imports radixlm's kernels
# (tests/triton_env.py sets it too, for the kernel modules' own imports).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def model_factory(tmp_path_factory):
    from radixlm.tools.make_tiny_model import make_tiny_model

    cache: Dict[tuple, str] = {}

    def get(arch: str = "llama", **overrides) -> str:
        key = (arch, tuple(sorted(overrides.items())))
        if key not in cache:
            out = tmp_path_factory.mktemp(f"{arch}_model")
            cache[key] = str(make_tiny_model(out, arch=arch, **overrides))
        return cache[key]

    return get


def random_prompts(seed: int, lengths: List[int], vocab: int, avoid: Tuple[int, ...] = ()) -> List[List[int]]:
    rng = random.Random(seed)
    return [[t for t in (rng.randrange(vocab) for _ in range(4 * n)) if t not in avoid][:n] for n in lengths]


class HFReference:
    """Greedy continuation and chosen-token logprobs from HF transformers, cached per prompt."""

    def __init__(self, path: str):
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        self._cache: Dict[tuple, tuple] = {}

    @torch.inference_mode()
    def greedy(self, ids: List[int], n: int) -> Tuple[List[int], List[float]]:
        key = (tuple(ids), n)
        if key not in self._cache:
            out, lps = [], []
            seq = list(ids)
            for _ in range(n):  # full recompute each step: slow but free of any cache API
                logits = self.model(input_ids=torch.tensor([seq])).logits[0, -1].float()
                tid = int(logits.argmax())
                lps.append(float(torch.log_softmax(logits, -1)[tid]))
                out.append(tid)
                seq.append(tid)
            self._cache[key] = (out, lps)
        return self._cache[key]


def greedy_run(eng, prompts, new: int, **sp):
    """Greedy generation with output logprobs (ignore_eos: every prompt gets `new` tokens)."""
    params = {"temperature": 0, "max_new_tokens": new, "ignore_eos": True, **sp}
    return eng.generate(input_ids=prompts, sampling_params=params, return_logprob=True)


def assert_matches_hf(outs, prompts, ref: "HFReference", new: int, tol: float = 1e-4) -> None:
    """Each output's tokens equal HF's greedy continuation, its logprobs within `tol`."""
    for prompt, out in zip(prompts, outs):
        want, want_lp = ref.greedy(prompt, new)
        assert out["output_ids"] == want, f"prompt of {len(prompt)} tokens diverged"
        got_lp = [lp for lp, _, _ in out["meta_info"]["output_token_logprobs"]]
        assert max(abs(a - b) for a, b in zip(got_lp, want_lp)) < tol


@pytest.fixture(scope="session")
def hf_reference_factory():
    cache: Dict[str, HFReference] = {}

    def get(path: str) -> HFReference:
        if path not in cache:
            cache[path] = HFReference(path)
        return cache[path]

    return get


@pytest.fixture(scope="module")
def path(model_factory):
    """The tiny llama checkpoint most engine-level test modules share."""
    return model_factory("llama")


@pytest.fixture(scope="module")
def qwen2_path(model_factory):
    """The tiny qwen2 checkpoint (tied embeddings, qkv bias) the server-level modules share."""
    return model_factory("qwen2")


@pytest.fixture(scope="module")
def qwen2_server(qwen2_path):
    """One live server on `qwen2_path` per test module."""
    from tests.server_utils import ServerProcess

    with ServerProcess(qwen2_path) as s:
        yield s


@pytest.fixture(scope="module")
def eng(path):
    """One default Engine per test module on `path`."""
    import radixlm

    with radixlm.Engine(model_path=path, log_level="warning") as e:
        yield e
