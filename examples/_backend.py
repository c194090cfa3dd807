"""Shared command line of the example scripts: which backend to run on.

    python examples/classifier.py                      # in-process engine on the demo model
    python examples/classifier.py --model-path DIR     # in-process engine on DIR
    python examples/classifier.py --url http://127.0.0.1:30000   # a running radixlm server
"""

from __future__ import annotations

import argparse
import logging


def backend_from_args(description: str = ""):
    import radixlm as rl
    from radixlm.demo import ensure_demo_model

    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--url", default=None, help="base URL of a running radixlm server")
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--model-path", default=None, help="model for the in-process engine (default: demo model)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.url:
        return rl.RuntimeEndpoint(args.url, api_key=args.api_key)
    return rl.EngineBackend(model_path=args.model_path or ensure_demo_model(), log_level="warning")


def run_example(main, description: str = "", **kwargs) -> None:
    """The examples' entry point: `main(backend, **kwargs)` on the backend the command line picks;
    the backend is shut down afterwards, also when `main` fails."""
    backend = backend_from_args(description)
    try:
        main(backend, **kwargs)
    finally:
        backend.shutdown()
