"""`python -m radixlm.bench_structured` (as recorded in docs/benchmarks.md): runs radixlm/bench/structured.py."""

from radixlm.bench.structured import main

if __name__ == "__main__":
    main()
