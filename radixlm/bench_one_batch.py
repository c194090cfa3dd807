"""`python -m radixlm.bench_one_batch` (as recorded in docs/benchmarks.md): runs radixlm/bench/one_batch.py."""

from radixlm.bench.one_batch import main

if __name__ == "__main__":
    main()
