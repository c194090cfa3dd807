"""Static-batch latency through the ModelRunner directly (no scheduler, no server, no radix cache):
one prefill of `batch_size` prompts of `input_len` tokens, then `output_len - 1` decode steps,
greedy. Prints prefill latency/throughput and per-step decode latency/throughput (SGLang's
bench_one_batch idea).

    python -m radixlm.bench_one_batch --model-path DIR --batch-size 1 8 --input-len 256 --output-len 16

Prompts can also come from the bench datasets (`--dataset-name random|generated-shared-prefix`,
same flags as bench_serving); the batch then holds those prompts as they are (ragged lengths).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from types import SimpleNamespace
from typing import Dict, List


@contextlib.contextmanager
def reference_path(runner):
    """The decode step as it was before the CPU fast paths: eager (no compiled step) with SDPA decode
    attention and oneDNN for every matmul (no row-streaming gemv). The comparison runs each step on
    it too (`--compare-reference`)."""
    from radixlm.layers import cpu_gemv

    compiled, backend = runner.cpu_compile_runner, runner.attn_backend
    impl = getattr(backend, "decode_impl", None)
    runner.cpu_compile_runner = None
    if impl is not None:
        backend.decode_impl = "sdpa"
    try:
        with cpu_gemv.turned_off():
            yield
    finally:
        runner.cpu_compile_runner = compiled
        if impl is not None:
            backend.decode_impl = impl


def run_once(runner, prompts: List[List[int]], output_len: int, profile: bool = False,
             compare: bool = False) -> Dict:
    from radixlm.core import ForwardMode, ScheduleBatch

    pool, alloc = runner.req_to_token_pool, runner.allocator
    bs = len(prompts)
    rows = [pool.alloc() for _ in range(bs)]
    if any(r is None for r in rows):
        raise RuntimeError("batch larger than max_running_requests")
    lens = [len(p) for p in prompts]
    held = []
    prof = None
    steps, cpu, ref_steps, ref_cpu = [], [], [], []
    try:
        loc = alloc.alloc(sum(lens))
        if loc is None:
            raise RuntimeError("KV pool too small for this batch")
        held.append(loc)
        off = 0
        for r, n in zip(rows, lens):
            pool.write(r, 0, loc[off:off + n])
            off += n
        reqs = [SimpleNamespace(kv=SimpleNamespace(req_pool_idx=r)) for r in rows]
        flat = [t for p in prompts for t in p]
        batch = ScheduleBatch(reqs, ForwardMode.EXTEND, flat, loc, [0] * bs, list(lens), [True] * bs)
        t0 = time.perf_counter()
        logits, _ = runner.forward(batch)
        nxt = logits.argmax(-1).tolist()
        prefill = time.perf_counter() - t0
        cur = list(lens)
        for _ in range(output_len - 1):
            loc = alloc.alloc(bs)
            if loc is None:
                raise RuntimeError("KV pool too small for the decode steps")
            held.append(loc)
            for i, r in enumerate(rows):
                pool.write(r, cur[i], loc[i:i + 1])
            batch = ScheduleBatch(reqs, ForwardMode.DECODE, nxt, loc, list(cur), [1] * bs, [True] * bs)
            if profile and prof is None and len(steps) == 0:
                prof = _start_profile(runner)
            if compare:  # the same step first on the reference path (it writes the same KV)
                with reference_path(runner):
                    t, c = time.perf_counter(), time.process_time()
                    runner.forward(batch)[0].argmax(-1).tolist()
                    ref_steps.append(time.perf_counter() - t)
                    ref_cpu.append(time.process_time() - c)
            t, c = time.perf_counter(), time.process_time()
            logits, _ = runner.forward(batch)
            nxt = logits.argmax(-1).tolist()
            steps.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
            cur = [c + 1 for c in cur]
    finally:
        if prof is not None:
            _stop_profile(prof, f"batch {bs}, {len(steps)} decode steps")
        for h in held:
            alloc.free(h)
        for r in rows:
            pool.free(r)
    med = statistics.median(steps) if steps else 0.0
    return {
        "batch_size": bs, "input_len": max(lens), "total_input_tokens": sum(lens), "output_len": output_len,
        "prefill_latency_s": round(prefill, 4), "prefill_throughput_tok_s": round(sum(lens) / prefill, 1),
        "median_decode_latency_s": round(med, 5),
        "mean_decode_latency_s": round(statistics.mean(steps), 5) if steps else 0.0,
        "decode_throughput_tok_s": round(bs / med, 1) if med else 0.0,
        "median_decode_cpu_s": round(statistics.median(cpu), 5) if cpu else 0.0,
        **({"reference_median_decode_latency_s": round(statistics.median(ref_steps), 5),
            "reference_median_decode_cpu_s": round(statistics.median(ref_cpu), 5),
            "reference_decode_throughput_tok_s": round(bs / statistics.median(ref_steps), 1)} if ref_steps else {}),
        "total_latency_s": round(prefill + sum(steps), 4),
        "overall_throughput_tok_s": round((sum(lens) + bs * output_len) / (prefill + sum(steps)), 1),
    }


# (module class path, method, range name): the parts of a step the profile table names (eager path)
_PROFILE_RANGES = [
    ("radixlm.layers.linear:QKVParallelLinear", "forward", "qkv_proj"),
    ("radixlm.layers.linear:MergedColumnParallelLinear", "forward", "gate_up_proj"),
    ("radixlm.layers.linear:RowParallelLinear", "forward", "o_proj/down_proj"),
    ("radixlm.layers.layernorm:RMSNorm", "forward", "rmsnorm(+residual)"),
    ("radixlm.layers.rotary_embedding:RotaryEmbedding", "forward", "rope"),
    ("radixlm.layers.activation:SiluAndMul", "forward", "silu_and_mul"),
    ("radixlm.attention.torch_native:TorchNativeAttnBackend", "forward_decode", "attention_decode"),
    ("radixlm.attention.torch_native:TorchNativeAttnBackend", "init_forward_metadata", "attention_metadata"),
    ("radixlm.layers.vocab_embedding:ParallelLMHead", "compute_logits", "lm_head"),
    ("radixlm.engine.model_runner:ModelRunner", "build_forward_batch", "build_forward_batch"),
]


def _start_profile(runner):
    """torch.profiler over the next steps, with a record_function range around each layer part
    (patched on the classes for the profile's duration only)."""
    import importlib

    from torch.profiler import ProfilerActivity, profile, record_function

    patched = []
    # the compiled step is not patched: new methods would fail its guards and recompile it in the profile
    ranges = [] if getattr(runner, "cpu_compile_runner", None) is not None else _PROFILE_RANGES
    for where, meth, name in ranges:
        mod, cls_name = where.split(":")
        cls = getattr(importlib.import_module(mod), cls_name)
        orig = cls.__dict__.get(meth)
        if orig is None:
            continue

        def wrapped(*a, _orig=orig, _name=name, **k):
            with record_function(_name):
                return _orig(*a, **k)
        setattr(cls, meth, wrapped)
        patched.append((cls, meth, orig))
    prof = profile(activities=[ProfilerActivity.CPU])
    prof.__enter__()
    prof._radixlm_patched = patched
    return prof


def _stop_profile(prof, title: str) -> None:
    prof.__exit__(None, None, None)
    for cls, meth, orig in prof._radixlm_patched:
        setattr(cls, meth, orig)
    print(f"--- torch.profiler: {title} (CPU time, ranges are inclusive) ---")
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=30, max_name_column_width=45))


def make_prompts(args, bs: int, vocab: int) -> List[List[int]]:
    from radixlm.bench import datasets as ds

    if args.dataset_name == "generated-shared-prefix":
        reqs = ds.gen_shared_prefix(max(1, bs // max(1, args.gsp_prompts_per_group)) or 1, args.gsp_prompts_per_group,
                                    args.gsp_system_prompt_len, args.gsp_question_len, 1, vocab, args.seed)
        return [r.prompt_ids for r in reqs][:bs]
    ratio = args.random_range_ratio if args.dataset_name == "random" else 1.0
    return [r.prompt_ids for r in ds.gen_random(bs, args.input_len, 1, ratio, vocab, args.seed)]


def main(argv=None) -> List[Dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-path", default=None, help="default: the demo model")
    ap.add_argument("--batch-size", type=int, nargs="+", default=[1])
    ap.add_argument("--input-len", type=int, nargs="+", default=[256])
    ap.add_argument("--output-len", type=int, default=16)
    ap.add_argument("--dataset-name", choices=("fixed", "random", "generated-shared-prefix"), default="fixed",
                    help="fixed: every prompt exactly --input-len random ids")
    ap.add_argument("--random-range-ratio", type=float, default=0.0)
    ap.add_argument("--gsp-prompts-per-group", type=int, default=4)
    ap.add_argument("--gsp-system-prompt-len", type=int, default=256)
    ap.add_argument("--gsp-question-len", type=int, default=32)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--max-total-tokens", type=int, default=None)
    ap.add_argument("--dtype", default="auto", help="model dtype (auto: the checkpoint's)")
    ap.add_argument("--attention-backend", default="auto")
    ap.add_argument("--enable-torch-compile", action="store_true",
                    help="CPU: compiled decode steps (engine/cpu_compile_runner.py); the first run of each "
                         "batch size compiles (reported as compile_s)")
    ap.add_argument("--torch-compile-max-bs", type=int, default=None)
    ap.add_argument("--compare-reference", action="store_true",
                    help="run every decode step twice, on the reference path (eager, SDPA decode attention: "
                         "the step before the CPU fast paths) and then on the configured one, and report both")
    ap.add_argument("--profile", action="store_true",
                    help="also print a torch.profiler table of 5 decode steps per configuration")
    ap.add_argument("--warmup", type=int, default=1, help="untimed runs first")
    ap.add_argument("--output-file", default=None, help="append one JSON line per configuration")
    args = ap.parse_args(argv)

    from radixlm.demo import ensure_demo_model
    from radixlm.engine.model_runner import ModelRunner, RunnerConfig
    from radixlm.models.model_config import ModelConfig

    path = args.model_path or ensure_demo_model()
    mc = ModelConfig.from_path(path, dtype=args.dtype, device=args.device)
    vocab = mc.vocab_size
    try:
        from transformers import AutoTokenizer

        vocab = min(vocab, len(AutoTokenizer.from_pretrained(path)))
    except Exception:  # noqa: BLE001 - ids below the model's vocab are fine without a tokenizer
        pass
    need = max(args.batch_size) * (max(args.input_len) + args.output_len + args.gsp_system_prompt_len) + 64
    runner = ModelRunner(mc, RunnerConfig(device=args.device, max_total_tokens=args.max_total_tokens or need,
                                          max_running_requests=max(args.batch_size),
                                          attention_backend=args.attention_backend,
                                          enable_torch_compile=args.enable_torch_compile,
                                          torch_compile_max_bs=args.torch_compile_max_bs))
    out = []
    for bs in args.batch_size:
        for il in args.input_len:
            a = argparse.Namespace(**{**vars(args), "input_len": il})
            prompts = make_prompts(a, bs, vocab)
            t0 = time.perf_counter()
            for _ in range(args.warmup):
                run_once(runner, [p[:8] for p in prompts], 2)
            warm = time.perf_counter() - t0
            r = {"model_path": path, "dataset_name": args.dataset_name, "dtype": str(mc.dtype).replace("torch.", ""),
                 "torch_compile": args.enable_torch_compile,
                 **run_once(runner, prompts, args.output_len, compare=args.compare_reference)}
            if args.enable_torch_compile:
                r["warmup_s"] = round(warm, 1)  # includes compiling this batch size's bucket
            if args.profile:
                run_once(runner, prompts, 6, profile=True)
            print(f"batch {bs:>4}  input {r['input_len']:>5}  prefill {1000 * r['prefill_latency_s']:9.2f} ms "
                  f"({r['prefill_throughput_tok_s']:9.1f} tok/s)  decode step median "
                  f"{1000 * r['median_decode_latency_s']:8.2f} ms ({r['decode_throughput_tok_s']:8.1f} tok/s)  "
                  f"total {r['total_latency_s']:.3f} s")
            if args.compare_reference:
                ref_ms = 1000 * r['reference_median_decode_latency_s']
                print(f"   {r['dtype']:8s} decode step median: reference {ref_ms:8.2f}"
                      f" ms (cpu {1000 * r['reference_median_decode_cpu_s']:.2f})  this path "
                      f"{1000 * r['median_decode_latency_s']:8.2f} ms (cpu {1000 * r['median_decode_cpu_s']:.2f})  "
                      f"speed-up {r['reference_median_decode_latency_s'] / r['median_decode_latency_s']:.2f}x")
            print(json.dumps(r))
            if args.output_file:
                with open(args.output_file, "a") as f:
                    f.write(json.dumps(r) + "\n")
            out.append(r)
    return out


if __name__ == "__main__":
    main()
