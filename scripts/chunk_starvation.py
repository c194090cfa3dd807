"""The hardening issue's starvation scenario, measured: an 800-token KV pool, chunks of 64, a
400-token stream decoding when a 600-token prompt arrives. Prints the long prompt's prefill steps
(chunk sizes) and the stream's largest inter-token gap against its median.

    python scripts/chunk_starvation.py [--arch llama] [--mixed-chunk]
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import threading
import time

import radixlm
from radixlm.tools.make_tiny_model import make_tiny_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="llama")
    ap.add_argument("--mixed-chunk", action="store_true")
    args = ap.parse_args()
    path = str(make_tiny_model(tempfile.mkdtemp(), arch=args.arch))
    with radixlm.Engine(model_path=path, log_level="warning", max_total_tokens=800, chunked_prefill_size=64,
                        enable_mixed_chunk=args.mixed_chunk, disable_overlap_schedule=True) as eng:
        runner, calls = eng.scheduler.runner, []
        real = runner.forward_and_sample

        def spy(batch, **kw):
            calls.append([(r.rid, e) for r, e in zip(batch.reqs, batch.extend_lens)])
            return real(batch, **kw)

        runner.forward_and_sample = spy
        rng = random.Random(0)
        vocab = eng.model_config.vocab_size
        stream = eng.generate(input_ids=[rng.randrange(3, vocab) for _ in range(400)], rid="stream", stream=True,
                              sampling_params={"max_new_tokens": 100, "temperature": 0, "ignore_eos": True})
        next(stream)
        times = [time.perf_counter()]
        long_prompt = [rng.randrange(3, vocab) for _ in range(600)]
        t = threading.Thread(target=eng.generate, kwargs=dict(
            input_ids=long_prompt, rid="long", sampling_params={"max_new_tokens": 2, "temperature": 0,
                                                                "ignore_eos": True}))
        t.start()
        for _ in stream:
            times.append(time.perf_counter())
        t.join(300)
        gaps = [b - a for a, b in zip(times, times[1:])]
        chunks = [e for c in calls for rid, e in c if rid == "long" and e > 1]
        print(f"long prompt: {len(chunks)} prefill steps, chunks {chunks}")
        print(f"stream: largest gap {max(gaps) * 1000:.1f} ms, median {statistics.median(gaps) * 1000:.1f} ms "
              f"({max(gaps) / statistics.median(gaps):.0f}x)")
        s = eng.scheduler.stats
        print(f"chunk waits {s.num_chunk_waits}, retractions {s.num_retractions}")


if __name__ == "__main__":
    main()
