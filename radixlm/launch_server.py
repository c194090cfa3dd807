"""`python -m radixlm.launch_server --model-path DIR [flags]`: SGLang's flag names and meanings.

The flags are generated from `ServerArgs` (radixlm/server_args.py), where each is declared once
with its default, help text, choices and bounds.
"""

from __future__ import annotations

import argparse
import os
import sys
import typing
from typing import Any, Dict, List, Optional

from radixlm.server_args import ServerArgs, choices_of, cli_fields

GROUP_HELP = {"limits": "Every limit is answered with a 4xx naming the field (docs/limits.md).",
              "lora": "Multi-LoRA serving: adapters picked per request with lora_path.",
              "parallelism": "Tensor parallelism (ranks of one model) and data parallelism (replicas behind "
                             "sglang-router).",
              "disaggregation": "Prefill/decode disaggregation behind sglang-router --pd-disaggregation "
                                "(docs/architecture.md)."}


def _base_type(annotation: Any) -> type:
    """int / float / str / bool from a field's annotation (Optional[X] -> X)."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return args[0] if typing.get_origin(annotation) is typing.Union and len(args) == 1 else annotation


def _parse_bool(v: str) -> bool:
    low = v.lower()
    if low in ("true", "1", "yes", "on"):
        return True
    if low in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {v!r}")


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="radixlm.launch_server",
                                description="Start the radixlm HTTP server (OpenAI-compatible and SGLang-native API).")
    hints = typing.get_type_hints(ServerArgs)
    groups: Dict[str, argparse._ArgumentGroup] = {}
    for name, f in cli_fields().items():
        m = f.metadata
        g = m.get("group")
        if g is not None and g not in groups:
            groups[g] = p.add_argument_group(g, GROUP_HELP.get(g))
        target = p if g is None else groups[g]
        flags = ["--" + name.replace("_", "-"), *m.get("aliases", ())]
        kind = _base_type(hints[name])
        if kind is bool and f.default is None:  # device-dependent default: `--flag` on, `--flag false` off
            target.add_argument(*flags, dest=name, nargs="?", const=True, default=None, type=_parse_bool,
                                metavar="true|false", help=m["help"])
            continue
        if kind is bool:
            target.add_argument(*flags, action="store_true", help=m["help"])
            continue
        kw: Dict[str, Any] = {"type": kind, "default": f.default, "help": m["help"]}
        if typing.get_origin(kind) is tuple:  # Tuple[str, ...]: one or more values after the flag
            kw.update(type=str, nargs="+")
        if f.default is not None:
            kw["help"] += " (default %(default)s)"
        choices = choices_of(f)
        if choices is not None:
            kw["choices"] = list(choices)
        if name == "model_path":
            kw["required"] = True
        target.add_argument(*flags, dest=name, **kw)
    return p


def parse_args(argv: Optional[List[str]] = None) -> ServerArgs:
    parser = make_parser()
    kw = vars(parser.parse_args(argv))
    try:
        return ServerArgs(show_progress=True, **kw)
    except ValueError as e:
        parser.error(str(e))


# OpenMP's idle policy for the server's processes, set before torch loads (libgomp reads it once): torch's
# intra-op threads sleep between parallel regions instead of spinning. On a CPU server the scheduler's threads
# share the cores with the HTTP process, the detokenizer and the clients; spinning workers there made a decode
# step 3-10x slower on a busy 2-core machine (docs/benchmarks.md, "CPU serving path"). The environment wins:
# `OMP_WAIT_POLICY=ACTIVE` (or an empty value: libgomp's default) restores spinning.
OMP_WAIT_POLICY_DEFAULT = "PASSIVE"


def set_thread_env() -> None:
    """Sets the OpenMP idle policy unless the environment has one; a no-op once torch is loaded."""
    if "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", OMP_WAIT_POLICY_DEFAULT)


def main(argv: Optional[List[str]] = None) -> None:
    set_thread_env()
    args = parse_args(argv)
    from radixlm.models.hub import prepare_args

    try:  # a hub id -> its snapshot directory; a missing model or no network: one line, exit 1
        args = prepare_args(args)
    except ValueError as e:
        print(f"radixlm: {e}", file=sys.stderr)
        sys.exit(1)
    if args.dp_size > 1:  # N replicas behind sglang-router (entrypoints/dp_launcher.py)
        from radixlm.entrypoints.dp_launcher import launch_dp

        sys.exit(launch_dp(args))
    if args.node_rank > 0:  # a node without rank 0 runs tensor-parallel ranks only, no HTTP server
        from radixlm.managers.tp_launch import run_follower_node

        sys.exit(run_follower_node(args))
    from radixlm.entrypoints.http_server import launch_server

    try:
        launch_server(args)
    except (RuntimeError, ValueError) as e:  # e.g. a tp_size the model's heads do not divide
        print(f"radixlm: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
