"""MoE decode throughput of the expert runners, side by side in one run: the same model in memory,
the same prompts, the runner switched between measurements (`--moe-runner-backend`: torch_reference,
torch_grouped, and triton when CUDA is present), interleaved over `--repeats` rounds so that load
drift on a shared machine hits every runner alike.

End to end: a static batch through the ModelRunner (bench/one_batch.py's `run_once`: one prefill of
B prompts of `--input-len` tokens, then `--output-len` - 1 greedy decode steps); decode tok/s =
B / median step latency, the best round. Layer alone: one MoE block (router + experts) on T = B
tokens, best time per call. Prints a markdown table.

    python -m radixlm.bench.moe [--arch qwen3_moe|mixtral] [--size small] [--model-path DIR]
        [--batch-size 1 8 32] [--input-len 64] [--output-len 32] [--repeats 3] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from typing import Dict, List, Optional

import torch


def runners(device: str) -> List[str]:
    names = ["torch_reference", "torch_grouped"]
    return names + ["triton"] if device.startswith("cuda") else names


def layer_us(block, num_tokens: int, repeats: int = 20) -> float:
    """Best time of one MoE block (routing included) on `num_tokens` tokens, microseconds."""
    w = block.experts.w13_weight
    x = torch.randn(num_tokens, w.shape[2], dtype=w.dtype, device=w.device)
    best = float("inf")
    with torch.inference_mode():
        for i in range(repeats + 2):
            if w.is_cuda:
                torch.cuda.synchronize()
            t = time.perf_counter()
            block(x)
            if w.is_cuda:
                torch.cuda.synchronize()
            if i >= 2:
                best = min(best, time.perf_counter() - t)
    return best * 1e6


def run(model_path: str, batch_sizes: List[int], input_len: int, output_len: int, repeats: int,
        device: str = "cpu") -> Dict:
    """{"decode": {(runner, B): tok/s}, "layer": {(runner, B): µs}} for every runner of `device`."""
    from radixlm.bench.one_batch import run_once
    from radixlm.engine.model_runner import ModelRunner, RunnerConfig
    from radixlm.layers.moe import configure_moe_runner
    from radixlm.layers.moe.layer import SparseMoeBlock
    from radixlm.models.model_config import ModelConfig

    mc = ModelConfig.from_path(model_path, device=device)
    runner = ModelRunner(mc, RunnerConfig(device=device, max_running_requests=max(batch_sizes),
                                          max_total_tokens=max(batch_sizes) * (input_len + output_len) + 64))
    rng = random.Random(0)
    vocab = min(mc.vocab_size, 500)
    prompts = {bs: [[rng.randrange(3, vocab) for _ in range(input_len)] for _ in range(bs)] for bs in batch_sizes}
    block = next(m for m in runner.model.modules() if isinstance(m, SparseMoeBlock))
    res: Dict = {"decode": {}, "layer": {}}
    names = runners(device)
    with torch.inference_mode():
        for name in names:  # warm-up (and Triton's compilation) outside the timed rounds
            configure_moe_runner(runner.model, name, device)
            run_once(runner, prompts[batch_sizes[0]], 3)
        for _ in range(repeats):
            for bs in batch_sizes:
                for name in names:
                    configure_moe_runner(runner.model, name, device)
                    tps = run_once(runner, prompts[bs], output_len)["decode_throughput_tok_s"]
                    res["decode"][(name, bs)] = max(res["decode"].get((name, bs), 0.0), tps)
                    us = layer_us(block, bs)
                    res["layer"][(name, bs)] = min(res["layer"].get((name, bs), float("inf")), us)
    return res


def table(res: Dict, batch_sizes: List[int]) -> str:
    names = [n for n in ("torch_reference", "torch_grouped", "triton") if (n, batch_sizes[0]) in res["decode"]]
    lines = ["| batch | " + " | ".join(f"{n} decode tok/s" for n in names) + " | "
             + " | ".join(f"{n} MoE layer µs" for n in names) + " |",
             "|---:|" + "---:|" * (2 * len(names))]
    for bs in batch_sizes:
        dec = " | ".join(f"{res['decode'][(n, bs)]:.1f}" for n in names)
        lay = " | ".join(f"{res['layer'][(n, bs)]:.0f}" for n in names)
        lines.append(f"| {bs} | {dec} | {lay} |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m radixlm.bench.moe", description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", choices=("qwen3_moe", "mixtral"), default="qwen3_moe")
    ap.add_argument("--size", choices=("tiny", "small", "medium"), default="small")
    ap.add_argument("--model-path", default=None, help="a MoE checkpoint (default: a generated --arch/--size one)")
    ap.add_argument("--batch-size", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--input-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    if args.output_len < 2:
        ap.error("--output-len must be at least 2 (one decode step)")
    with tempfile.TemporaryDirectory() as tmp:
        path = args.model_path
        if path is None:
            from radixlm.tools.make_tiny_model import make_tiny_model

            path = str(make_tiny_model(tmp, arch=args.arch, size=args.size))
        res = run(path, args.batch_size, args.input_len, args.output_len, args.repeats, args.device)
    print(f"model: {args.model_path or f'{args.arch} --size {args.size} (generated)'}; device {args.device}; "
          f"input {args.input_len}, output {args.output_len}; best of {args.repeats} interleaved rounds; "
          f"torch threads {torch.get_num_threads()}")
    print(table(res, args.batch_size))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
