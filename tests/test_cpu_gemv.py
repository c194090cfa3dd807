"""The row-streaming CPU matmul (radixlm/layers/cpu_gemv.py) against its reference, F.linear.

Shapes with tails that are not a multiple of the vector width, 1..MAX_ROWS rows, bias or none,
float32 and bfloat16; the result does not depend on the thread count; the linear layers route a
few rows to it and more rows to oneDNN; a failed build leaves the layers on oneDNN.
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from radixlm.layers import cpu_gemv, cpu_linear

pytestmark = pytest.mark.skipif(cpu_gemv.load() is None, reason="no C compiler: the CPU gemv kernel is off")

SHAPES = [(1, 1), (7, 5), (64, 768), (100, 33), (1280, 768), (300, 2048 + 7), (8000, 64)]


def _case(n, k, rows, dtype, bias, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=g).to(dtype)
    w = (torch.randn(n, k, generator=g) / k ** 0.5).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    return x, w, b


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", range(1, cpu_gemv.KERNEL_MAX_ROWS + 1))
@pytest.mark.parametrize("bias", [False, True])
def test_matches_f_linear(dtype, rows, bias):
    for i, (n, k) in enumerate(SHAPES):
        x, w, b = _case(n, k, rows, dtype, bias, seed=i)
        assert cpu_gemv.supports(x, w, b)
        got = cpu_gemv.gemv(x, w, b)
        assert got.shape == (rows, n) and got.dtype == dtype
        exact = F.linear(x.double(), w.double(), None if b is None else b.double())
        if dtype == torch.float32:
            torch.testing.assert_close(got.double(), exact, rtol=1e-5, atol=1e-5 * k ** 0.5)
        else:
            # float32 accumulation of exact bf16 products, one rounding: within one bf16 ulp of the exact value
            ulp = exact.abs().clamp_min(1e-30) * 2.0 ** -7
            assert ((got.double() - exact).abs() <= ulp + 1e-6 * k ** 0.5).all()
            ref = F.linear(x, w, b)  # PyTorch's own bf16 linear rounds the same way (up to summation order)
            torch.testing.assert_close(got.float(), ref.float(), rtol=2 ** -7, atol=1e-3)


@pytest.mark.parametrize("variant", [("-mno-avx512bf16",), ("-mno-avx512f",)])
def test_other_cpus_paths_match_f_linear(variant):
    """The paths of CPUs without AVX512-BF16 (bf16 weights widened in registers) or without AVX-512
    (plain loops), compiled here with those instructions turned off."""
    try:
        lib = cpu_gemv.open_kernel(variant)
    except RuntimeError as e:  # a compiler that does not know the flag
        pytest.skip(str(e))
    for dtype in (torch.float32, torch.bfloat16):
        for i, (n, k) in enumerate(SHAPES):
            x, w, b = _case(n, k, 3, dtype, True, seed=10 + i)
            got = cpu_gemv.gemv(x, w, b, lib=lib)
            torch.testing.assert_close(got.float(), cpu_gemv.gemv(x, w, b).float(), rtol=2 ** -7, atol=1e-4)
            torch.testing.assert_close(got.double(), F.linear(x.double(), w.double(), b.double()),
                                       rtol=2 ** -7 if dtype == torch.bfloat16 else 1e-5, atol=1e-4 * k ** 0.5)


def test_result_does_not_depend_on_threads():
    x, w, b = _case(1000, 768, 3, torch.float32, True, seed=5)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpu_gemv.gemv(x, w, b)
        torch.set_num_threads(2)
        two = cpu_gemv.gemv(x, w, b)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)


def test_what_it_declines():
    x, w, _ = _case(64, 32, 1, torch.float32, False, seed=0)
    assert not cpu_gemv.supports(torch.randn(cpu_gemv.KERNEL_MAX_ROWS + 1, 32), w, None)
    assert not cpu_gemv.supports(x.bfloat16(), w, None)  # dtypes differ
    assert not cpu_gemv.supports(x.double(), w.double(), None)
    assert not cpu_gemv.supports(x, w.t().contiguous().t(), None)  # a strided weight
    assert not cpu_gemv.supports(x.unsqueeze(0), w, None)


def test_layers_route_few_rows_to_it_and_many_to_onednn(monkeypatch):
    x, w, b = _case(256, 96, cpu_gemv.MAX_ROWS + 3, torch.float32, True, seed=3)
    packed = cpu_linear.prepack_weight(w)
    if packed is None or not cpu_linear.prepack_available():
        pytest.skip("oneDNN prepacking unavailable")
    calls = []
    real = cpu_gemv.gemv
    monkeypatch.setattr(cpu_gemv, "gemv", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    few = cpu_linear.linear(x[:2], w, b, packed)
    many = cpu_linear.linear(x, w, b, packed)
    assert calls == [2]
    assert torch.equal(few, real(x[:2], w, b))
    torch.testing.assert_close(many, F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    assert cpu_linear.linear(x[:1], w, b, None) is not None and calls == [2]  # not prepared: the reference


def test_custom_op_contract():
    x, w, b = _case(96, 40, 2, torch.float32, True, seed=4)
    torch.library.opcheck(cpu_gemv.cpu_gemv_op, (x, w, b))
    torch.library.opcheck(cpu_gemv.cpu_gemv_op, (x.bfloat16(), w.bfloat16(), None))


def test_failed_build_leaves_onednn(monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(cpu_gemv, "_lib", None)
    monkeypatch.setattr(cpu_gemv, "_load_failed", False)
    monkeypatch.setenv("RADIXLM_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", "false")
    with caplog.at_level(logging.WARNING, logger=cpu_gemv.__name__):
        assert cpu_gemv.load() is None
    assert not cpu_gemv.ready() and "keep oneDNN" in caplog.text
    monkeypatch.setattr(cpu_gemv, "_load_failed", False)
    monkeypatch.setenv(cpu_gemv.ENV_DISABLE, "1")
    assert cpu_gemv.load() is None


def test_linears_bench_times_every_implementation(model_factory, capsys):
    from radixlm.bench import cpu_linears

    assert cpu_linears.main(["--model-path", model_factory("llama"), "--rows", "1", "3", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert out.count("rows ") == 2 and out.count("gemv") == 2 and "F.linear" in out
