"""PNG plots for bench_serving: TTFT and ITL CDFs, and TTFT by turn depth (agent-multiturn).
matplotlib is optional (`pip install 'radixlm[bench]'`)."""

from __future__ import annotations

from typing import Dict, List

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
    axes[1].set(xlabel="ITL (ms)", ylabel="fraction of gaps", title="ITL CDF")
    if agent:
        axes[2].set(xlabel="turn depth", ylabel="mean TTFT (ms)", title="TTFT by turn depth")
        axes[2].set_ylim(bottom=0)
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
