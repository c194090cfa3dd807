"""Offline benchmark: N requests sharing a long prefix, radix cache on vs off, side by side in one
run on the same model. Prints a JSON line per setting and the ratio.

    python -m radixlm.bench_offline [--model-path DIR] [--num-prompts 64] [--prefix-len 512]

The bench_serving datasets work here too (`--dataset-name random|generated-shared-prefix|sharegpt`
with the same flags); the default (`shared-prefix`) is the workload above.
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


def _sampling(new_tokens) -> object:
    if isinstance(new_tokens, list):
        return [{"temperature": 0, "max_new_tokens": n, "ignore_eos": True} for n in new_tokens]
    return {"temperature": 0, "max_new_tokens": new_tokens, "ignore_eos": True}


def run_setting(model_path: str, prompts: List[List[int]], new_tokens, disable_radix_cache: bool,
                extra: Dict) -> Dict:
    import radixlm

    with radixlm.Engine(model_path=model_path, disable_radix_cache=disable_radix_cache, log_level="warning",
                        **extra) as eng:
        eng.generate(input_ids=[prompts[0][:8]], sampling_params={"max_new_tokens": 2})  # warm-up
        eng.flush_cache()
        sp = _sampling(new_tokens)
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


def run_hf_baseline(model_path: str, prompts: List[List[int]], new_tokens, batch_size: int) -> Dict:
    """HF transformers `generate` (greedy, KV cache, left-padded batches) on the same prompts."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path).eval()
    lens = new_tokens if isinstance(new_tokens, list) else [new_tokens] * len(prompts)
    t0 = time.perf_counter()
    out_tokens = 0
    with torch.inference_mode():
        for i in range(0, len(prompts), batch_size):
            chunk = prompts[i:i + batch_size]
            n_new = max(lens[i:i + batch_size])
            width = max(len(p) for p in chunk)
            ids = torch.tensor([[0] * (width - len(p)) + p for p in chunk])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n_new,
                                 min_new_tokens=n_new, do_sample=False, pad_token_id=0)
            out_tokens += sum(min(n, out.shape[1] - width) for n in lens[i:i + batch_size])
    dt = time.perf_counter() - t0
    in_tokens = sum(len(p) for p in prompts)
    return {"engine": "hf_transformers", "requests": len(prompts), "seconds": round(dt, 3),
            "output_tokens_per_s": round(out_tokens / dt, 1),
            "total_tokens_per_s": round((in_tokens + out_tokens) / dt, 1)}


def dataset_workload(args, path: str, vocab: int):
    """(prompts, per-request output lengths) from the bench_serving datasets."""
    from radixlm.bench import datasets as ds

    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(path)
        vocab = min(vocab, len(tok))
    except Exception:  # noqa: BLE001
        tok = None
    if args.dataset_name == "random":
        reqs = ds.gen_random(args.num_prompts, args.random_input_len, args.random_output_len,
                             args.random_range_ratio, vocab, args.seed)
    elif args.dataset_name == "generated-shared-prefix":
        reqs = ds.gen_shared_prefix(args.gsp_num_groups, args.gsp_prompts_per_group, args.gsp_system_prompt_len,
                                    args.gsp_question_len, args.gsp_output_len, vocab, args.seed)
    else:
        if not args.dataset_path or tok is None:
            raise SystemExit("sharegpt needs --dataset-path FILE.json and a model dir with a tokenizer")
        reqs = ds.load_sharegpt(args.dataset_path, args.num_prompts,
                                lambda t: tok.encode(t, add_special_tokens=False), seed=args.seed)
    return [r.prompt_ids for r in reqs], [r.output_len for r in reqs]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="radix cache on vs off, shared-prefix workload")
    ap.add_argument("--model-path", default=None, help="HF checkpoint (default: build the demo model)")
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--prefix-len", type=int, default=512)
    ap.add_argument("--suffix-len", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-running-requests", type=int, default=64)
    ap.add_argument("--no-hf-baseline", action="store_true", help="skip the HF transformers baseline")
    ap.add_argument("--dataset-name", choices=("shared-prefix", "random", "generated-shared-prefix", "sharegpt"),
                    default="shared-prefix", help="shared-prefix: --prefix-len/--suffix-len/--max-new-tokens")
    ap.add_argument("--dataset-path", default=None, help="sharegpt: local JSON file")
    ap.add_argument("--random-input-len", type=int, default=1024)
    ap.add_argument("--random-output-len", type=int, default=128)
    ap.add_argument("--random-range-ratio", type=float, default=0.0)
    ap.add_argument("--gsp-num-groups", type=int, default=4)
    ap.add_argument("--gsp-prompts-per-group", type=int, default=16)
    ap.add_argument("--gsp-system-prompt-len", type=int, default=512)
    ap.add_argument("--gsp-question-len", type=int, default=32)
    ap.add_argument("--gsp-output-len", type=int, default=32)
    args = ap.parse_args(argv)
    from radixlm.demo import ensure_demo_model
    from radixlm.models.model_config import ModelConfig

    path = args.model_path or ensure_demo_model()
    vocab = ModelConfig.from_path(path).vocab_size
    new_tokens = args.max_new_tokens
    if args.dataset_name == "shared-prefix":
        prompts = make_workload(args.seed, args.num_prompts, args.prefix_len, args.suffix_len, vocab)
    else:
        prompts, new_tokens = dataset_workload(args, path, vocab)
    extra = {"max_running_requests": args.max_running_requests}
    results = [run_setting(path, prompts, new_tokens, d, extra) for d in (False, True)]
    on, off = results
    same = on.pop("_outputs") == off.pop("_outputs")
    for r in results:
        print(json.dumps({"engine": "radixlm", **r}))
    summary = {"radix_on_vs_off_total_tokens_per_s": round(on["total_tokens_per_s"] / off["total_tokens_per_s"], 2),
               "greedy_outputs_identical": same}
    if not args.no_hf_baseline:
        hf = run_hf_baseline(path, prompts, new_tokens, args.max_running_requests)
        print(json.dumps(hf))
        summary["radixlm_vs_hf_total_tokens_per_s"] = round(on["total_tokens_per_s"] / hf["total_tokens_per_s"], 2)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
