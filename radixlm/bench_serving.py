"""`python -m radixlm.bench_serving` (as recorded in docs/benchmarks.md): runs radixlm/bench/serving.py."""

import sys

from radixlm.bench.serving import main

if __name__ == "__main__":
    sys.exit(main())
