"""The linear layers of one decode step on the CPU, alone: F.linear vs oneDNN prepacked vs the
row-streaming gemv (radixlm/layers/cpu_gemv.py), at a few rows.

    python -m radixlm.bench.cpu_linears --model-path models/bench-llama-88m --dtype bfloat16 --rows 1 2 4

Builds random weights of every linear's shape in the checkpoint's config (q/k/v packed, o, gate/up
packed, down, per layer; the LM head), each its own tensor so they stream from memory as in a real
step, and times one pass over all of them per implementation, interleaved (`--repeats` rounds, median),
with the bytes of weights read per second. Figures: docs/benchmarks.md ("CPU model step").
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F


def linear_shapes(cfg: Dict) -> List[tuple]:
    """(out, in) of every linear of a Llama-style decoder, the LM head last."""
    h, inter = cfg["hidden_size"], cfg["intermediate_size"]
    heads, kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    hd = cfg.get("head_dim") or h // heads
    layer = [((heads + 2 * kv) * hd, h), (h, heads * hd), (2 * inter, h), (h, inter)]
    return layer * cfg["num_hidden_layers"] + [(cfg["vocab_size"], h)]


def main(argv=None) -> int:
    from radixlm.layers import cpu_gemv, cpu_linear

    ap = argparse.ArgumentParser(prog="python -m radixlm.bench.cpu_linears", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-path", required=True, help="a checkpoint directory (only config.json is read)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args(argv)
    with open(f"{args.model_path}/config.json") as f:
        cfg = json.load(f)
    dtype = getattr(torch, args.dtype)
    g = torch.Generator().manual_seed(0)
    weights = [torch.randn(n, k, generator=g).to(dtype) for n, k in linear_shapes(cfg)]
    nbytes = sum(w.numel() * w.element_size() for w in weights)
    packed = [cpu_linear.prepack_weight(w) if cpu_linear.prepack_available() else None for w in weights]
    have_gemv = cpu_gemv.load() is not None
    print(f"{len(weights)} linears, {nbytes / 1e6:.1f} MB of {args.dtype} weights, {torch.get_num_threads()} threads")
    for rows in args.rows:
        xs = {k: torch.randn(rows, k, generator=g).to(dtype) for k in {w.shape[1] for w in weights}}
        impls: Dict[str, Callable[[], None]] = {"F.linear": lambda: [F.linear(xs[w.shape[1]], w) for w in weights]}
        if packed[0] is not None:
            impls["oneDNN packed"] = lambda: [cpu_linear.packed_linear(xs[w.shape[1]], p, None)
                                              for w, p in zip(weights, packed)]
        if have_gemv and rows <= cpu_gemv.KERNEL_MAX_ROWS:
            impls["gemv"] = lambda: [cpu_gemv.gemv(xs[w.shape[1]], w) for w in weights]
        times: Dict[str, List[float]] = {name: [] for name in impls}
        for fn in impls.values():
            fn()  # warm-up
        for _ in range(args.repeats):
            for name, fn in impls.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
        cells = [f"{name} {1e3 * statistics.median(t):.2f} ms ({nbytes / statistics.median(t) / 1e9:.1f} GB/s)"
                 for name, t in times.items()]
        print(f"rows {rows}: " + ", ".join(cells))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
