"""Fused Triton layer kernels (`radixlm/layers/triton_ops`) against the layers' torch references
(`forward_native` of RMSNorm, SiluAndMul, RotaryEmbedding), and the dispatch between them.

On a machine without CUDA the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set before
triton is imported) on tiny shapes; float32 must agree to ~1e-5. The interpreter casts fp32 -> bf16
by truncation, not round-to-nearest, so on CPU bf16 is compared within 3e-2 of the output's scale
and, exactly, to the reference's math re-expressed with explicit casts (`emu_*`) done by truncation:
this checks that the kernels round at the reference's points. With CUDA the `@pytest.mark.gpu`
tests run real shapes (Llama-3-8B: hidden 4096, intermediate 14336,
32/8 heads of 128), where bf16 must also be bit-equal to the reference almost everywhere (same
rounding points), and a whole tiny model's logits with fused kernels on and off. (Their speed is
measured by `python -m radixlm.bench.gpu`, line `fused_kernels`, not asserted here.)
Skipped entirely when triton is not installed.
"""

from __future__ import annotations

import importlib
import os
from types import SimpleNamespace

import pytest
import torch

from radixlm.layers import triton_ops  # noqa: E402
from radixlm.layers.activation import SiluAndMul  # noqa: E402
from radixlm.layers.layernorm import RMSNorm  # noqa: E402
from radixlm.layers.rotary_embedding import RotaryEmbedding  # noqa: E402
from radixlm.layers.triton_ops import kernels as K  # noqa: E402
from tests.triton_env import CUDA, DEVICE, gpu  # noqa: E402,F401  (before any triton import)

DTYPES = [torch.float32, torch.bfloat16]


# ---------------------------------------------------------------------------------------- helpers
def assert_matches(out, ref, bit_exact_frac=None):
    """fp32: within 1e-5. bf16: max error within 3e-2 of the reference's largest value (up to three
    roundings, which truncate on CPU: 3 ulps <= 3 * 2^-7); with `bit_exact_frac`, at least that
    fraction of elements bit-equal."""
    assert out.shape == ref.shape and out.dtype == ref.dtype, (out.shape, ref.shape, out.dtype, ref.dtype)
    if out.dtype == torch.float32:
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    else:
        err = (out.float() - ref.float()).abs().max().item()
        scale = max(ref.float().abs().max().item(), 1e-6)
        assert err <= 3e-2 * scale, f"max error {err} vs scale {scale}"
    if bit_exact_frac is not None:
        frac = (out == ref).float().mean().item()
        assert frac >= bit_exact_frac, f"only {frac:.5f} of elements bit-equal to the reference"


# The reference's math with its casts made explicit: `emulate(cast)` with round-to-nearest casts is
# bit-equal to forward_native, and the kernel must be bit-equal to it with the casts of the platform
# it runs on (round-to-nearest on a GPU, truncation in Triton 3.6-3.9's interpreter). This checks on
# CPU that the kernels round at the reference's points and in its dtypes.
def _round_nearest(x, dtype):
    return x.to(dtype)


def _truncate(x, dtype):
    if dtype == torch.float32:
        return x.float()
    assert dtype == torch.bfloat16
    return (x.float().contiguous().view(torch.int32) & -65536).view(torch.float32).to(dtype)


def assert_same_rounding(out, ref, emulate):
    assert_matches(out, ref)
    if out.dtype == torch.float32:
        return
    assert torch.equal(emulate(_round_nearest), ref), "the emulation is not the reference"
    frac = max((out == emulate(cast)).float().mean().item() for cast in (_round_nearest, _truncate))
    assert frac >= 0.99, f"only {frac:.4f} of elements bit-equal to the reference's rounding"


def emu_rmsnorm(x, weight, eps, residual=None):
    def run(cast):
        xf = x.float() if residual is None else cast(x.float() + residual.float(), x.dtype).float()
        normed = cast(xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps), x.dtype).float()
        out = cast(normed * weight.float(), torch.promote_types(x.dtype, weight.dtype))
        return out if residual is None else torch.cat([out.flatten(), cast(xf, x.dtype).flatten()])
    return run


def emu_silu_and_mul(x):
    def run(cast):
        d = x.shape[-1] // 2
        gate, up = x[..., :d].float(), x[..., d:].float()
        return cast(cast(gate / (1 + torch.exp(-gate)), x.dtype).float() * up, x.dtype)
    return run


def emu_rotary(positions, x, cos_cache, sin_cache):
    def run(cast):
        cos = cast(cos_cache[positions], x.dtype).float()[:, None]
        sin = cast(sin_cache[positions], x.dtype).float()[:, None]
        h = x.shape[-1] // 2
        xf = x.float()
        rotated = torch.cat((-xf[..., h:], xf[..., :h]), dim=-1)
        return cast(cast(xf * cos, x.dtype).float() + cast(rotated * sin, x.dtype).float(), x.dtype)
    return run


def make_norm(n, dtype, seed=0, device=DEVICE, weight_dtype=None):
    g = torch.Generator().manual_seed(seed)
    norm = RMSNorm(n, 1e-6, params_dtype=weight_dtype or dtype).to(device)
    norm.weight.data.copy_(torch.randn(n, generator=g) * 0.5 + 1.0)
    return norm


def randn(*shape, dtype, seed=0, device=DEVICE, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(device, dtype)


def qkv_views(t, hq, hk, d, dtype, seed=0, device=DEVICE):
    """q [T, Hq, D] and k [T, Hk, D] as strided views of one packed qkv row, as the model makes them."""
    qkv = randn(t, (hq + 2 * hk) * d, dtype=dtype, seed=seed, device=device)
    return qkv[:, :hq * d].reshape(t, hq, d), qkv[:, hq * d:(hq + hk) * d].reshape(t, hk, d)


# ---------------------------------------------------------------------------------------- RMSNorm
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [96, 120, 64])
def test_rmsnorm_matches_reference(dtype, n):
    norm = make_norm(n, dtype, seed=n)
    for x in (randn(7, n, dtype=dtype, seed=1, scale=3.0), randn(2, 3, n, dtype=dtype, seed=2)):  # any leading dims
        assert_same_rounding(K.rmsnorm(x, norm.weight, norm.eps), norm.forward_native(x),
                             emu_rmsnorm(x, norm.weight, norm.eps))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [96, 120])
def test_fused_add_rmsnorm_matches_reference(dtype, n):
    norm = make_norm(n, dtype, seed=n)
    x, res = randn(9, n, dtype=dtype, seed=3), randn(9, n, dtype=dtype, seed=4, scale=4.0)
    x0, res0 = x.clone(), res.clone()
    out, new_res = K.fused_add_rmsnorm(x, res, norm.weight, norm.eps)
    ref_out, ref_res = norm.forward_native(x, res)
    assert_same_rounding(torch.cat([out.flatten(), new_res.flatten()]),
                         torch.cat([ref_out.flatten(), ref_res.flatten()]),
                         emu_rmsnorm(x, norm.weight, norm.eps, residual=res))
    assert out.shape == new_res.shape == x.shape
    assert torch.equal(x, x0) and torch.equal(res, res0)  # inputs untouched


def test_rmsnorm_promotes_to_weight_dtype():
    """bf16 activations with a float32 weight: the reference returns float32 (weight * normed.to(bf16))."""
    norm = make_norm(120, torch.bfloat16, weight_dtype=torch.float32)
    x = randn(5, 120, dtype=torch.bfloat16, seed=5)
    out = K.rmsnorm(x, norm.weight, norm.eps)
    assert out.dtype == torch.float32
    emulate = emu_rmsnorm(x, norm.weight, norm.eps)
    assert torch.equal(emulate(_round_nearest), norm.forward_native(x))
    assert any(torch.allclose(out, emulate(cast), atol=1e-6, rtol=1e-6) for cast in (_round_nearest, _truncate))


@pytest.mark.parametrize("dtype", DTYPES)
def test_rmsnorm_per_head_on_strided_view(dtype):
    """Qwen3's q/k norm: [T, H, D] views of the qkv output, normalised per head without a copy."""
    norm = make_norm(24, dtype, seed=6)
    q, k = qkv_views(6, 4, 2, 24, dtype, seed=7)
    assert not q.is_contiguous()
    for x in (q, k):
        out = K.rmsnorm(x, norm.weight, norm.eps)
        assert out.is_contiguous()
        assert_same_rounding(out, norm.forward_native(x), emu_rmsnorm(x, norm.weight, norm.eps))


def test_rmsnorm_rejects_mismatches():
    norm = make_norm(96, torch.float32)
    with pytest.raises(ValueError, match="last dimension"):
        K.rmsnorm(randn(3, 64, dtype=torch.float32), norm.weight, 1e-6)
    with pytest.raises(ValueError, match="residual"):
        K.fused_add_rmsnorm(randn(3, 96, dtype=torch.float32), randn(3, 96, dtype=torch.bfloat16), norm.weight, 1e-6)


# ---------------------------------------------------------------------------------------- SiLU and mul
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [96, 120])
def test_silu_and_mul_matches_reference(dtype, d):
    act = SiluAndMul()
    for x in (randn(7, 2 * d, dtype=dtype, seed=d, scale=3.0), randn(2, 3, 2 * d, dtype=dtype, seed=d + 1)):
        assert_same_rounding(K.silu_and_mul(x), act.forward_native(x), emu_silu_and_mul(x))


# ---------------------------------------------------------------------------------------- rotary
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hq,hk,d", [(4, 2, 24), (3, 1, 64)])
def test_rotary_matches_reference(dtype, hq, hk, d):
    rope = RotaryEmbedding(d, 200, 10000.0).to(DEVICE)
    q, k = qkv_views(11, hq, hk, d, dtype, seed=d)
    positions = torch.tensor([5, 199, 0, 42, 3, 3, 17, 120, 1, 64, 8], device=DEVICE)  # unsorted, repeated
    q0, k0 = q.clone(), k.clone()
    out_q, out_k = K.rotary_embedding(positions, q, k, rope.cos_cache, rope.sin_cache)
    ref_q, ref_k = rope.forward_native(positions, q, k)
    assert_same_rounding(out_q, ref_q, emu_rotary(positions, q, rope.cos_cache, rope.sin_cache))
    assert_same_rounding(out_k, ref_k, emu_rotary(positions, k, rope.cos_cache, rope.sin_cache))
    assert out_q.is_contiguous() and out_k.is_contiguous()
    assert torch.equal(q, q0) and torch.equal(k, k0)  # inputs untouched (the kernel writes fresh outputs)


def test_rotary_llama3_scaling_and_int32_positions():
    rope = RotaryEmbedding(64, 300, 500000.0, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    rope = rope.to(DEVICE)
    q, k = qkv_views(4, 2, 2, 64, torch.float32, seed=9)
    positions = torch.tensor([299, 0, 150, 7], device=DEVICE)
    out = K.rotary_embedding(positions.to(torch.int32), q, k, rope.cos_cache, rope.sin_cache)
    for a, b in zip(out, rope.forward_native(positions, q, k)):
        assert_matches(a, b)


# ---------------------------------------------------------------------------------------- dispatch
def test_cpu_layers_always_take_the_reference(monkeypatch):
    """On CPU, forward == forward_native bit for bit and the kernels are never asked for."""
    def no_kernels():
        raise AssertionError("the fused kernels were used for a CPU tensor")

    monkeypatch.setattr(triton_ops, "ops", no_kernels)
    monkeypatch.setattr(triton_ops, "_enabled", True)
    norm = make_norm(96, torch.float32, device="cpu")
    x, res = randn(4, 96, dtype=torch.float32, device="cpu"), randn(4, 96, dtype=torch.float32, device="cpu", seed=1)
    assert torch.equal(norm(x), norm.forward_native(x))
    assert all(torch.equal(a, b) for a, b in zip(norm(x, res), norm.forward_native(x, res)))
    act = SiluAndMul()
    assert torch.equal(act(x), act.forward_native(x))
    rope = RotaryEmbedding(24, 32, 10000.0)
    q, k = qkv_views(3, 4, 2, 24, torch.float32, device="cpu")
    pos = torch.tensor([3, 0, 9])
    assert all(torch.equal(a, b) for a, b in zip(rope(pos, q, k), rope.forward_native(pos, q, k)))
    assert not triton_ops.use_fused(x)


def test_switch_function_and_environment(monkeypatch):
    prev = triton_ops.set_fused_kernels_enabled(False)
    try:
        assert not triton_ops.fused_kernels_enabled()
        assert triton_ops.set_fused_kernels_enabled(True) is False
        assert triton_ops.fused_kernels_enabled()
    finally:
        triton_ops.set_fused_kernels_enabled(prev)
    try:  # the environment variable is read when the module is (re)loaded
        for value, enabled in (("1", False), ("true", False), ("0", True), ("", True)):
            monkeypatch.setenv(triton_ops.ENV_DISABLE, value)
            assert importlib.reload(triton_ops).fused_kernels_enabled() is enabled
    finally:
        monkeypatch.undo()
        importlib.reload(triton_ops)
    assert triton_ops.fused_kernels_enabled() == (os.environ.get(triton_ops.ENV_DISABLE, "0") in ("", "0"))


# ---------------------------------------------------------------------------------------- GPU: real shapes
GPU_TOKENS = [1, 333, 4096]


@pytest.fixture
def fused_on(monkeypatch):
    """The layers' forward takes the kernels even if RADIXLM_DISABLE_FUSED_KERNELS is set."""
    monkeypatch.setattr(triton_ops, "_enabled", True)


def _assert_gpu_match(out, ref):
    # bf16: same rounding points as the reference, so bit-equal except where a fp32 sum order flips a rounding
    assert_matches(out, ref, bit_exact_frac=0.99 if out.dtype != torch.float32 else None)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("t", GPU_TOKENS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_rmsnorm_real_shapes(t, dtype, fused_on):
    norm = make_norm(4096, dtype, seed=t)
    x, res = randn(t, 4096, dtype=dtype, seed=1), randn(t, 4096, dtype=dtype, seed=2, scale=8.0)
    _assert_gpu_match(norm(x), norm.forward_native(x))
    out, new_res = norm(x, res)
    ref_out, ref_res = norm.forward_native(x, res)
    _assert_gpu_match(out, ref_out)
    _assert_gpu_match(new_res, ref_res)
    head_norm = make_norm(128, dtype, seed=3)  # q/k norm over a qkv split
    q, k = qkv_views(t, 32, 8, 128, dtype, seed=4)
    _assert_gpu_match(head_norm(q), head_norm.forward_native(q))
    _assert_gpu_match(head_norm(k), head_norm.forward_native(k))


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("t", GPU_TOKENS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_silu_and_mul_real_shapes(t, dtype, fused_on):
    act = SiluAndMul()
    x = randn(t, 2 * 14336, dtype=dtype, seed=t, scale=3.0)
    _assert_gpu_match(act(x), act.forward_native(x))


LLAMA31_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("t", GPU_TOKENS)
@pytest.mark.parametrize("hq,hk,d,dtype", [(32, 8, 128, torch.bfloat16), (32, 8, 128, torch.float32),
                                           (16, 2, 256, torch.bfloat16), (12, 4, 64, torch.bfloat16)])
def test_gpu_rotary_real_shapes(t, hq, hk, d, dtype, fused_on):
    rope = RotaryEmbedding(d, 32768, 500000.0, LLAMA31_ROPE).to("cuda")
    q, k = qkv_views(t, hq, hk, d, dtype, seed=t)
    positions = torch.randint(0, 32768, (t,), generator=torch.Generator().manual_seed(t)).cuda()
    out_q, out_k = rope(positions, q, k)
    ref_q, ref_k = rope.forward_native(positions, q, k)
    _assert_gpu_match(out_q, ref_q)
    _assert_gpu_match(out_k, ref_k)


def _extend_logits(runner, prompts):
    """One extend step over fresh requests: (logits at each request's last token, hidden of every token)."""
    from radixlm.core import ForwardMode, ScheduleBatch

    r2t, alloc = runner.req_to_token_pool, runner.allocator
    rows = [r2t.alloc() for _ in prompts]
    loc = alloc.alloc(sum(len(p) for p in prompts))
    try:
        start = 0
        for row, p in zip(rows, prompts):
            r2t.write(row, 0, loc[start:start + len(p)])
            start += len(p)
        batch = ScheduleBatch([SimpleNamespace(kv=SimpleNamespace(req_pool_idx=r)) for r in rows], ForwardMode.EXTEND,
                              [t for p in prompts for t in p], loc, [0] * len(prompts), [len(p) for p in prompts],
                              [True] * len(prompts))
        logits, hidden = runner.forward(batch)
        return logits.float().clone(), hidden.float().clone()
    finally:
        for row in rows:
            r2t.free(row)
        alloc.free(loc)


def check_model_fused_on_vs_off(model_factory, monkeypatch, device, dtype, lengths, **model_kw):
    """A whole qwen3 (q/k norm on strided views) with the fused kernels on and off (the switch that
    RADIXLM_DISABLE_FUSED_KERNELS sets): same logits, and every kernel really ran."""
    import random

    from radixlm.engine.model_runner import ModelRunner, RunnerConfig
    from radixlm.models.model_config import ModelConfig

    calls = {}
    for name in ("rmsnorm", "fused_add_rmsnorm", "silu_and_mul", "rotary_embedding"):
        def spy(*a, _f=getattr(K, name), _n=name, **kw):
            calls[_n] = calls.get(_n, 0) + 1
            return _f(*a, **kw)
        monkeypatch.setattr(K, name, spy)

    path = model_factory("qwen3", dtype=dtype, **model_kw)
    runner = ModelRunner(ModelConfig.from_path(path, dtype, 4096),
                         RunnerConfig(device=device, attention_backend="torch_native", max_total_tokens=4096,
                                      max_running_requests=8, disable_cuda_graph=True))
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 500) for _ in range(n)] for n in lengths]
    prev = triton_ops.set_fused_kernels_enabled(False)
    try:
        ref_logits, ref_hidden = _extend_logits(runner, prompts)
        assert not calls
        triton_ops.set_fused_kernels_enabled(True)
        logits, hidden = _extend_logits(runner, prompts)
    finally:
        triton_ops.set_fused_kernels_enabled(prev)
    assert set(calls) == {"rmsnorm", "fused_add_rmsnorm", "silu_and_mul", "rotary_embedding"}, calls
    if dtype == "float32":
        torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(hidden, ref_hidden, atol=1e-4, rtol=1e-4)
        assert torch.equal(logits.argmax(-1), ref_logits.argmax(-1))
    else:  # bf16: rounding flips propagate through the layers (the kernel tests check the rounding itself);
        # this catches layout / indexing errors, which are O(1)
        err = (logits - ref_logits).abs().max().item()
        assert err <= 0.05 * ref_logits.abs().max().item(), (err, ref_logits.abs().max().item())
        for row, (a, b) in enumerate(zip(logits.argmax(-1).tolist(), ref_logits.argmax(-1).tolist())):
            assert a == b or ref_logits[row, b] - ref_logits[row, a] <= 2 * err, (row, a, b)  # only at a near-tie


def test_model_fused_on_vs_off_interpreted(model_factory, monkeypatch):
    """The same plumbing on CPU: the kernels (interpreted) forced on for CPU tensors, 2 tiny layers."""
    if CUDA:
        pytest.skip("covered by test_gpu_model_fused_on_vs_off")
    monkeypatch.setattr(triton_ops, "use_fused", lambda x: triton_ops.fused_kernels_enabled()
                        and x.dtype in triton_ops.FUSED_DTYPES)
    check_model_fused_on_vs_off(model_factory, monkeypatch, "cpu", "float32", (1, 5, 12),
                                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gpu_model_fused_on_vs_off(model_factory, monkeypatch, dtype):
    check_model_fused_on_vs_off(model_factory, monkeypatch, "cuda", dtype, (1, 37, 300), size="small")
