"""The triton attention backend against the torch_native reference.

On a machine without CUDA the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set before
triton is imported) on small shapes; with CUDA they compile and run on the GPU, and the
`@pytest.mark.gpu` tests add bf16 / large-shape checks (`pytest -m gpu tests/test_triton_kernels.py`).
Skipped entirely when triton is not installed.
"""

from __future__ import annotations

import pytest
import torch

from radixlm.attention.forward_context import ForwardBatch  # noqa: E402
from radixlm.attention.torch_native import TorchNativeAttnBackend  # noqa: E402
from radixlm.attention.triton_backend import TritonAttnBackend  # noqa: E402
from radixlm.core import ForwardMode  # noqa: E402
from radixlm.layers.radix_attention import RadixAttention  # noqa: E402
from radixlm.mem.kv_pool import MHATokenToKVPool, ReqToTokenPool  # noqa: E402
from tests.triton_env import CUDA, DEVICE, gpu  # noqa: E402,F401  (before any triton import)


# ---------------------------------------------------------------------------------------- helpers
class Case:
    """A batch over a scattered KV pool: request i (req_to_token row rows[i]) has prefix_lens[i]
    tokens cached at random slots and extend_lens[i] new tokens (q/k/v) to be written at others."""

    def __init__(self, hq, hk, d, prefix_lens, extend_lens, dtype=torch.float32, device=DEVICE, seed=0,
                 num_layers=1, decode=False):
        g = torch.Generator().manual_seed(seed)
        self.hq, self.hk, self.d, self.dtype, self.device = hq, hk, d, dtype, device
        self.prefix_lens, self.extend_lens = list(prefix_lens), list(extend_lens)
        seq_lens = [p + e for p, e in zip(prefix_lens, extend_lens)]
        b, total, t = len(seq_lens), sum(seq_lens), sum(extend_lens)
        num_slots = total + 11
        self.pool = MHATokenToKVPool(num_slots, num_layers, hk, d, dtype, device)
        self.r2t = ReqToTokenPool(b + 3, max(seq_lens) + 5, device)
        rows = list(range(b + 2, 2, -1))[:b]  # not 0..b-1, not sorted
        slots = (torch.randperm(num_slots - 1, generator=g)[:total] + 1).tolist()  # scattered, never slot 0
        new_locs, c = [], 0
        for row, pre, n in zip(rows, prefix_lens, seq_lens):
            self.r2t.req_to_token[row, :n] = torch.tensor(slots[c:c + n])
            new_locs += slots[c + pre:c + n]
            for layer in range(num_layers):
                s = torch.tensor(slots[c:c + pre], device=device, dtype=torch.long)
                self.pool.k_buffer[layer][s] = torch.randn(pre, hk, d, generator=g).to(device, dtype)
                self.pool.v_buffer[layer][s] = torch.randn(pre, hk, d, generator=g).to(device, dtype)
            c += n
        self.q = [torch.randn(t, hq * d, generator=g).to(device, dtype) for _ in range(num_layers)]
        self.k = [torch.randn(t, hk * d, generator=g).to(device, dtype) for _ in range(num_layers)]
        self.v = [torch.randn(t, hk * d, generator=g).to(device, dtype) for _ in range(num_layers)]
        self.layers = [RadixAttention(hq, d, d ** -0.5, hk, i) for i in range(num_layers)]

        def lt(x):
            return torch.tensor(x, dtype=torch.long, device=device)

        positions = [p + i for p, e in zip(prefix_lens, extend_lens) for i in range(e)]
        self.fb_args = dict(
            forward_mode=ForwardMode.DECODE if decode else ForwardMode.EXTEND,
            input_ids=lt([0] * t), positions=lt(positions), out_cache_loc=lt(new_locs), req_pool_indices=lt(rows),
            seq_lens=lt(seq_lens), extend_prefix_lens=lt(prefix_lens), extend_seq_lens=lt(extend_lens),
            seq_lens_cpu=seq_lens, extend_prefix_lens_cpu=list(prefix_lens), extend_seq_lens_cpu=list(extend_lens),
            req_to_token_pool=self.r2t)

    def run(self, backend):
        """Runs every layer through `backend` on a private copy of the pool: (outputs, pool copy)."""
        pool = MHATokenToKVPool(self.pool.num_slots, self.pool.num_layers, self.hk, self.d, self.dtype, self.device)
        for i in range(self.pool.num_layers):
            pool.k_buffer[i].copy_(self.pool.k_buffer[i])
            pool.v_buffer[i].copy_(self.pool.v_buffer[i])
        fb = ForwardBatch(token_to_kv_pool=pool, attn_backend=backend, **self.fb_args)
        backend.init_forward_metadata(fb)
        outs = [backend.forward(self.q[i], self.k[i], self.v[i], layer, fb) for i, layer in enumerate(self.layers)]
        return outs, pool


def assert_same(case, triton_backend, atol=1e-4, rtol=1e-4):
    ref_out, ref_pool = case.run(TorchNativeAttnBackend())
    out, pool = case.run(triton_backend)
    for i, (a, b) in enumerate(zip(out, ref_out)):
        assert a.shape == b.shape and a.dtype == b.dtype
        torch.testing.assert_close(a.float(), b.float(), atol=atol, rtol=rtol, msg=lambda m: f"layer {i}: {m}")
        assert torch.equal(pool.k_buffer[i], ref_pool.k_buffer[i]) and torch.equal(pool.v_buffer[i],
                                                                                 ref_pool.v_buffer[i])
    return out


def i32(x):
    return torch.tensor(x, dtype=torch.int32, device=DEVICE)


def stored_extend(case: "Case", k, v):
    """Writes the new tokens' K/V to the pool; returns (k buffer, v buffer, batch args, tile rows and
    tile starts of 8-row extend tiles) for a direct extend kernel call."""
    from radixlm.attention.triton_kernels import store_kv
    from radixlm.attention.triton_kernels.extend_attention import extend_tiles

    kb, vb = case.pool.k_buffer[0], case.pool.v_buffer[0]
    store_kv(k, v, case.fb_args["out_cache_loc"], kb, vb)
    return (kb, vb, case.fb_args, *extend_tiles(case.extend_lens, 8))


# ------------------------------------------------------------------------------------- KV store
@pytest.mark.parametrize("pool_dtype", [torch.float32, torch.bfloat16])
def test_store_kv_matches_indexing(pool_dtype):
    from radixlm.attention.triton_kernels import store_kv
    from radixlm.attention.triton_kernels.reference import ref_store_kv

    g = torch.Generator().manual_seed(1)
    hk, d, t = 3, 24, 37
    kb = torch.randn(100, hk, d, generator=g).to(DEVICE, pool_dtype)
    vb = torch.randn(100, hk, d, generator=g).to(DEVICE, pool_dtype)
    kb2, vb2 = kb.clone(), vb.clone()
    loc = torch.randperm(100, generator=g)[:t].to(DEVICE)
    qkv = torch.randn(t, 5 * hk * d, generator=g).to(DEVICE)
    k, v = qkv[:, hk * d:2 * hk * d], qkv[:, 3 * hk * d:4 * hk * d]  # strided views, as a qkv split gives
    store_kv(k, v, loc, kb, vb)
    ref_store_kv(k, v, loc, kb2, vb2)
    if pool_dtype == torch.bfloat16 and not CUDA:  # the interpreter casts fp32 -> bf16 by truncation,
        tol = dict(atol=0.0, rtol=2.0 ** -7)  # not round-to-nearest: up to one bf16 ulp apart
        torch.testing.assert_close(kb, kb2, **tol)
        torch.testing.assert_close(vb, vb2, **tol)
    else:
        assert torch.equal(kb, kb2) and torch.equal(vb, vb2)


# ------------------------------------------------------------------------------------- extend
EXTEND_SHAPES = [(6, 2, 24), (4, 1, 16)]  # GQA 3:1 with head_dim 24 (padded to 32), MQA with 16


@pytest.mark.parametrize("hq,hk,d", EXTEND_SHAPES)
def test_extend_matches_torch_native(hq, hk, d):
    # ragged: no prefix, 1-token extend on a prefix, prefix + several tiles, prefix shorter than a block
    case = Case(hq, hk, d, prefix_lens=[0, 5, 37, 3], extend_lens=[9, 1, 20, 35], seed=hq * d, num_layers=2)
    assert_same(case, TritonAttnBackend(extend_block_m=16, extend_block_n=16))


def test_extend_default_blocks_single_request():
    case = Case(6, 2, 24, prefix_lens=[0], extend_lens=[13], seed=3)
    assert_same(case, TritonAttnBackend())


def test_extend_kernel_matches_reference_function():
    """The kernel on its own (strided q as from a qkv split) against the plain softmax reference."""
    from radixlm.attention.triton_kernels import extend_attention_fwd
    from radixlm.attention.triton_kernels.reference import ref_extend_attention

    case = Case(4, 2, 16, prefix_lens=[4, 0], extend_lens=[6, 11], seed=7)
    hq, hk, d = 4, 2, 16
    t = sum(case.extend_lens)
    qkv = torch.cat([case.q[0], case.k[0], case.v[0]], dim=1)  # [T, (hq + 2 hk) d]
    q = qkv[:, :hq * d].view(t, hq, d)
    k = qkv[:, hq * d:(hq + hk) * d].view(t, hk, d)
    v = qkv[:, (hq + hk) * d:].view(t, hk, d)
    kb, vb, f, tr, tm = stored_extend(case, k, v)

    o = torch.empty(t, hq, d, device=DEVICE)
    extend_attention_fwd(q, k, v, o, kb, vb, case.r2t.req_to_token, f["req_pool_indices"],
                         f["extend_prefix_lens"], i32([0, 6]), f["extend_seq_lens"], i32(tr), i32(tm), 0.3,
                         block_m=8, block_n=16)
    ref = ref_extend_attention(q, kb, vb, case.r2t.req_to_token, f["req_pool_indices"], f["extend_prefix_lens"],
                               f["extend_seq_lens"], 0.3)
    torch.testing.assert_close(o, ref, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------- decode
@pytest.mark.parametrize("hq,hk,d", EXTEND_SHAPES)
@pytest.mark.parametrize("splits", [1, 3, None])
def test_decode_matches_torch_native(hq, hk, d, splits):
    # seq 1 (prefix 0) with 3 splits leaves empty splits; 40 and 70 span several blocks per split
    case = Case(hq, hk, d, prefix_lens=[0, 6, 39, 69], extend_lens=[1, 1, 1, 1], seed=11 + d, decode=True,
                num_layers=2)
    assert_same(case, TritonAttnBackend(num_kv_splits=splits, decode_block_n=16))


def test_decode_kernel_matches_reference_function():
    from radixlm.attention.triton_kernels import decode_attention_fwd
    from radixlm.attention.triton_kernels.decode_attention import decode_buffers
    from radixlm.attention.triton_kernels.reference import ref_decode_attention

    case = Case(6, 2, 24, prefix_lens=[12, 3], extend_lens=[1, 1], seed=5, decode=True)
    q = case.q[0].view(2, 6, 24)
    kb, vb = case.pool.k_buffer[0], case.pool.v_buffer[0]
    f = case.fb_args
    # attend over the prefix only (seq_lens = prefix): the new slots are never written here
    seq = f["extend_prefix_lens"]
    mid = decode_buffers(2, 6, 2, 24, DEVICE)
    o = torch.empty_like(q)
    decode_attention_fwd(q, o, kb, vb, case.r2t.req_to_token, f["req_pool_indices"], seq, 2, *mid, 0.25, block_n=16)
    ref = ref_decode_attention(q, kb, vb, case.r2t.req_to_token, f["req_pool_indices"], seq, 0.25)
    torch.testing.assert_close(o, ref, atol=1e-4, rtol=1e-4)


def test_metadata_once_per_step():
    """init_forward_metadata builds the tiles / splits; layers reuse them (and the decode scratch)."""
    be = TritonAttnBackend(extend_block_m=16)
    case = Case(6, 2, 24, prefix_lens=[3, 0], extend_lens=[20, 5], num_layers=2)
    case.run(be)
    assert be._extend.tile_req.tolist() == [0, 0, 1] and be._extend.tile_m.tolist() == [0, 16, 0]
    assert be._extend.qo_start.tolist() == [0, 20]
    dcase = Case(6, 2, 24, prefix_lens=[30, 9], extend_lens=[1, 1], decode=True, num_layers=2)
    dcase.run(be)  # first decode step learns Hq at layer 0
    first = be._decode.mid
    dcase.run(be)  # later steps preallocate in init_forward_metadata
    assert be._decode.mid is not None and be._decode.mid[0].shape == first[0].shape
    assert be._decode.num_splits == 2  # ceil(31 / 16 tokens per split) on CPU


# ------------------------------------------------------------------------------------- engine
def _engine_tokens(path, backend, device, first, later, n_new):
    import radixlm

    sp = {"temperature": 0, "max_new_tokens": n_new, "ignore_eos": True}
    with radixlm.Engine(model_path=path, attention_backend=backend, device=device, dtype="float32",
                        max_total_tokens=8192, log_level="warning") as eng:
        assert type(eng.scheduler.runner.attn_backend).__name__ == {"triton": "TritonAttnBackend",
                                                                    "torch_native": "TorchNativeAttnBackend"}[backend]
        a = eng.generate(input_ids=first, sampling_params=sp)
        b = eng.generate(input_ids=later, sampling_params=sp)
    assert b[0]["meta_info"]["cached_tokens"] > 0  # the second call extends on a radix-cached prefix
    return [o["output_ids"] for o in a + b]


def test_engine_greedy_matches_torch_native(model_factory):
    """Whole tiny qwen3 (GQA 3:1, head_dim 24) through the triton backend: same greedy tokens as
    torch_native, including a second call that extends on a radix-cached prefix."""
    path = model_factory("qwen3")
    first = [[5, 17, 33, 101, 7, 250, 64, 9, 300, 12, 45]]
    later = [first[0] + [77, 78, 79], [400, 401, 5, 99, 98, 97, 96, 95]]
    got = {b: _engine_tokens(path, b, DEVICE, first, later, 4) for b in ("torch_native", "triton")}
    assert got["triton"] == got["torch_native"]


@pytest.mark.gpu
@gpu
def test_gpu_engine_greedy_matches_torch_native(model_factory):
    """The same on CUDA with longer prompts (several tiles / splits), fp32 (IEEE dots)."""
    import random

    rng = random.Random(0)
    path = model_factory("qwen3")
    first = [[rng.randrange(3, 500) for _ in range(n)] for n in (300, 1000, 7)]
    later = [first[1] + [rng.randrange(3, 500) for _ in range(200)], first[0] + [11]]
    got = {b: _engine_tokens(path, b, "cuda", first, later, 24) for b in ("torch_native", "triton")}
    assert got["triton"] == got["torch_native"]


# ------------------------------------------------------------------------------------- GPU shapes
def _bf16_reference(case):
    """fp32 torch_native on an fp32 copy of a bf16 case: both bf16 backends are compared to it."""
    ref = Case.__new__(Case)
    ref.__dict__.update(case.__dict__)
    ref.dtype = torch.float32
    ref.q = [x.float() for x in case.q]
    ref.k = [x.float() for x in case.k]
    ref.v = [x.float() for x in case.v]
    ref.pool = MHATokenToKVPool(case.pool.num_slots, case.pool.num_layers, case.hk, case.d, torch.float32,
                                case.device)
    for i in range(case.pool.num_layers):
        ref.pool.k_buffer[i].copy_(case.pool.k_buffer[i].float())
        ref.pool.v_buffer[i].copy_(case.pool.v_buffer[i].float())
    return ref.run(TorchNativeAttnBackend())[0]


def check_bf16_extend(hq, hk, d, prefix_lens, extend_lens, **backend_kw):
    """bf16 triton and bf16 torch_native against fp32 math: triton's error within 3x native's (or 3e-2)."""
    case = Case(hq, hk, d, prefix_lens=prefix_lens, extend_lens=extend_lens, dtype=torch.bfloat16, seed=d)
    exact = _bf16_reference(case)
    out, _ = case.run(TritonAttnBackend(**backend_kw))
    native, _ = case.run(TorchNativeAttnBackend())
    err = (out[0].float() - exact[0]).abs().max().item()
    native_err = (native[0].float() - exact[0]).abs().max().item()
    assert err <= max(3 * native_err, 3e-2), (err, native_err)


def check_bf16_decode(hq, hk, d, lens, splits_list, **backend_kw):
    case = Case(hq, hk, d, prefix_lens=[n - 1 for n in lens], extend_lens=[1] * len(lens), dtype=torch.bfloat16,
                seed=d, decode=True)
    exact = _bf16_reference(case)
    native, _ = case.run(TorchNativeAttnBackend())
    native_err = (native[0].float() - exact[0]).abs().max().item()
    for splits in splits_list:
        out, _ = case.run(TritonAttnBackend(num_kv_splits=splits, **backend_kw))
        err = (out[0].float() - exact[0]).abs().max().item()
        assert err <= max(3 * native_err, 3e-2), (splits, err, native_err)


def test_bf16_small():
    """bf16 pool and activations (the interpreter widens bf16 dots to fp32; the GPU uses bf16 MMA)."""
    check_bf16_extend(4, 2, 16, [0, 20], [19, 6], extend_block_m=16, extend_block_n=16)
    check_bf16_decode(4, 2, 16, [1, 40], [1, 3], decode_block_n=16)


GPU_SHAPES = [(32, 8, 128), (16, 8, 128), (8, 1, 64), (12, 4, 96), (8, 2, 256)]


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("hq,hk,d", GPU_SHAPES)
def test_gpu_extend_bf16(hq, hk, d):
    check_bf16_extend(hq, hk, d, [0, 3000, 17, 1000, 0], [700, 500, 1, 129, 64])


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("hq,hk,d", GPU_SHAPES)
def test_gpu_decode_bf16(hq, hk, d):
    check_bf16_decode(hq, hk, d, [1, 17, 512, 4095, 8191] + [100 + 37 * i for i in range(59)], [None, 1, 7])


@pytest.mark.gpu
@gpu
def test_gpu_fp32_exact():
    """fp32 on the GPU uses IEEE dots (no TF32): as tight as the CPU tests."""
    case = Case(32, 8, 128, prefix_lens=[0, 300, 5], extend_lens=[200, 33, 1], seed=2)
    assert_same(case, TritonAttnBackend(), atol=2e-4, rtol=2e-4)
    dcase = Case(32, 8, 128, prefix_lens=[0, 300, 2000], extend_lens=[1, 1, 1], seed=3, decode=True)
    assert_same(dcase, TritonAttnBackend(), atol=2e-4, rtol=2e-4)


# ------------------------------------------------------------------------------------- sliding window
def windowed(case, window):
    for layer in case.layers:
        layer.sliding_window = window
    return case


@pytest.mark.parametrize("window", [7, 20])
def test_extend_sliding_window_matches_torch_native(window):
    # window inside a block, across blocks, longer than some requests; prefix shorter / longer than it
    case = windowed(Case(6, 2, 24, prefix_lens=[0, 5, 37, 3], extend_lens=[9, 1, 20, 35], seed=21), window)
    assert_same(case, TritonAttnBackend(extend_block_m=16, extend_block_n=16))


@pytest.mark.parametrize("splits", [1, 3])
def test_decode_sliding_window_matches_torch_native(splits):
    case = windowed(Case(6, 2, 24, prefix_lens=[0, 6, 39, 69], extend_lens=[1, 1, 1, 1], seed=23, decode=True),
                    10)
    assert_same(case, TritonAttnBackend(num_kv_splits=splits, decode_block_n=16))


def test_sliding_window_kernels_match_reference_functions():
    """Both kernels with a window against the plain references (and the window changes the result)."""
    from radixlm.attention.triton_kernels import decode_attention_fwd, extend_attention_fwd
    from radixlm.attention.triton_kernels.decode_attention import decode_buffers
    from radixlm.attention.triton_kernels.reference import ref_decode_attention, ref_extend_attention

    hq, hk, d, w = 4, 2, 16, 5
    case = Case(hq, hk, d, prefix_lens=[12, 0], extend_lens=[6, 11], seed=27)
    t = sum(case.extend_lens)
    q, k, v = case.q[0].view(t, hq, d), case.k[0].view(t, hk, d), case.v[0].view(t, hk, d)
    kb, vb, f, tr, tm = stored_extend(case, k, v)

    args = (kb, vb, case.r2t.req_to_token, f["req_pool_indices"], f["extend_prefix_lens"], f["extend_seq_lens"], 0.3)
    o = torch.empty(t, hq, d, device=DEVICE)
    extend_attention_fwd(q, k, v, o, kb, vb, case.r2t.req_to_token, f["req_pool_indices"],
                         f["extend_prefix_lens"], i32([0, 6]), f["extend_seq_lens"], i32(tr), i32(tm), 0.3,
                         block_m=8, block_n=8, sliding_window=w)
    torch.testing.assert_close(o, ref_extend_attention(q, *args, sliding_window=w), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(o, ref_extend_attention(q, *args), atol=1e-3)

    seq = f["seq_lens"]
    qd = case.q[0][:2].view(2, hq, d)
    mid = decode_buffers(2, hq, 2, d, DEVICE)
    od = torch.empty_like(qd)
    decode_attention_fwd(qd, od, kb, vb, case.r2t.req_to_token, f["req_pool_indices"], seq, 2, *mid, 0.25,
                         block_n=8, sliding_window=w)
    ref = ref_decode_attention(qd, kb, vb, case.r2t.req_to_token, f["req_pool_indices"], seq, 0.25, sliding_window=w)
    torch.testing.assert_close(od, ref, atol=1e-4, rtol=1e-4)


def test_engine_sliding_window_matches_hf(model_factory, hf_reference_factory):
    """Tiny mistral with a window of 8 through the triton backend: HF's greedy tokens on prompts
    longer than the window, and after a radix-cache hit across the window boundary."""
    path = model_factory("mistral", sliding_window=8)
    ref = hf_reference_factory(path)
    first = [[5, 17, 33, 101, 7, 250, 64, 9, 300, 12, 45, 77, 3, 8]]
    later = [first[0] + [77, 78, 79], [400, 401, 5, 99, 98, 97, 96, 95, 94, 93, 92]]
    got = _engine_tokens(path, "triton", DEVICE, first, later, 4)
    assert got == [ref.greedy(p, 4)[0] for p in first + later]


@pytest.mark.gpu
@gpu
def test_gpu_engine_sliding_window_matches_torch_native(model_factory):
    import random

    rng = random.Random(1)
    path = model_factory("mistral", sliding_window=100)
    first = [[rng.randrange(3, 500) for _ in range(n)] for n in (300, 1000, 7)]
    later = [first[1] + [rng.randrange(3, 500) for _ in range(200)], first[0] + [11]]
    got = {b: _engine_tokens(path, b, "cuda", first, later, 24) for b in ("torch_native", "triton")}
    assert got["triton"] == got["torch_native"]
