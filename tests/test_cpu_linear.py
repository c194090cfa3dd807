"""Prepacked oneDNN matmuls on the CPU (radixlm/layers/cpu_linear.py) against their reference,
F.linear on the unpacked weight: single layers of every shape the models use, and whole models."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from radixlm.layers import cpu_linear

pytestmark = pytest.mark.skipif(not cpu_linear.prepack_available(), reason="oneDNN prepacking unavailable")


@pytest.mark.parametrize("rows", [1, 7, 64, 300])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_matches_f_linear(rows, bias):
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(200, 96, generator=g) * 0.05
    b = torch.randn(200, generator=g) if bias else None
    x = torch.randn(rows, 96, generator=g)
    packed = cpu_linear.prepack_weight(w)
    assert packed is not None
    torch.testing.assert_close(cpu_linear.packed_linear(x, packed, b), F.linear(x, w, b), atol=1e-5, rtol=1e-5)


def test_packed_takes_3d_and_strided_inputs_and_bf16():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 48, generator=g)
    packed = cpu_linear.prepack_weight(w)
    x3 = torch.randn(2, 5, 48, generator=g)
    torch.testing.assert_close(cpu_linear.packed_linear(x3, packed, None), F.linear(x3, w), atol=1e-5, rtol=1e-5)
    xt = torch.randn(48, 9, generator=g).t()  # non-contiguous
    torch.testing.assert_close(cpu_linear.packed_linear(xt, packed, None), F.linear(xt, w), atol=1e-5, rtol=1e-5)
    wb = w.bfloat16()
    xb = torch.randn(4, 48, generator=g).bfloat16()
    got = cpu_linear.linear(xb, wb, None, cpu_linear.prepack_weight(wb))
    torch.testing.assert_close(got.float(), F.linear(xb, wb).float(), atol=2e-2, rtol=2e-2)
    # a dtype that does not match the packed weight falls back to the reference
    assert cpu_linear.linear(x3.double(), w.double(), None, packed).dtype == torch.float64


def test_whole_model_logits_with_and_without_packing(model_factory, monkeypatch):
    from radixlm.models.loader import load_model
    from radixlm.models.model_config import ModelConfig

    cfg = ModelConfig.from_path(model_factory("qwen2"))
    packed_model = load_model(cfg, "cpu")
    monkeypatch.setenv(cpu_linear.ENV_DISABLE, "1")
    plain_model = load_model(cfg, "cpu")
    layers = [m for m in packed_model.modules() if hasattr(m, "cpu_packed_weight")]
    assert layers and all(m.cpu_packed_weight is not None for m in layers)  # qkv, o, gate_up, down, lm head
    assert all(m.cpu_packed_weight is None for m in plain_model.modules() if hasattr(m, "cpu_packed_weight"))
    ids = torch.tensor([5, 17, 3, 99, 42, 7, 7, 1])
    pos = torch.arange(len(ids))
    from radixlm.attention.forward_context import forward_context

    outs = []
    for model in (packed_model, plain_model):
        hidden = _forward(model, ids, pos, forward_context)
        outs.append(model.compute_logits(hidden))
    torch.testing.assert_close(outs[0], outs[1], atol=1e-4, rtol=1e-4)


def _forward(model, ids, pos, forward_context):
    """One prefill of `ids` through the model with a throw-away KV pool (torch_native attention)."""
    from radixlm.attention.forward_context import ForwardBatch
    from radixlm.attention.torch_native import TorchNativeAttnBackend
    from radixlm.core import ForwardMode
    from radixlm.mem.kv_pool import MHATokenToKVPool, ReqToTokenPool

    mc = model.config  # the ModelConfig
    n = len(ids)
    kv = MHATokenToKVPool(n + 1, mc.num_layers, mc.num_kv_heads, mc.head_dim, torch.float32, "cpu")
    rt = ReqToTokenPool(3, n + 1, "cpu")
    row = rt.alloc()
    slots = torch.arange(1, n + 1)
    rt.write(row, 0, slots)
    lens = torch.tensor([n])
    fb = ForwardBatch(ForwardMode.EXTEND, ids, pos, slots, torch.tensor([row]), lens, torch.tensor([0]), lens,
                      [n], [0], [n], rt, kv, TorchNativeAttnBackend())
    with torch.inference_mode(), forward_context(fb):
        return model(ids, pos)
