"""`python -m radixlm.bench_offline` (as recorded in docs/benchmarks.md): runs radixlm/bench/offline.py."""

from radixlm.bench.offline import main

if __name__ == "__main__":
    main()
