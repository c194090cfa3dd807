"""The CPU model step's fast paths against their references.

`--enable-torch-compile` (radixlm/engine/cpu_compile_runner.py): the padded buckets run eagerly
(`compile=False`) give the logits of the plain eager step (padding rows touch KV slot 0 only);
compiled (slow, tiny model, one bucket each) they give the same logits and, through the Engine,
HF's greedy tokens. The torch_native decode attention with its per-step index and mask equals a
per-request SDPA over each request's own slots.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from radixlm.attention.forward_context import ForwardBatch
from radixlm.attention.torch_native import TorchNativeAttnBackend
from radixlm.core import ForwardMode, ScheduleBatch
from radixlm.engine.cpu_compile_runner import PADDING_SLOT, CpuCompileRunner, create_cpu_compile_runner
from radixlm.engine.model_runner import ModelRunner, RunnerConfig
from radixlm.mem.kv_pool import MHATokenToKVPool, ReqToTokenPool
from radixlm.models.model_config import ModelConfig
from tests.conftest import assert_matches_hf, greedy_run, random_prompts


def _runner(path: str, compile_flag: bool = False, max_bs: int = 8) -> ModelRunner:
    mc = ModelConfig.from_path(path, "float32", 256)
    return ModelRunner(mc, RunnerConfig(device="cpu", attention_backend="torch_native", max_total_tokens=2048,
                                        max_running_requests=8, enable_torch_compile=compile_flag,
                                        torch_compile_max_bs=max_bs))


def _decode_batch(runner: ModelRunner, lens, seed: int) -> ScheduleBatch:
    """A decode batch over random KV: request i has lens[i] cached tokens and decodes one more."""
    g = torch.Generator().manual_seed(seed)
    pool = runner.token_to_kv_pool
    for buf in pool.k_buffer + pool.v_buffer:
        buf.copy_(torch.randn(buf.shape, generator=g))
    reqs = []
    locs = []
    for n in lens:
        row = runner.req_to_token_pool.alloc()
        slots = runner.allocator.alloc(n + 1)
        runner.req_to_token_pool.write(row, 0, slots)
        reqs.append(SimpleNamespace(kv=SimpleNamespace(req_pool_idx=row)))
        locs.append(slots[n:n + 1])
    ids = torch.randint(3, 500, (len(lens),), generator=g).tolist()
    return ScheduleBatch(reqs, ForwardMode.DECODE, ids, torch.cat(locs), list(lens), [1] * len(lens),
                         [True] * len(lens))


def _kv_without_slot0(runner: ModelRunner):
    pool = runner.token_to_kv_pool
    return [b[PADDING_SLOT + 1:].clone() for b in pool.k_buffer + pool.v_buffer]


def test_off_by_default_and_off_where_unsupported(path, caplog):
    assert _runner(path).cpu_compile_runner is None
    fake = SimpleNamespace(cfg=RunnerConfig(device="cuda", enable_torch_compile=True), device="cuda")
    with caplog.at_level("WARNING", logger="radixlm.engine.cpu_compile_runner"):
        assert create_cpu_compile_runner(fake) is None
    assert "CUDA graphs" in caplog.records[0].getMessage()


def test_padded_buckets_match_the_plain_step(path):
    """compile=False: the bucket padding, index and mask of the compiled step, run eagerly."""
    runner = _runner(path)
    cr = CpuCompileRunner(runner, max_bs=8, compile=False)
    assert cr.buckets == [1, 2, 4, 8]
    batch = _decode_batch(runner, [5, 40, 17], seed=1)  # bucket 4: one padding row
    ref_logits, ref_hidden = runner.forward(batch)
    ref_logits, ref_kv = ref_logits.clone(), _kv_without_slot0(runner)
    logits, hidden = cr.run(batch)
    assert logits.shape == ref_logits.shape and hidden.shape == ref_hidden.shape
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    # the padding row wrote slot 0 only; the real rows' KV is the plain step's (a matmul over 4 rows
    # instead of 3 may sum in another order: equal up to rounding)
    for a, b in zip(_kv_without_slot0(runner), ref_kv):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_decode_attention_index_and_mask_match_per_request_sdpa():
    """Rows of different lengths, the key length rounded up past the longest: each row's output is
    SDPA over exactly its own slots."""
    torch.manual_seed(0)
    hq, hk, d = 4, 2, 8
    pool = MHATokenToKVPool(64, 1, hk, d, torch.float32, "cpu")
    pool.k_buffer[0].normal_()
    pool.v_buffer[0].normal_()
    rtp = ReqToTokenPool(4, 40, "cpu")
    lens = [3, 11, 7]
    slots = torch.randperm(63)[:sum(lens) + 3] + 1
    rows, off = [], 0
    for n in lens:
        r = rtp.alloc()
        rtp.write(r, 0, slots[off:off + n])
        rows.append(r)
        off += n
    loc = slots[off:off + 3]
    for r, n, s in zip(rows, lens, loc):  # the new token's slot is the row's last
        rtp.write(r, n - 1, s.view(1))
    be = TorchNativeAttnBackend()
    fb = ForwardBatch(ForwardMode.DECODE, torch.zeros(3, dtype=torch.long), torch.tensor(lens) - 1, loc,
                      torch.tensor(rows), torch.tensor(lens), torch.tensor(lens) - 1, torch.ones(3, dtype=torch.long),
                      lens, [n - 1 for n in lens], [1] * 3, rtp, pool, be)
    layer = SimpleNamespace(layer_id=0, num_heads=hq, num_kv_heads=hk, head_dim=d, scaling=d ** -0.5)
    q, k, v = torch.randn(3, hq * d), torch.randn(3, hk * d), torch.randn(3, hk * d)
    be.init_decode_metadata(fb, 32)  # rounded up like the compiled step
    out = be.forward_decode(q, k, v, layer, fb).view(3, hq, d)
    for i, (r, n) in enumerate(zip(rows, lens)):
        s = rtp.req_to_token[r, :n]
        ki = pool.k_buffer[0][s].transpose(0, 1)[None]
        vi = pool.v_buffer[0][s].transpose(0, 1)[None]
        want = F.scaled_dot_product_attention(q[i].view(1, hq, 1, d), ki, vi, scale=layer.scaling, enable_gqa=True)
        torch.testing.assert_close(out[i], want[0, :, 0], rtol=1e-5, atol=1e-5)
    assert torch.equal(pool.k_buffer[0][loc], k.view(3, hk, d))


@pytest.mark.slow
def test_compiled_step_matches_eager_and_grows_without_recompiling(path):
    """One bucket (4) compiled; two steps whose key lengths round to different sizes run on the one
    graph (the key length is dynamic) and give the eager step's logits."""
    runner = _runner(path, compile_flag=True, max_bs=4)
    cr = runner.cpu_compile_runner
    assert cr is not None and cr.use_compile
    for lens, seed in (([5, 40, 17], 1), ([70, 9, 33], 2)):
        batch = _decode_batch(runner, lens, seed)
        runner.cpu_compile_runner = None
        ref = runner.forward(batch)[0].clone()
        runner.cpu_compile_runner = cr
        got = runner.forward(batch)[0]
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
        assert torch.equal(got.argmax(-1), ref.argmax(-1))
        for r in batch.reqs:
            runner.req_to_token_pool.free(r.kv.req_pool_idx)
    assert list(cr.compile_s) == [4] and cr.num_runs == 2
    frames = torch._dynamo.utils.counters["stats"]
    assert frames["unique_graphs"] <= 1 + frames.get("graph_breaks", 0)


@pytest.mark.slow
def test_engine_with_torch_compile_matches_hf(path, hf_reference_factory):
    import radixlm

    prompts = random_prompts(7, [9], 500)
    with radixlm.Engine(model_path=path, device="cpu", attention_backend="torch_native", enable_torch_compile=True,
                        torch_compile_max_bs=1, log_level="warning") as eng:
        runner = eng.scheduler.runner
        assert runner.cfg.enable_torch_compile and runner.cpu_compile_runner is not None
        outs = greedy_run(eng, prompts, 8)
        assert runner.cpu_compile_runner.num_runs >= 7  # every decode step ran compiled
    assert_matches_hf(outs, prompts, hf_reference_factory(path), 8)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_matmul_decode_attention_matches_sdpa(dtype, tol):
    """decode_attention_matmul (bfloat16's CPU default) against SDPA with the same padded keys and mask."""
    from radixlm.attention.torch_native import decode_attention_matmul

    torch.manual_seed(1)
    b, hq, hk, d, length = 5, 6, 2, 16, 24
    q = torch.randn(b, hq, 1, d).to(dtype)
    keys, vals = torch.randn(b, hk, length, d).to(dtype), torch.randn(b, hk, length, d).to(dtype)
    lens = torch.tensor([1, 24, 7, 13, 24])
    mask = (torch.arange(length)[None, :] < lens[:, None])[:, None, None, :]
    want = F.scaled_dot_product_attention(q.float(), keys.float(), vals.float(), attn_mask=mask, scale=d ** -0.5,
                                          enable_gqa=True).reshape(b, hq * d)
    got = decode_attention_matmul(q, keys, vals, mask, d ** -0.5)
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol)


def test_decode_impl_is_selectable(monkeypatch):
    assert TorchNativeAttnBackend().decode_impl == "auto"
    monkeypatch.setenv("RADIXLM_TORCH_NATIVE_DECODE", "sdpa")
    assert TorchNativeAttnBackend().decode_impl == "sdpa"
    with pytest.raises(ValueError, match="decode attention"):
        TorchNativeAttnBackend(decode_impl="flash")
