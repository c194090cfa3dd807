"""`radixlm` console script: `radixlm serve --model-path DIR [flags]` (same flags as launch_server)."""

import sys


def main() -> None:
    argv = sys.argv[1:]
    if not argv or argv[0] != "serve":
        print("usage: radixlm serve --model-path DIR [launch_server flags]  (see: radixlm serve --help)")
        sys.exit(2)
    from radixlm.launch_server import main as launch

    launch(argv[1:])
