"""MoE decode throughput of the expert runners, side by side in one run (the same checkpoint, the same
prompts, one Engine per runner), plus the MoE layer alone at decode-sized batches.

End to end: for each runner (`--moe-runner-backend`: torch_reference, torch_grouped, and triton
when CUDA is present) and batch size B, the greedy generation of B prompts of `--input-len` tokens
is timed with 1 and with 1 + `--output-len` new tokens (radix cache off, so both prefill the same);
decode tok/s = B * output_len / (difference), best of `--repeats`. Layer alone: one MoE block's
experts (router output given) on T tokens, best-of time per call. Greedy tokens are compared across
runners (they must agree). Prints markdown tables.

    python -m radixlm.bench.moe [--arch qwen3_moe|mixtral] [--size small] [--model-path DIR]
        [--batch-size 1 8 32] [--input-len 64] [--output-len 32] [--repeats 3]
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


def decode_tok_s(eng, batch_size: int, input_len: int, output_len: int, repeats: int, seed: int = 0):
    """(best decode tokens/s, the greedy output ids of the last run)."""
    rng = random.Random(seed)
    vocab = eng.model_config.vocab_size
    prompts = [[rng.randrange(3, min(vocab, 500)) for _ in range(input_len)] for _ in range(batch_size)]

    def timed(n: int):
        t = time.perf_counter()
        outs = eng.generate(input_ids=prompts, sampling_params={"temperature": 0, "max_new_tokens": n,
                                                                  "ignore_eos": True})
        return time.perf_counter() - t, outs

    timed(2)  # warm-up
    best, outs = 0.0, None
    for _ in range(repeats):
        t1, _ = timed(1)
        tn, outs = timed(1 + output_len)
        best = max(best, batch_size * output_len / max(tn - t1, 1e-9))
    return best, [o["output_ids"] for o in outs]


def layer_us(block, num_tokens: int, runner: str, repeats: int = 20) -> float:
    """Best time of one MoE block's experts (routing included) on `num_tokens` tokens, microseconds."""
    w = block.experts.w13_weight
    x = torch.randn(num_tokens, w.shape[2], dtype=w.dtype, device=w.device)
    block.runner = runner
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
        device: str = "auto") -> Dict:
    import radixlm
    from radixlm.layers.moe.layer import SparseMoeBlock

    results: Dict = {"decode": {}, "layer": {}, "tokens": {}}
    for runner in runners(device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")):
        with radixlm.Engine(model_path=model_path, log_level="warning", moe_runner_backend=runner, device=device,
                            disable_radix_cache=True, max_total_tokens=max(batch_sizes) * (input_len + output_len
                                                                                          + 8) + 64) as eng:
            for bs in batch_sizes:
                tps, ids = decode_tok_s(eng, bs, input_len, output_len, repeats)
                results["decode"][(runner, bs)] = tps
                results["tokens"][(runner, bs)] = ids
            block = next(m for m in eng.scheduler.runner.model.modules() if isinstance(m, SparseMoeBlock))
            for bs in batch_sizes:
                results["layer"][(runner, bs)] = layer_us(block, bs, runner)
    return results


def table(results: Dict, batch_sizes: List[int]) -> str:
    names = sorted({r for r, _ in results["decode"]}, key=["torch_reference", "torch_grouped", "triton"].index)
    lines = ["| batch | " + " | ".join(f"{n} decode tok/s" for n in names) + " | "
             + " | ".join(f"{n} layer µs" for n in names) + " |",
             "|---:|" + "---:|" * (2 * len(names))]
    for bs in batch_sizes:
        dec = " | ".join(f"{results['decode'][(n, bs)]:.1f}" for n in names)
        lay = " | ".join(f"{results['layer'][(n, bs)]:.0f}" for n in names)
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
    ap.add_argument("--device", default="auto")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        path = args.model_path
        if path is None:
            from radixlm.tools.make_tiny_model import make_tiny_model

            path = str(make_tiny_model(tmp, arch=args.arch, size=args.size))
        res = run(path, args.batch_size, args.input_len, args.output_len, args.repeats, args.device)
    print(f"model: {args.model_path or f'{args.arch} --size {args.size} (generated)'}, input {args.input_len}, "
          f"output {args.output_len}, best of {args.repeats}, torch threads {torch.get_num_threads()}")
    print(table(res, args.batch_size))
    ref = {bs: res["tokens"][("torch_reference", bs)] for bs in args.batch_size}
    same = all(ids == ref[bs] for (r, bs), ids in res["tokens"].items())
    print(f"greedy tokens identical across runners: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
