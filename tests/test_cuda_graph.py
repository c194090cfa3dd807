"""CUDA graphs for decode (`radixlm/engine/cuda_graph_runner.py`).

On CPU the padded buckets run eagerly (`CudaGraphRunner(..., use_graphs=False)`) with the triton
kernels in Triton's interpreter: same logits and greedy tokens as the unpadded eager step, and no
KV slot but the padding slot 0 touched by the padding rows. With CUDA, the `@pytest.mark.gpu` tests
replay captured graphs (`pytest -m gpu tests/test_cuda_graph.py`). Skipped only where triton is not
installed (tests/triton_env.py).
"""

from __future__ import annotations

import logging
import random
from types import SimpleNamespace
from typing import Optional

import pytest
import torch

from tests.triton_env import require_triton  # noqa: E402  (sets TRITON_INTERPRET before any triton import)

require_triton()

from radixlm.attention.torch_native import TorchNativeAttnBackend  # noqa: E402
from radixlm.core import ForwardMode, ReqKV, ScheduleBatch  # noqa: E402
from radixlm.engine.cuda_graph_runner import (  # noqa: E402
    PADDING_SLOT,
    CudaGraphRunner,
    capture_bucket_sizes,
    create_cuda_graph_runner,
    resolve_cuda_graph_max_bs,
)
from radixlm.engine.model_runner import ModelRunner, RunnerConfig  # noqa: E402
from radixlm.mem.allocator import TokenToKVPoolAllocator  # noqa: E402
from radixlm.mem.kv_pool import ReqToTokenPool  # noqa: E402
from radixlm.models.model_config import ModelConfig  # noqa: E402

CUDA = torch.cuda.is_available()
gpu = pytest.mark.skipif(not CUDA, reason="needs CUDA")

# the interpreter is slow: 2 layers, 2 q heads over 1 kv head (head_dim 24, padded to 32)
SMALL_SHAPE = dict(num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)


# ---------------------------------------------------------------------------------------- pure logic
def test_bucket_sizes():
    assert capture_bucket_sizes(160) == [1, 2, 4, 8] + list(range(16, 161, 8))
    assert capture_bucket_sizes(20) == [1, 2, 4, 8, 16, 20]
    assert capture_bucket_sizes(13) == [1, 2, 4, 8, 13]
    assert capture_bucket_sizes(8) == [1, 2, 4, 8]
    assert capture_bucket_sizes(3) == [1, 2, 3]
    assert capture_bucket_sizes(1) == [1]
    with pytest.raises(ValueError):
        capture_bucket_sizes(0)


def test_default_max_bs_by_gpu_size(monkeypatch):
    def gpu_of(gib):
        monkeypatch.setattr(torch.cuda, "get_device_properties",
                            lambda dev: SimpleNamespace(total_memory=gib << 30, multi_processor_count=132))

    gpu_of(141)
    assert resolve_cuda_graph_max_bs(None, 256, "cuda") == 160
    assert resolve_cuda_graph_max_bs(None, 48, "cuda") == 48  # never above max_running_requests
    gpu_of(16)
    assert resolve_cuda_graph_max_bs(None, 256, "cuda") == 8
    assert resolve_cuda_graph_max_bs(300, 256, "cuda") == 256
    assert resolve_cuda_graph_max_bs(24, 256, "cuda") == 24


def test_padding_row_and_slot_never_handed_out():
    pool = ReqToTokenPool(5, 8, "cpu")
    rows = [pool.alloc() for _ in range(4)]
    assert pool.padding_row == 4 and sorted(rows) == [0, 1, 2, 3] and pool.alloc() is None
    with pytest.raises(RuntimeError):
        pool.free(pool.padding_row)
    for page_size in (1, 4):
        alloc = TokenToKVPoolAllocator(32, page_size)
        slots = alloc.alloc(32)
        assert slots is not None and PADDING_SLOT not in slots.tolist() and alloc.alloc(1) is None


def test_graphs_off_for_uncapturable_backend_and_when_disabled(caplog):
    def fake_runner(**cfg):
        return SimpleNamespace(cfg=RunnerConfig(device="cuda", **cfg), device="cuda",
                               attn_backend=TorchNativeAttnBackend())

    with caplog.at_level(logging.INFO, logger="radixlm.engine.cuda_graph_runner"):
        assert create_cuda_graph_runner(fake_runner(disable_cuda_graph=True)) is None
        assert not caplog.records  # disabled on purpose: nothing to explain
        assert create_cuda_graph_runner(fake_runner()) is None
    assert len(caplog.records) == 1 and "TorchNativeAttnBackend" in caplog.records[0].getMessage()


def test_flags_reach_the_runner(model_factory):
    import radixlm
    from radixlm.launch_server import make_parser, parse_args
    from radixlm.server_args import ServerArgs

    args = parse_args(["--model-path", "m", "--cuda-graph-max-bs", "24", "--disable-cuda-graph"])
    assert args.cuda_graph_max_bs == 24 and args.disable_cuda_graph is True
    defaults = parse_args(["--model-path", "m"])
    assert defaults.cuda_graph_max_bs is None and defaults.disable_cuda_graph is False
    assert "--cuda-graph-max-bs" in make_parser().format_help()
    with pytest.raises(ValueError, match="cuda_graph_max_bs"):
        ServerArgs(model_path="m", cuda_graph_max_bs=0)
    with radixlm.Engine(model_path=model_factory("llama"), device="cpu", cuda_graph_max_bs=4, disable_cuda_graph=True,
                        log_level="warning") as eng:
        runner = eng.scheduler.runner
        assert runner.cfg.cuda_graph_max_bs == 4 and runner.cfg.disable_cuda_graph is True
        assert runner.cuda_graph_runner is None


# ---------------------------------------------------------------------------------------- padding
def _runner(path: str, device: str, graphs: bool, max_bs: Optional[int] = 16, max_running: int = 16,
            backend: str = "triton") -> ModelRunner:
    mc = ModelConfig.from_path(path, "float32", 256)
    return ModelRunner(mc, RunnerConfig(device=device, attention_backend=backend, max_total_tokens=2048,
                                        max_running_requests=max_running, cuda_graph_max_bs=max_bs,
                                        disable_cuda_graph=not graphs))


def _randomise_kv(runner: ModelRunner, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    pool = runner.token_to_kv_pool
    for buf in pool.k_buffer + pool.v_buffer:
        buf.copy_(torch.randn(buf.shape, generator=g))


def _kv(runner: ModelRunner):
    pool = runner.token_to_kv_pool
    return [b.clone() for b in pool.k_buffer + pool.v_buffer]


def _restore_kv(runner: ModelRunner, saved) -> None:
    pool = runner.token_to_kv_pool
    for buf, s in zip(pool.k_buffer + pool.v_buffer, saved):
        buf.copy_(s)


class DecodeCase:
    """bs decoding requests with mixed cached lengths (some shorter than the number of KV splits),
    plus 2 bystander requests with cached KV that are not in the batch. `close()` frees everything."""

    def __init__(self, runner: ModelRunner, bs: int, seed: int, ids_as_tensor: bool = False):
        rng = random.Random(seed)
        self.runner = runner
        r2t, alloc = runner.req_to_token_pool, runner.allocator
        self.rows = [r2t.alloc() for _ in range(bs + 2)]
        lens = [rng.randrange(3, 40) for _ in range(bs + 2)]
        lens[0], lens[1] = 0, 1  # decoding their 1st / 2nd token: fewer tokens than KV splits
        self.slots = []
        for row, n in zip(self.rows, lens):
            s = alloc.alloc(n)
            r2t.write(row, 0, s)
            self.slots.append(s)
        self.loc = alloc.alloc(bs)
        pre = lens[:bs]
        for i, (row, n) in enumerate(zip(self.rows, pre)):
            r2t.req_to_token[row, n] = self.loc[i]
        ids = [rng.randrange(3, runner.model_config.vocab_size) for _ in range(bs)]
        if ids_as_tensor:
            ids = torch.tensor(ids, device=runner.device)
        reqs = [SimpleNamespace(kv=ReqKV(req_pool_idx=r)) for r in self.rows[:bs]]
        self.batch = ScheduleBatch(reqs, ForwardMode.DECODE, ids, self.loc, pre, [1] * bs, [True] * bs)

    def close(self) -> None:
        for row in self.rows:
            self.runner.req_to_token_pool.free(row)
        self.runner.allocator.free(torch.cat(self.slots + [self.loc]))


def check_padded_matches_eager(runner: ModelRunner, graphs: CudaGraphRunner, bs: int, seed: int,
                               ids_as_tensor: bool = False, tol: float = 1e-4) -> None:
    _randomise_kv(runner, seed)
    case = DecodeCase(runner, bs, seed, ids_as_tensor)
    try:
        assert graphs.can_run(case.batch) and graphs.bucket_for(bs) > bs  # really padded
        before = _kv(runner)
        r2t_before = runner.req_to_token_pool.req_to_token.clone()
        held, runner.cuda_graph_runner = runner.cuda_graph_runner, None
        try:
            eager, _ = runner.forward(case.batch)
        finally:
            runner.cuda_graph_runner = held
        after_eager = _kv(runner)
        _restore_kv(runner, before)
        replays = graphs.num_replays
        padded, hidden = graphs.replay(case.batch)
        after_padded = _kv(runner)

        assert graphs.num_replays == replays + 1
        assert padded.shape == eager.shape == (bs, runner.model_config.vocab_size) and hidden.shape[0] == bs
        torch.testing.assert_close(padded, eager, atol=tol, rtol=tol)
        assert torch.equal(padded.argmax(-1), eager.argmax(-1))  # same greedy tokens
        assert torch.equal(runner.req_to_token_pool.req_to_token, r2t_before)
        new = case.loc.to(runner.device)
        untouched = torch.ones(before[0].shape[0], dtype=torch.bool, device=runner.device)
        untouched[new] = False
        untouched[PADDING_SLOT] = False
        for b, e, p in zip(before, after_eager, after_padded):
            assert torch.equal(p[untouched], b[untouched])  # bystanders' and the batch's cached KV
            torch.testing.assert_close(p[new], e[new], atol=tol, rtol=tol)  # this step's KV
            assert not torch.equal(p[PADDING_SLOT], b[PADDING_SLOT])  # the padding rows wrote slot 0
    finally:
        case.close()


@pytest.fixture(scope="module")
def cpu_runner(model_factory):
    runner = _runner(model_factory("qwen3", **SMALL_SHAPE), "cpu", graphs=False)
    runner.attn_backend.max_kv_splits = 2  # fewer interpreted programs (CPU default: 4)
    return runner, CudaGraphRunner(runner, 16, use_graphs=False)


@pytest.mark.parametrize("bs,ids_as_tensor", [(3, False), (5, True), (9, False)])
def test_padded_bucket_matches_unpadded_eager(cpu_runner, bs, ids_as_tensor):
    runner, graphs = cpu_runner
    assert runner.cuda_graph_runner is None  # never on CPU
    assert graphs.buckets == [1, 2, 4, 8, 16]
    # the fixed split count exceeds the shortest request's length (1 token: one split stays empty)
    assert runner.attn_backend.graph_num_splits(graphs.bucket_for(bs)) == 2
    check_padded_matches_eager(runner, graphs, bs, seed=bs, ids_as_tensor=ids_as_tensor)


def test_can_run_only_plain_decode_within_max_bs(cpu_runner):
    runner, graphs = cpu_runner
    loc = torch.zeros(1, dtype=torch.long)

    def batch(mode, bs, ranges=()):
        return ScheduleBatch([SimpleNamespace(kv=ReqKV(req_pool_idx=0))] * bs, mode, [1] * bs, loc, [0] * bs, [1] * bs,
                             [True] * bs, list(ranges))

    assert graphs.can_run(batch(ForwardMode.DECODE, 16))
    assert not graphs.can_run(batch(ForwardMode.DECODE, 17))
    assert not graphs.can_run(batch(ForwardMode.EXTEND, 2))
    assert not graphs.can_run(batch(ForwardMode.DECODE, 2, [None, (0, 1)]))


# ---------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@gpu
def test_gpu_capture_buckets(model_factory):
    path = model_factory("qwen3")
    runner = _runner(path, "cuda", graphs=True, max_bs=20, max_running=32)
    gr = runner.cuda_graph_runner
    assert gr is not None and gr.use_graphs and gr.buckets == [1, 2, 4, 8, 16, 20]
    assert sorted(gr.graphs) == gr.buckets and sorted(gr.outputs) == gr.buckets and gr.capture_s > 0
    assert gr.outputs[20][0].shape == (20, runner.model_config.vocab_size)
    del runner, gr
    capped = _runner(path, "cuda", graphs=True, max_bs=None, max_running=6)
    assert capped.cuda_graph_runner.buckets == [1, 2, 4, 6]  # default max bs, capped at max_running_requests
    del capped
    assert _runner(path, "cuda", graphs=False).cuda_graph_runner is None
    assert _runner(path, "cuda", graphs=True, backend="torch_native").cuda_graph_runner is None


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("bs,ids_as_tensor", [(3, False), (5, True), (9, False), (13, False)])
def test_gpu_replay_matches_eager(model_factory, bs, ids_as_tensor):
    """fp32 on the GPU: graph replay (padded) against the eager step; KV of others untouched."""
    runner = _runner(model_factory("qwen3"), "cuda", graphs=True)
    check_padded_matches_eager(runner, runner.cuda_graph_runner, bs, seed=bs, ids_as_tensor=ids_as_tensor,
                               tol=2e-4)


def _engine_run(path, disable: bool, prompts, max_new):
    import radixlm

    sps = [{"temperature": 0, "max_new_tokens": n, "ignore_eos": True} for n in max_new]
    with radixlm.Engine(model_path=path, device="cuda", dtype="bfloat16", attention_backend="triton",
                        max_total_tokens=16384, max_running_requests=16, cuda_graph_max_bs=16,
                        disable_cuda_graph=disable, log_level="warning") as eng:
        gr = eng.scheduler.runner.cuda_graph_runner
        assert (gr is None) == disable
        outs = eng.generate(input_ids=prompts, sampling_params=sps, return_logprob=True, top_logprobs_num=2)
        if not disable:
            assert gr.num_replays >= max(max_new) - 1  # every decode step replayed a graph
    return outs


@pytest.mark.gpu
@gpu
def test_gpu_engine_greedy_graph_matches_eager(model_factory):
    """bf16 through the whole Engine, 32 greedy tokens: 9 requests finishing at different steps (decode
    batches of 9, 8, 7, 6, 5, all padded except 8), then one alone. Graph and eager differ only in bf16
    rounding (padded GEMMs, fixed KV splits), so a divergence is accepted only at a near-tie of the
    eager run's top-2 logprobs."""
    path = model_factory("qwen3", size="small", dtype="bfloat16")
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 2000) for _ in range(n)] for n in (5, 17, 40, 90, 200, 33, 64, 128, 7)]
    max_new = [32] * 5 + [8, 14, 20, 26]
    runs = {d: _engine_run(path, d, prompts, max_new) + _engine_run(path, d, prompts[:1], [32])
            for d in (True, False)}
    for eager, graph in zip(runs[True], runs[False]):
        a, b = eager["output_ids"], graph["output_ids"]
        assert len(a) == len(b)
        k = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
        if k < len(a):
            top2 = eager["meta_info"]["output_top_logprobs"][k]
            assert top2[0][0] - top2[1][0] < 0.25, (k, a, b, top2)
