"""The hardening issue's starvation scenario, measured: an 800-token KV pool, chunks of 64, a
400-token stream decoding when a 600-token prompt arrives (the two cannot both be in the pool).
`run_scenario(engine)` returns what each forward step computed for the long prompt, the stream's
inter-token gaps and both finish reasons; the command prints the long prompt's chunks and the
stream's largest gap against its median.

    python -m radixlm.bench.chunk_starvation [--arch llama] [--mixed-chunk]
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import List, Tuple

STREAM_LEN, LONG_LEN, POOL, CHUNK = 400, 600, 800, 64


@dataclass
class Scenario:
    long_steps: List[int] = field(default_factory=list)  # tokens each forward computed for the long prompt
    gaps: List[float] = field(default_factory=list)  # seconds between the stream's tokens
    finish: Tuple[str, str] = ("", "")  # the stream's and the long prompt's finish reason types

    @property
    def chunks(self) -> List[int]:
        return [e for e in self.long_steps if e > 1]


def engine_kwargs(mixed_chunk: bool = False) -> dict:
    return dict(log_level="warning", max_total_tokens=POOL, chunked_prefill_size=CHUNK,
                enable_mixed_chunk=mixed_chunk, disable_overlap_schedule=True)


def run_scenario(eng, seed: int = 0) -> Scenario:
    """Runs the scenario on an Engine built with `engine_kwargs()` (its runner is wrapped to count steps)."""
    out = Scenario()
    runner = eng.scheduler.runner
    real = runner.forward_and_sample

    def spy(batch, **kw):
        out.long_steps += [e for r, e in zip(batch.reqs, batch.extend_lens) if r.rid == "long"]
        return real(batch, **kw)

    runner.forward_and_sample = spy
    rng, vocab = random.Random(seed), eng.model_config.vocab_size
    sp = {"temperature": 0, "ignore_eos": True}
    stream = eng.generate(input_ids=[rng.randrange(3, vocab) for _ in range(STREAM_LEN)], rid="stream",
                          stream=True, sampling_params={**sp, "max_new_tokens": 100})
    last = [next(stream)]  # the stream is decoding
    times = [time.perf_counter()]
    res = []
    t = threading.Thread(target=lambda: res.append(eng.generate(
        input_ids=[rng.randrange(3, vocab) for _ in range(LONG_LEN)], rid="long",
        sampling_params={**sp, "max_new_tokens": 2})))
    t.start()
    for chunk in stream:
        times.append(time.perf_counter())
        last.append(chunk)
    t.join(300)
    runner.forward_and_sample = real
    out.gaps = [b - a for a, b in zip(times, times[1:])]
    out.finish = (last[-1]["meta_info"]["finish_reason"]["type"],
                  res[0]["meta_info"]["finish_reason"]["type"] if res else "")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="llama")
    ap.add_argument("--mixed-chunk", action="store_true")
    args = ap.parse_args()
    import radixlm
    from radixlm.tools.make_tiny_model import make_tiny_model

    path = str(make_tiny_model(tempfile.mkdtemp(), arch=args.arch))
    with radixlm.Engine(model_path=path, **engine_kwargs(args.mixed_chunk)) as eng:
        s = run_scenario(eng)
        stats = eng.scheduler.stats
    print(f"long prompt: {len(s.chunks)} prefill steps, chunks {s.chunks}")
    med = statistics.median(s.gaps)
    print(f"stream: largest gap {max(s.gaps) * 1000:.1f} ms, median {med * 1000:.1f} ms ({max(s.gaps) / med:.0f}x)")
    print(f"chunk waits {stats.num_chunk_waits}, retractions {stats.num_retractions}")


if __name__ == "__main__":
    main()
