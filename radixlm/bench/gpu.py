"""GPU benchmark of the triton attention backend on real model shapes (random "dummy" weights).

    python -m radixlm.bench.gpu [--shapes qwen3-0.6b,llama3.1-8b] [--time-budget 420]

Writes its own configs to a temp dir (a Llama-3.1-8B-shaped and a Qwen3-0.6B-shaped config.json;
no tokenizer: the engine runs with skip_tokenizer_init and token ids) and prints one JSON line per
figure, each with its fraction of a simple roofline (H200: 4.3e12 B/s HBM, 790e12 bf16 FLOP/s).
Engines run with CUDA graphs for decode (the default); engine_ready says which batch sizes and how
long the capture took.
  decode_b1           batch-1 decode tokens/s (512-token prompt, 256 new tokens)
  decode_b1_no_cuda_graph
                      the same with --disable-cuda-graph (ablation; Qwen3-0.6B shape only)
  ttft_4096           time to first token of a 4096-token prompt (median of 3 uncached prompts)
  shared_prefix_ttft  median TTFT over 16 sequential requests = 3000-token shared prefix + 500 new
  throughput_64       output tokens/s, 64 requests of 512 in / 256 out, submitted together
  offline_1000        output tokens/s, 1000 requests with seeded ShareGPT-like (lognormal) lengths
Rooflines: decode step = (weights + KV read) bytes / 4.3e12; prefill = (2 * params * tokens +
attention) FLOPs / 790e12; batch workloads = prefill time + decode steps at the running batch.
Then `fused_kernel` lines: the fused RMSNorm+residual, SiLU-and-mul and rotary kernels against their
torch references at 4096 bf16 tokens of the 8B shape (ms, speed-up, GB/s). Before the numbers, a
correctness check: greedy tokens of triton vs torch_native on the same model
(dummy Qwen3-0.6B shape, and a small real-weight checkpoint where attention visibly matters) must
agree on the first 32 tokens. Every workload is skipped, with a JSON line saying so, once the time
budget is spent; without CUDA it prints why and exits with status 2.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from typing import Dict, List, Optional

HBM_BYTES_PER_S = 4.3e12
BF16_FLOPS = 790e12
CONTEXT_LEN = 8192
MAX_TOTAL_TOKENS = 200_000  # KV pool per engine (~26 GB for the 8B shape), enough for every workload

SHAPES: Dict[str, dict] = {
    "qwen3-0.6b": {
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 1024,
        "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128,
        "intermediate_size": 3072, "vocab_size": 151936, "tie_word_embeddings": True, "hidden_act": "silu",
        "max_position_embeddings": 40960, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "rope_scaling": None,
        "attention_bias": False, "bos_token_id": 151643, "eos_token_id": 151645, "torch_dtype": "bfloat16",
    },
    "llama3.1-8b": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
        "intermediate_size": 14336, "vocab_size": 128256, "tie_word_embeddings": False, "hidden_act": "silu",
        "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192},
        "attention_bias": False, "mlp_bias": False, "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009],
        "torch_dtype": "bfloat16",
    },
}


def emit(obj: dict) -> None:
    print(json.dumps(obj), flush=True)


class Budget:
    def __init__(self, seconds: float):
        self.deadline = time.perf_counter() + seconds

    def left(self) -> float:
        return self.deadline - time.perf_counter()


def write_config(root: str, name: str) -> str:
    path = os.path.join(root, name)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(SHAPES[name], f, indent=1)
    return path


def make_engine(path: str, backend: str, **kw):
    import radixlm

    args = dict(model_path=path, load_format="dummy", dtype="bfloat16", device="cuda", attention_backend=backend,
                context_length=CONTEXT_LEN, skip_tokenizer_init=True, max_total_tokens=MAX_TOTAL_TOKENS,
                log_level="warning")
    args.update(kw)
    return radixlm.Engine(**args)


def cuda_graph_bs(eng) -> int:
    """The largest decode batch the engine replays from a CUDA graph (0: graphs off)."""
    gr = eng.scheduler.runner.cuda_graph_runner
    return gr.max_bs if gr is not None else 0


def close_engine(eng) -> None:
    import torch

    eng.shutdown()
    del eng
    gc.collect()
    torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------ rooflines
class Roofline:
    def __init__(self, eng):
        mc = eng.model_config
        model = eng.scheduler.runner.model
        self.params = sum(p.numel() for p in model.parameters())
        self.hidden, self.vocab = mc.hidden_size, mc.vocab_size
        self.layers, self.hq, self.hk, self.d = mc.num_layers, mc.num_heads, mc.num_kv_heads, mc.head_dim
        embed = self.vocab * self.hidden
        # per decode step: every weight once, except the (untied) input embedding, of which one row
        self.weight_bytes = 2 * (self.params - (0 if mc.tie_word_embeddings else embed))
        # FLOPs per token of the matmuls (the LM head only runs on a request's last position)
        self.body_params = self.params - embed * (1 if mc.tie_word_embeddings else 2)
        self.kv_bytes_per_token = 2 * self.layers * self.hk * self.d * 2

    def decode_step_s(self, batch: int, avg_ctx: float) -> float:
        return (self.weight_bytes + batch * avg_ctx * self.kv_bytes_per_token) / HBM_BYTES_PER_S

    def prefill_s(self, new: int, prefix: int = 0, requests: int = 1) -> float:
        """new/prefix: tokens per request."""
        attn = 4 * self.layers * self.hq * self.d * (new * prefix + new * new / 2)
        flops = requests * (2 * self.body_params * new + attn + 2 * self.vocab * self.hidden)
        return flops / BF16_FLOPS


# ------------------------------------------------------------------------------------------ workloads
def rand_ids(rng: random.Random, n: int, vocab: int) -> List[int]:
    return [rng.randrange(10, vocab - 10) for _ in range(n)]


def greedy(n: int) -> dict:
    return {"temperature": 0, "max_new_tokens": n, "ignore_eos": True}


def bench_decode_b1(eng, rf: Roofline, rng, shape):
    prompt = rand_ids(rng, 512, rf.vocab)
    t0 = time.perf_counter()
    first, n = None, 0
    for chunk in eng.generate(input_ids=prompt, sampling_params=greedy(256), stream=True):
        if first is None:
            first = time.perf_counter()
        n += len(chunk["output_ids"])
    end = time.perf_counter()
    tok_s = (n - 1) / (end - first)
    ideal = 1.0 / rf.decode_step_s(1, 512 + n / 2)
    return {"metric": "decode_b1", "shape": shape, "cuda_graph": cuda_graph_bs(eng) > 0,
            "tokens_per_s": round(tok_s, 1), "new_tokens": n,
            "ttft_s": round(first - t0, 4), "roofline_tokens_per_s": round(ideal, 1),
            "roofline_fraction": round(tok_s / ideal, 4)}


def bench_decode_b1_no_cuda_graph(path: str, rng, shape):
    """decode_b1 on a second, small-pool engine with --disable-cuda-graph (the ablation)."""
    eng = make_engine(path, "triton", disable_cuda_graph=True, max_total_tokens=8192)
    try:
        rf = Roofline(eng)
        eng.generate(input_ids=rand_ids(rng, 64, rf.vocab), sampling_params=greedy(8))  # compiles the kernels
        res = bench_decode_b1(eng, rf, rng, shape)
    finally:
        close_engine(eng)
    res["metric"] = "decode_b1_no_cuda_graph"
    return res


def bench_ttft_4096(eng, rf: Roofline, rng, shape):
    times = []
    for _ in range(3):
        prompt = rand_ids(rng, 4096, rf.vocab)  # fresh prompt: nothing cached
        t0 = time.perf_counter()
        eng.generate(input_ids=prompt, sampling_params=greedy(1))
        times.append(time.perf_counter() - t0)
    ttft = statistics.median(times)
    ideal = rf.prefill_s(4096)
    return {"metric": "ttft_4096", "shape": shape, "ttft_s": round(ttft, 4), "all_s": [round(t, 4) for t in times],
            "roofline_s": round(ideal, 4), "roofline_fraction": round(ideal / ttft, 4)}


def bench_shared_prefix(eng, rf: Roofline, rng, shape):
    eng.flush_cache()
    prefix = rand_ids(rng, 3000, rf.vocab)
    times, cached = [], []
    for _ in range(16):
        t0 = time.perf_counter()
        out = eng.generate(input_ids=prefix + rand_ids(rng, 500, rf.vocab), sampling_params=greedy(1))
        times.append(time.perf_counter() - t0)
        cached.append(out["meta_info"]["cached_tokens"])
    med = statistics.median(times)
    ideal = rf.prefill_s(500, prefix=3000)
    return {"metric": "shared_prefix_ttft", "shape": shape, "median_ttft_s": round(med, 4),
            "first_ttft_s": round(times[0], 4), "cached_tokens_median": statistics.median(cached),
            "roofline_s": round(ideal, 4), "roofline_fraction": round(ideal / med, 4)}


def run_batch(eng, prompts: List[List[int]], out_lens: List[int], budget: Budget, tag: str):
    """Submits all requests at once; aborts what is left when the budget runs out.
    Returns (seconds, output tokens, truncated)."""
    rids = [f"{tag}-{i}" for i in range(len(prompts))]
    sps = [greedy(n) for n in out_lens]
    box: dict = {}

    def work():
        try:
            box["out"] = eng.generate(input_ids=prompts, sampling_params=sps, rid=rids)
        except BaseException as e:  # noqa: BLE001 - reported by the caller
            box["err"] = e

    t0 = time.perf_counter()
    th = threading.Thread(target=work, daemon=True)
    th.start()
    th.join(timeout=max(1.0, budget.left()))
    truncated = th.is_alive()
    if truncated:
        for r in rids:
            eng.abort_request(r)
        th.join(timeout=120)
    dt = time.perf_counter() - t0
    if "err" in box:
        raise box["err"]
    outs = box.get("out") or []
    return dt, sum(o["meta_info"]["completion_tokens"] for o in outs), truncated


def bench_throughput_64(eng, rf: Roofline, rng, shape, budget):
    prompts = [rand_ids(rng, 512, rf.vocab) for _ in range(64)]
    dt, out_tokens, truncated = run_batch(eng, prompts, [256] * 64, budget, "tp64")
    tok_s = out_tokens / dt
    ideal_s = rf.prefill_s(512, requests=64) + 256 * rf.decode_step_s(64, 512 + 128)
    ideal = 64 * 256 / ideal_s
    return {"metric": "throughput_64", "shape": shape, "output_tokens_per_s": round(tok_s, 1), "seconds": round(dt, 2),
            "output_tokens": out_tokens, "truncated": truncated, "roofline_output_tokens_per_s": round(ideal, 1),
            "roofline_fraction": round(tok_s / ideal, 4)}


def sharegpt_like_lengths(n: int, seed: int = 0):
    """Seeded long-tailed (lognormal) input/output lengths: means ~220 / ~200, clipped."""
    rng = random.Random(seed)
    sigma = 0.9
    ins = [int(min(2048, max(4, rng.lognormvariate(math.log(220) - sigma ** 2 / 2, sigma)))) for _ in range(n)]
    outs = [int(min(1024, max(4, rng.lognormvariate(math.log(200) - sigma ** 2 / 2, sigma)))) for _ in range(n)]
    return ins, outs


def bench_offline(eng, rf: Roofline, rng, shape, budget, n: int, max_running: int):
    ins, outs = sharegpt_like_lengths(n)
    prompts = [rand_ids(rng, m, rf.vocab) for m in ins]
    dt, out_tokens, truncated = run_batch(eng, prompts, outs, budget, "off")
    tok_s = out_tokens / dt
    batch = min(n, max_running)
    total_out = sum(outs)
    avg_ctx = sum(i + o / 2 for i, o in zip(ins, outs)) / n
    ideal_s = (sum(rf.prefill_s(m) for m in ins)
               + total_out / batch * rf.decode_step_s(batch, avg_ctx))
    ideal = total_out / ideal_s
    return {"metric": "offline_1000" if n == 1000 else f"offline_{n}", "shape": shape,
            "output_tokens_per_s": round(tok_s, 1), "seconds": round(dt, 2), "output_tokens": out_tokens,
            "requests": n, "mean_in": round(sum(ins) / n, 1), "mean_out": round(total_out / n, 1),
            "max_in": max(ins), "max_out": max(outs), "truncated": truncated,
            "roofline_output_tokens_per_s": round(ideal, 1), "roofline_fraction": round(tok_s / ideal, 4)}


# ------------------------------------------------------------------------------------------ correctness
def greedy_agreement(path: str, label: str, n_new: int = 32, **engine_kw) -> dict:
    """Greedy tokens of triton vs torch_native on the same weights; the second call extends on
    radix-cached prefixes so both the prefix and the decode paths are compared."""
    rng = random.Random(1)
    vocab = engine_kw.pop("vocab")
    base = [rand_ids(rng, n, vocab) for n in (7, 300, 1200)]
    later = [base[1] + rand_ids(rng, 50, vocab), base[2] + rand_ids(rng, 1, vocab)]
    got, graph_bs = {}, 0
    for backend in ("triton", "torch_native"):
        # decode batches here hold at most 3 requests: graphs up to 8 keep the capture short
        eng = make_engine(path, backend, cuda_graph_max_bs=8, **engine_kw)
        try:
            if backend == "triton":
                graph_bs = cuda_graph_bs(eng)
            a = eng.generate(input_ids=base, sampling_params=greedy(n_new))
            b = eng.generate(input_ids=later, sampling_params=greedy(n_new))
            got[backend] = [o["output_ids"] for o in a + b]
        finally:
            close_engine(eng)
    tri, nat = got["triton"], got["torch_native"]
    first_diff = []
    for x, y in zip(tri, nat):
        k = next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y)))
        first_diff.append(k)
    distinct = len({t for seq in nat for t in seq})
    return {"metric": "greedy_agreement", "model": label, "tokens_per_prompt": n_new, "triton_cuda_graph_bs": graph_bs,
            "agree": all(k >= n_new for k in first_diff), "agreeing_prefix_per_prompt": first_diff,
            "distinct_tokens": distinct, "triton_first": tri[0][:8], "native_first": nat[0][:8]}


def run_correctness(root: str, budget: Budget) -> bool:
    ok = True
    path = write_config(root, "qwen3-0.6b")
    res = greedy_agreement(path, "qwen3-0.6b dummy", vocab=SHAPES["qwen3-0.6b"]["vocab_size"])
    emit(res)
    ok &= res["agree"]
    try:
        from radixlm.tools.make_tiny_model import make_tiny_model

        tiny = str(make_tiny_model(os.path.join(root, "tiny-qwen3-small"), arch="qwen3", size="small",
                                   dtype="bfloat16"))
        res = greedy_agreement(tiny, "tiny qwen3 small (real random weights, bf16)", vocab=2048,
                               load_format="safetensors", context_length=2048)
        emit(res)
        ok &= res["agree"]
    except Exception as e:  # noqa: BLE001 - reported, the benchmark goes on
        emit({"metric": "greedy_agreement", "model": "tiny qwen3 small", "error": f"{type(e).__name__}: {e}"})
        ok = False
    return ok


def _cuda_time_ms(fn, iters: int = 20) -> float:
    import torch

    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def bench_fused_kernels(tokens: int = 4096) -> List[dict]:
    """The fused layer kernels against their torch references at a prefill-sized bf16 step of the
    Llama-3.1-8B shape: time per call and bandwidth as a fraction of the HBM roofline."""
    import torch

    from radixlm.layers.activation import SiluAndMul
    from radixlm.layers.layernorm import RMSNorm
    from radixlm.layers.rotary_embedding import RotaryEmbedding

    t, dt, dev = tokens, torch.bfloat16, "cuda"
    g = torch.Generator(device=dev).manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, device=dev, dtype=dt, generator=g)

    norm, act = RMSNorm(4096, 1e-5).to(dev, dt), SiluAndMul()
    rope = RotaryEmbedding(128, 8192, 500000.0).to(dev)
    x, res, gate_up = rnd(t, 4096), rnd(t, 4096), rnd(t, 2 * 14336)
    q, k = rnd(t, 32, 128), rnd(t, 8, 128)
    pos = torch.arange(t, device=dev)
    cases = {  # name: (fused, reference, bytes the fused kernel moves)
        "add_rmsnorm": (lambda: norm(x, res), lambda: norm.forward_native(x, res), 4 * t * 4096 * 2),
        "silu_and_mul": (lambda: act(gate_up), lambda: act.forward_native(gate_up), 3 * t * 14336 * 2),
        "rotary": (lambda: rope(pos, q, k), lambda: rope.forward_native(pos, q, k), 2 * t * 40 * 128 * 2),
    }
    out = []
    for name, (fused, ref, nbytes) in cases.items():
        tf, tr = _cuda_time_ms(fused), _cuda_time_ms(ref)
        bw = nbytes / (tf / 1e3)
        out.append({"metric": "fused_kernel", "kernel": name, "tokens": t, "dtype": "bf16", "fused_ms": round(tf, 4),
                    "reference_ms": round(tr, 4), "speedup": round(tr / tf, 2), "fused_gb_s": round(bw / 1e9, 1),
                    "roofline_fraction": round(bw / HBM_BYTES_PER_S, 3)})
    return out


# ------------------------------------------------------------------------------------------ main
WORKLOADS = ["decode_b1", "decode_b1_no_cuda_graph", "ttft_4096", "shared_prefix_ttft", "throughput_64",
             "offline_1000"]
ABLATION_SHAPE = "qwen3-0.6b"  # decode_b1_no_cuda_graph runs for this shape only


def run_shape(root: str, shape: str, budget: Budget, args) -> None:
    import torch

    t0 = time.perf_counter()
    path = write_config(root, shape)
    eng = make_engine(path, "triton", max_running_requests=args.max_running)
    try:
        rf = Roofline(eng)
        gr = eng.scheduler.runner.cuda_graph_runner
        emit({"metric": "engine_ready", "shape": shape, "load_s": round(time.perf_counter() - t0, 1),
              "params": rf.params, "kv_bytes_per_token": rf.kv_bytes_per_token,
              "gpu_mem_allocated_gb": round(torch.cuda.memory_allocated() / 2**30, 1),
              "cuda_graph_bs": gr.buckets if gr is not None else [],
              "cuda_graph_capture_s": round(gr.capture_s, 1) if gr is not None else None})
        rng = random.Random(0)
        # warm-up: compiles every kernel variant (extend with and without prefix, decode)
        warm = rand_ids(rng, 200, rf.vocab)
        eng.generate(input_ids=warm, sampling_params=greedy(4))
        eng.generate(input_ids=warm + rand_ids(rng, 40, rf.vocab), sampling_params=greedy(4))
        eng.flush_cache()
        plan = [
            ("decode_b1", 20, lambda: bench_decode_b1(eng, rf, rng, shape)),
            ("decode_b1_no_cuda_graph", 30, lambda: bench_decode_b1_no_cuda_graph(path, rng, shape)),
            ("ttft_4096", 10, lambda: bench_ttft_4096(eng, rf, rng, shape)),
            ("shared_prefix_ttft", 15, lambda: bench_shared_prefix(eng, rf, rng, shape)),
            ("throughput_64", 20, lambda: bench_throughput_64(eng, rf, rng, shape, budget)),
            ("offline_1000", 30, lambda: bench_offline(eng, rf, rng, shape, budget, args.num_offline,
                                                         args.max_running)),
        ]
        for name, need_s, fn in plan:
            if name not in args.workloads or (name == "decode_b1_no_cuda_graph" and shape != ABLATION_SHAPE):
                continue
            if budget.left() < need_s:
                emit({"metric": name, "shape": shape, "skipped": f"time budget spent ({budget.left():.0f}s left)"})
                continue
            eng.flush_cache()
            try:
                emit(fn())
            except Exception as e:  # noqa: BLE001 - one failed workload must not hide the others
                emit({"metric": name, "shape": shape, "error": f"{type(e).__name__}: {e}"})
    finally:
        close_engine(eng)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description="triton backend benchmark on model shapes (H200 rooflines)")
    ap.add_argument("--shapes", default="qwen3-0.6b,llama3.1-8b")
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--time-budget", type=float, default=420.0,
                    help="seconds for everything but the last engine shutdown (default 7 min)")
    ap.add_argument("--num-offline", type=int, default=1000)
    ap.add_argument("--max-running", type=int, default=256)
    ap.add_argument("--skip-correctness", action="store_true")
    ap.add_argument("--skip-kernel-timing", action="store_true",
                    help="skip the fused layer kernels vs torch timing (line fused_kernel)")
    args = ap.parse_args(argv)
    args.workloads = set(args.workloads.split(","))
    budget = Budget(args.time_budget)

    try:
        import torch
    except ImportError:
        print("radixlm.bench.gpu: torch is not installed", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        msg = "radixlm.bench.gpu needs a CUDA GPU (torch.cuda.is_available() is False); nothing was measured"
        emit({"metric": "skipped", "reason": msg})
        print(msg, file=sys.stderr)
        return 2
    try:
        import triton  # noqa: F401
    except ImportError:
        emit({"metric": "skipped", "reason": "the triton package is not installed"})
        return 2
    emit({"metric": "device", "name": torch.cuda.get_device_name(), "torch": torch.__version__,
          "triton": triton.__version__})
    ok = True
    with tempfile.TemporaryDirectory(prefix="radixlm-bench-") as root:
        if not args.skip_correctness:
            ok = run_correctness(root, budget)
        if not args.skip_kernel_timing:
            try:
                for line in bench_fused_kernels():
                    emit(line)
            except Exception as e:  # noqa: BLE001 - reported; the model workloads still run
                emit({"metric": "fused_kernel", "error": f"{type(e).__name__}: {e}"})
        shapes = [s for s in args.shapes.split(",") if s]
        for i, shape in enumerate(shapes):
            if shape not in SHAPES:
                emit({"metric": "error", "reason": f"unknown shape {shape!r}; known: {', '.join(SHAPES)}"})
                ok = False
                continue
            if budget.left() < 30:
                emit({"metric": "shape", "shape": shape, "skipped": "time budget spent"})
                continue
            # an even share of what is left, so that a slow shape cannot starve the next ones
            run_shape(root, shape, Budget(budget.left() / (len(shapes) - i)), args)
    emit({"metric": "done", "correct": ok, "time_left_s": round(budget.left(), 1)})
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
