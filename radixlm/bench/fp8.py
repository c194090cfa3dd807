"""FP8 vs bf16 on the CPU: parameter memory of two checkpoints as loaded, and the CPU time of one linear
layer (plain bf16 with the oneDNN-prepacked weight vs block-FP8, dequantized in every forward).

    python -m radixlm.bench.fp8 --model-path BF16_DIR FP8_DIR --in-features 768 --out-features 6144

The layer is a MergedColumnParallelLinear (gate/up packed) of Gaussian weights quantized by
`--quantization fp8`'s loader; per call: process CPU time (all threads; other load on a shared
machine distorts wall time more), best of `--rounds` rounds of `--calls` calls, the two layers
alternated round by round.
"""

from __future__ import annotations

import argparse
import time

import torch


def param_mib(model_path: str) -> dict:
    from radixlm.layers.quantization.fp8 import weight_memory_bytes
    from radixlm.models.loader import load_model
    from radixlm.models.model_config import ModelConfig

    model = load_model(ModelConfig.from_path(model_path, device="cpu"), "cpu")
    return {k: round(v / 2 ** 20, 2) for k, v in weight_memory_bytes(model).items()}


def layer_times(k: int, n: int, tokens, rounds: int, calls: int) -> dict:
    from radixlm.layers import cpu_linear, linear
    from radixlm.layers.quantization import quantization_scope
    from radixlm.layers.quantization.fp8 import Fp8Config

    w = (torch.randn(n, k, generator=torch.Generator().manual_seed(0)) * k ** -0.5).to(torch.bfloat16)
    halves = [n // 2, n - n // 2]

    def build():
        lin = linear.MergedColumnParallelLinear(k, halves, params_dtype=torch.bfloat16)
        lin.weight_loader(lin.weight, w[:halves[0]], 0)
        lin.weight_loader(lin.weight, w[halves[0]:], 1)
        return lin

    plain = build()
    cpu_linear.prepack_model(plain)
    with quantization_scope(Fp8Config(is_checkpoint_fp8_serialized=False)):
        fp8 = build()
    out = {}
    for m in tokens:
        x = torch.randn(m, k).to(torch.bfloat16)
        best = {"bf16": float("inf"), "fp8": float("inf")}
        for _ in range(rounds):
            for name, lin in (("bf16", plain), ("fp8", fp8)):
                t = time.process_time()
                for _ in range(calls):
                    lin(x)
                best[name] = min(best[name], (time.process_time() - t) / calls * 1e3)
        out[m] = best
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-path", nargs="*", default=[], help="checkpoints whose parameter memory to report")
    ap.add_argument("--in-features", type=int, default=768)
    ap.add_argument("--out-features", type=int, default=6144)
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 256])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    for path in a.model_path:
        print(f"{path}: parameters MiB by dtype {param_mib(path)}")
    for m, best in layer_times(a.in_features, a.out_features, a.tokens, a.rounds, a.calls).items():
        print(f"{a.in_features} -> {a.out_features}, {m} tokens: bf16 {best['bf16']:.2f} ms, fp8 {best['fp8']:.2f} ms "
              f"CPU time per call ({best['fp8'] / best['bf16']:.1f}x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
