"""Offline benchmark: N requests sharing a long prefix, radix cache on vs off, side by side in one
run on the same model. Prints a JSON line per setting and the ratio.

    python -m radixlm.bench_offline [--model-path DIR] [--num-prompts 64] [--prefix-len 512]
"""

from __future__ import annotations

import argparse
import json
import random
import time
from typing import Dict, List


def make_workload(seed: int, n: int, prefix_len: int, suffix_len: int, vocab: int) -> List[List[int]]:
    rng = random.Random(seed)
    prefix = [rng.randrange(3, vocab) for _ in range(prefix_len)]
    return [prefix + [rng.randrange(3, vocab) for _ in range(suffix_len)] for _ in range(n)]


def run_setting(model_path: str, prompts: List[List[int]], new_tokens: int, disable_radix_cache: bool,
                extra: Dict) -> Dict:
    import radixlm

    with radixlm.Engine(model_path=model_path, disable_radix_cache=disable_radix_cache, log_level="warning",
                        **extra) as eng:
        eng.generate(input_ids=[prompts[0][:8]], sampling_params={"max_new_tokens": 2})  # warm-up
        eng.flush_cache()
        sp = {"temperature": 0, "max_new_tokens": new_tokens, "ignore_eos": True}
        t0 = time.perf_counter()
        outs = eng.generate(input_ids=prompts, sampling_params=sp)
        dt = time.perf_counter() - t0
        info = eng.get_server_info()
    out_tokens = sum(o["meta_info"]["completion_tokens"] for o in outs)
    in_tokens = sum(len(p) for p in prompts)
    return {
        "radix_cache": not disable_radix_cache,
        "requests": len(prompts),
        "seconds": round(dt, 3),
        "output_tokens_per_s": round(out_tokens / dt, 1),
        "total_tokens_per_s": round((in_tokens + out_tokens) / dt, 1),
        "cache_hit_rate": round(info["cache_hit_rate"], 4),
        "cached_tokens": sum(o["meta_info"]["cached_tokens"] for o in outs),
        "_outputs": [o["output_ids"] for o in outs],
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="radix cache on vs off, shared-prefix workload")
    ap.add_argument("--model-path", default=None, help="HF checkpoint (default: build the demo model)")
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--prefix-len", type=int, default=512)
    ap.add_argument("--suffix-len", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-running-requests", type=int, default=64)
    args = ap.parse_args(argv)
    from radixlm.demo import ensure_demo_model
    from radixlm.models.model_config import ModelConfig

    path = args.model_path or ensure_demo_model()
    vocab = ModelConfig.from_path(path).vocab_size
    prompts = make_workload(args.seed, args.num_prompts, args.prefix_len, args.suffix_len, vocab)
    extra = {"max_running_requests": args.max_running_requests}
    results = [run_setting(path, prompts, args.max_new_tokens, d, extra) for d in (False, True)]
    on, off = results
    same = on.pop("_outputs") == off.pop("_outputs")
    for r in results:
        print(json.dumps(r))
    print(json.dumps({"speedup_total_tokens_per_s": round(on["total_tokens_per_s"] / off["total_tokens_per_s"], 2),
                      "greedy_outputs_identical": same}))


if __name__ == "__main__":
    main()
