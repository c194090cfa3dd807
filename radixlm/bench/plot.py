"""PNG plots for bench_serving: TTFT and ITL CDFs, and TTFT by turn depth (agent-multiturn).
matplotlib is optional (`pip install 'radixlm[bench]'`).

Re-plot saved runs (records written by `bench_serving --output-file F --output-details`):
    python -m radixlm.bench.plot F [--output out.png] [--title T]
"""

from __future__ import annotations

import argparse
import json
from typing import Dict, List, Optional

from radixlm.bench.metrics import RequestResult


class PlotUnavailable(RuntimeError):
    pass


def _plt():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise PlotUnavailable("--plot needs matplotlib: pip install matplotlib  (or pip install -e '.[bench]')") from e
    return plt


def _cdf(ax, xs: List[float], label: str) -> None:
    xs = sorted(xs)
    if xs:
        ax.plot(xs, [(i + 1) / len(xs) for i in range(len(xs))], label=label)


def plot_runs(runs: Dict[str, List[RequestResult]], path: str, title: str = "") -> str:
    """runs: label -> per-request results. Writes one PNG with 2 or 3 panels."""
    plt = _plt()
    agent = any(r.turn > 0 for rs in runs.values() for r in rs)
    fig, axes = plt.subplots(1, 3 if agent else 2, figsize=(15 if agent else 10, 4))
    for label, rs in runs.items():
        ok = [r for r in rs if r.success]
        _cdf(axes[0], [1000 * r.ttft for r in ok], label)
        _cdf(axes[1], [1000 * x for r in ok for x in r.itl], label)
        if agent:
            turns = sorted({r.turn for r in ok})
            means = [1000 * sum(r.ttft for r in ok if r.turn == t) / max(1, sum(1 for r in ok if r.turn == t))
                     for t in turns]
            axes[2].plot(turns, means, marker="o", label=label)
    axes[0].set(xlabel="TTFT (ms)", ylabel="fraction of requests", title="TTFT CDF")
    axes[1].set(xlabel="ITL (ms, log scale)", ylabel="fraction of gaps", title="ITL CDF")
    axes[1].set_xscale("log")  # prefill stalls are 100x the typical gap
    if agent:
        axes[2].set(xlabel="turn depth", ylabel="mean TTFT (ms)", title="TTFT by turn depth")
        axes[2].set_ylim(bottom=0)
        axes[2].xaxis.get_major_locator().set_params(integer=True)
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def load_runs(path: str) -> Dict[str, List[RequestResult]]:
    """label -> results from a bench_serving JSONL file (records need `details`; a label seen twice
    keeps its last record)."""
    runs: Dict[str, List[RequestResult]] = {}
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            rec = json.loads(line)
            if "details" not in rec:
                raise ValueError(f"{path}:{n}: record without per-request details "
                                 "(write it with bench_serving --output-details)")
            runs[rec.get("label") or rec.get("backend") or f"run{n}"] = [RequestResult(**d) for d in rec["details"]]
    return runs


def main(argv: Optional[List[str]] = None) -> str:
    ap = argparse.ArgumentParser(description="re-plot bench_serving runs saved with --output-details")
    ap.add_argument("jsonl")
    ap.add_argument("--output", "-o", default=None, help="PNG path (default: the JSONL path with .png)")
    ap.add_argument("--title", default="")
    args = ap.parse_args(argv)
    out = args.output or (args.jsonl.rsplit(".", 1)[0] + ".png")
    path = plot_runs(load_runs(args.jsonl), out, args.title)
    print(path)
    return path


if __name__ == "__main__":
    main()
