"""Speculative decoding: output tok/s and accept length, no speculation vs NGRAM vs STANDALONE, side by
side in one run, at batch 1 and 8, on two workloads.

    python -m radixlm.bench.speculative       # the demo pair (models/demo-pair; trained first if missing)
    python -m radixlm.bench.speculative --pair-dir DIR --new-tokens 128 --batch-sizes 1,8

Workloads (greedy, ignore_eos, every configuration must give the same tokens: checked):
- `rewrite`: an agent rewriting a file it was shown: the prompt holds a stdlib source excerpt and then
  restarts it, so the continuation copies the prompt (where NGRAM should shine);
- `fresh`: a short prompt with nothing to copy (where NGRAM should not).
STANDALONE drafts with the pair's draft model (radixlm.tools.train_demo). Each configuration is an
in-process Engine; every timed call is preceded by one untimed warm-up of the same shape (so the
target's prompt KV is a radix-cache hit in the timed call and the figures are decode speed; the draft
model has no radix cache and prefills the prompt again).
"""

from __future__ import annotations

import argparse
import inspect
import os
import pathlib
import time
from typing import Dict, List


def ensure_pair(pair_dir: str, time_budget: float) -> pathlib.Path:
    """The pair in `pair_dir`; trained there with train_demo's defaults (as `make serve` does) if missing."""
    p = pathlib.Path(pair_dir)
    if (p / "target" / "config.json").exists() and (p / "draft" / "config.json").exists():
        return p
    from radixlm.tools import train_demo

    print(f"training the demo pair into {p} (~10 minutes on 2 idle cores) ...", flush=True)
    logs = train_demo.train_pair(p, time_budget=time_budget, progress=False)
    print(train_demo.loss_table(logs), flush=True)
    return p


def workloads(tokenizer, n: int, rewrite_chars: int) -> Dict[str, List[List[int]]]:
    import json
    import string
    import textwrap

    files = [inspect.getsource(m) for m in (textwrap, json.encoder, json.decoder, argparse, pathlib, os, string,
                                            inspect)]
    rewrite, fresh = [], []
    for i in range(n):
        src = files[i % len(files)]
        start = (i // len(files)) * rewrite_chars
        body = src[start:start + rewrite_chars]
        head = body[:len(body) // 8]
        rewrite.append(f"# Original file:\n{body}\n# The same file, rewritten with the same code:\n{head}")
        fresh.append(f"def function_number_{i}(value, options=None):\n    \"\"\"")
    return {name: [tokenizer.encode(t) for t in texts] for name, texts in (("rewrite", rewrite), ("fresh", fresh))}


def run(args) -> List[dict]:
    import radixlm

    pair = ensure_pair(args.pair_dir, getattr(args, "train_budget", 600.0))
    target, draft = str(pair / "target"), str(pair / "draft")
    configs = {
        "none": {},
        "NGRAM": {"speculative_algorithm": "NGRAM", "speculative_num_steps": args.ngram_steps},
        "STANDALONE": {"speculative_algorithm": "STANDALONE", "speculative_draft_model_path": draft,
                       "speculative_num_steps": args.standalone_steps},
    }
    rows, outputs = [], {}
    for name, kw in configs.items():
        eng = radixlm.Engine(model_path=target, device=args.device, max_total_tokens=args.max_total_tokens,
                             log_level="warning", **kw)
        try:
            loads = workloads(eng.tokenizer, max(args.batch_sizes), args.rewrite_chars)
            for wl, prompts in loads.items():
                for bs in args.batch_sizes:
                    sp = {"temperature": 0, "max_new_tokens": args.new_tokens, "ignore_eos": True}
                    eng.generate(input_ids=prompts[:bs], sampling_params=sp)  # warm-up
                    s = eng.scheduler.stats
                    v0, c0, a0, d0 = s.spec_verify_ct, s.spec_committed_tokens, s.spec_accepted_tokens, \
                        s.spec_draft_tokens
                    times = []
                    steps0 = s.num_decode_batches
                    for _ in range(args.repeats):  # best of N: the machine is shared
                        t0 = time.perf_counter()
                        outs = eng.generate(input_ids=prompts[:bs], sampling_params=sp)
                        times.append(time.perf_counter() - t0)
                    dt = min(times)
                    steps = (s.num_decode_batches - steps0) / args.repeats
                    ntok = sum(len(o["output_ids"]) for o in outs)
                    v, c = s.spec_verify_ct - v0, s.spec_committed_tokens - c0
                    a, d = s.spec_accepted_tokens - a0, s.spec_draft_tokens - d0
                    outputs.setdefault((wl, bs), {})[name] = [o["output_ids"] for o in outs]
                    rows.append({"config": name, "workload": wl, "batch": bs, "seconds": dt, "tok_s": ntok / dt,
                                 "steps": steps, "ms_per_step": 1000 * dt / max(steps, 1),
                                 "accept_len": c / v if v else None,
                                 "accept_rate": a / d if d else None, "first_ids": outs[0]["output_ids"][:8]})
                    print(rows[-1], flush=True)
        finally:
            eng.shutdown()
    for key, by_cfg in outputs.items():
        same = all(o == by_cfg["none"] for o in by_cfg.values())
        for r in rows:
            if (r["workload"], r["batch"]) == key:
                r["same_tokens"] = same
    return rows


def table(rows: List[dict]) -> str:
    base = {(r["workload"], r["batch"]): r["tok_s"] for r in rows if r["config"] == "none"}
    lines = ["| workload | batch | speculation | output tok/s | vs none | decode/verify steps | ms per step | "
             "accept length | accept rate | same tokens |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["workload"] != "rewrite", r["batch"])):
        acc = "-" if r["accept_len"] is None else f"{r['accept_len']:.2f}"
        rate = "-" if r["accept_rate"] is None else f"{r['accept_rate']:.2f}"
        lines.append(f"| {r['workload']} | {r['batch']} | {r['config']} | {r['tok_s']:.1f} | "
                     f"{r['tok_s'] / base[(r['workload'], r['batch'])]:.2f}x | {r['steps']:.0f} | "
                     f"{r['ms_per_step']:.1f} | {acc} | {rate} | {r['same_tokens']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pair-dir", default="models/demo-pair", help="target/ and draft/ (train_demo layout)")
    ap.add_argument("--train-budget", type=float, default=600.0,
                    help="train_demo's --time-budget if the pair is missing")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batch-sizes", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8])
    ap.add_argument("--ngram-steps", type=int, default=7)
    ap.add_argument("--standalone-steps", type=int, default=3)
    ap.add_argument("--rewrite-chars", type=int, default=600,
                    help="characters of source shown per rewrite prompt (the demo target trained on 256-token windows)")
    ap.add_argument("--max-total-tokens", type=int, default=32768)
    ap.add_argument("--repeats", type=int, default=5, help="timed calls per cell; the fastest counts")
    args = ap.parse_args(argv)
    print(table(run(args)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
