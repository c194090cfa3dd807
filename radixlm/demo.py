"""One-shot offline demo: loads a model (building the demo checkpoint when none is given), runs a
small batch twice and shows the radix cache at work. `make serve` runs this until the HTTP server
lands."""

from __future__ import annotations

import argparse
import logging
import os

DEFAULT_DEMO_MODEL = os.path.join("models", "demo-qwen2-small")


def ensure_demo_model(path: str = DEFAULT_DEMO_MODEL) -> str:
    if not os.path.isfile(os.path.join(path, "config.json")):
        from radixlm.tools.make_tiny_model import make_tiny_model

        make_tiny_model(path, arch="qwen2", size="small")
    return path


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model-path", default=None)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s")
    import radixlm

    path = args.model_path or ensure_demo_model()
    system = "You are a helpful assistant. Answer briefly and precisely. " * 4
    prompts = [system + q for q in ("What is a radix tree?", "Why cache KV?", "Name a prime.", "Hello!")]
    with radixlm.Engine(model_path=path) as eng:
        for round_ in (1, 2):
            outs = eng.generate(prompt=prompts, sampling_params={"temperature": 0,
                                                                 "max_new_tokens": args.max_new_tokens})
            for p, o in zip(prompts, outs):
                m = o["meta_info"]
                print(f"[round {round_}] prompt={m['prompt_tokens']} cached={m['cached_tokens']} "
                      f"completion={m['completion_tokens']} text={o['text'][:60]!r}")
        info = eng.get_server_info()
        print(f"cache hit rate: {100 * info['cache_hit_rate']:.1f}%  (random-weight demo model: text is noise)")


if __name__ == "__main__":
    main()
