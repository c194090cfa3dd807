"""Multi-LoRA benchmark: what batching different adapters together costs.

One Engine with `--num-adapters` rank-`--rank` adapters on every projection serves the same prompts
(greedy, fixed output length) as: the base model only, one adapter for every request, and the
adapters plus the base round-robin over the requests (the mixed workload of a multi-tenant server).
A second Engine without LoRA gives the plain base-model figure. Prints a markdown table (and a JSON
line per setting).

    python -m radixlm.bench.lora [--model-path DIR] [--num-prompts 64] [--input-len 128] [--output-len 32]

The adapters are random PEFT-format adapters written to a temporary directory (no training, no
download): their weights do not matter to the speed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from typing import Dict, List, Optional


def write_random_adapter(out_dir: str, model_config, rank: int, seed: int, std: float = 0.02) -> str:
    """A PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors) on every projection."""
    import torch
    from safetensors.torch import save_file

    from radixlm.lora.adapter import module_shapes

    os.makedirs(out_dir, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(model_config.num_layers):
        for module, (fan_in, fan_out) in module_shapes(model_config).items():
            part = "self_attn" if module in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            key = f"base_model.model.model.layers.{layer}.{part}.{module}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, fan_in, generator=g) * std
            tensors[f"{key}.lora_B.weight"] = torch.randn(fan_out, rank, generator=g) * std
    save_file(tensors, os.path.join(out_dir, "adapter_model.safetensors"))
    with open(os.path.join(out_dir, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "bias": "none",
                   "target_modules": sorted(module_shapes(model_config))}, f)
    return out_dir


def run(eng, prompts: List[List[int]], loras: List[Optional[str]], output_len: int, repeats: int) -> Dict:
    """The fastest of `repeats` runs (radix cache flushed before each): the machines are shared."""
    sp = {"temperature": 0, "max_new_tokens": output_len, "ignore_eos": True}
    dt = float("inf")
    for _ in range(repeats):
        eng.flush_cache()
        t0 = time.perf_counter()
        outs = eng.generate(input_ids=prompts, sampling_params=sp, lora_path=loras)
        dt = min(dt, time.perf_counter() - t0)
    out_tokens = sum(o["meta_info"]["completion_tokens"] for o in outs)
    in_tokens = sum(len(p) for p in prompts)
    return {"requests": len(prompts), "seconds": round(dt, 3), "output_tokens_per_s": round(out_tokens / dt, 1),
            "total_tokens_per_s": round((in_tokens + out_tokens) / dt, 1)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="multi-LoRA throughput: mixed adapters vs base vs one adapter")
    ap.add_argument("--model-path", default=None, help="HF checkpoint (default: build the demo model)")
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--num-adapters", type=int, default=4)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--max-running-requests", type=int, default=64)
    ap.add_argument("--lora-backend", default="auto", choices=("auto", "torch", "triton"))
    ap.add_argument("--device", default="auto")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3, help="runs per setting; the fastest is reported")
    args = ap.parse_args(argv)

    import radixlm
    from radixlm.demo import ensure_demo_model
    from radixlm.models.model_config import ModelConfig

    path = args.model_path or ensure_demo_model()
    mc = ModelConfig.from_path(path)
    rng = random.Random(args.seed)
    prompts = [[rng.randrange(3, mc.vocab_size) for _ in range(args.input_len)] for _ in range(args.num_prompts)]
    names = [f"lora{i}" for i in range(args.num_adapters)]
    common = dict(model_path=path, log_level="warning", max_running_requests=args.max_running_requests,
                  device=args.device)
    rows = []
    with tempfile.TemporaryDirectory(prefix="radixlm-lora-bench-") as tmp:
        paths = [f"{n}={write_random_adapter(os.path.join(tmp, n), mc, args.rank, i)}" for i, n in enumerate(names)]
        with radixlm.Engine(**common) as eng:
            eng.generate(input_ids=[prompts[0][:8]], sampling_params={"max_new_tokens": 2})  # warm-up
            rows.append(("base, LoRA off", run(eng, prompts, [None] * len(prompts), args.output_len, args.repeats)))
        with radixlm.Engine(**common, lora_paths=paths, max_loras_per_batch=args.num_adapters + 1,
                            lora_backend=args.lora_backend) as eng:
            eng.generate(input_ids=[prompts[0][:8]], sampling_params={"max_new_tokens": 2}, lora_path=names[0])
            rows.append(("base, LoRA on", run(eng, prompts, [None] * len(prompts), args.output_len, args.repeats)))
            rows.append(("one adapter", run(eng, prompts, [names[0]] * len(prompts), args.output_len, args.repeats)))
            mix = [([None] + names)[i % (len(names) + 1)] for i in range(len(prompts))]
            rows.append((f"{len(names)} adapters + base, round-robin",
                         run(eng, prompts, mix, args.output_len, args.repeats)))
    base = rows[0][1]["output_tokens_per_s"]
    print(f"model {os.path.basename(path.rstrip('/'))}, {args.num_prompts} requests x {args.input_len} in / "
          f"{args.output_len} out, rank {args.rank}\n")
    print("| workload | seconds | output tok/s | total tok/s | vs base, LoRA off |")
    print("|---|---|---|---|---|")
    for name, r in rows:
        print(f"| {name} | {r['seconds']} | {r['output_tokens_per_s']} | {r['total_tokens_per_s']} | "
              f"{r['output_tokens_per_s'] / base:.2f} |")
    for name, r in rows:
        print(json.dumps({"workload": name, **r}))


if __name__ == "__main__":
    main()
