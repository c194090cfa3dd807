"""The same workloads through HF transformers `generate`, written the way an HF user would.

* random / generated-shared-prefix / sharegpt: all requests arrive at once; they are run in
  left-padded batches of `batch_size` (default: all of them in one batch), greedy,
  `min_new_tokens = max_new_tokens` (the server runs with `ignore_eos`). A request's TTFT is the
  time from the start of the run to its batch's first generated token (earlier batches count:
  the request was waiting), its E2E the time to the end of its batch.
* agent-multiturn: one `generate` call per turn (batch of 1, no padding), the conversation history
  = previous prompt + HF's own answer, exactly as the server workload. Sessions run one after
  another (a plain `generate` loop serves one conversation at a time); TTFT is measured per call,
  from calling `generate` to the first generated token (a streamer's second `put`), so it leaves
  out the time a session waited for the others: this favours HF.

Every token is a real generated token; no KV or prefix is reused across calls (transformers has no
cross-request cache unless the user builds one).
"""

from __future__ import annotations

import time
from typing import List, Optional, Tuple

from radixlm.bench.datasets import AgentSession, BenchRequest
from radixlm.bench.metrics import RequestResult


class _TimingStreamer:
    """Records the time of every `put` after the prompt (one per generated step)."""

    def __init__(self):
        self.times: List[float] = []
        self._prompt_seen = False

    def put(self, value) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def load_model(model_path: str):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()


def _generate(model, ids_rows: List[List[int]], max_new: int, streamer=None):
    import torch

    width = max(len(p) for p in ids_rows)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in ids_rows])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in ids_rows])
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new, min_new_tokens=max_new,
                             do_sample=False, pad_token_id=0, streamer=streamer)
    return out[:, width:].tolist()


def _as_streamer(s):
    try:  # transformers checks isinstance(streamer, BaseStreamer) in some versions
        from transformers.generation.streamers import BaseStreamer

        class S(_TimingStreamer, BaseStreamer):
            pass

        return S()
    except ImportError:  # pragma: no cover
        return s


def warmup(model) -> None:
    _generate(model, [[5, 6, 7, 8]], 2)


def run_batched(model_path: str, reqs: List[BenchRequest], batch_size: Optional[int] = None,
                model=None, progress=None) -> Tuple[List[RequestResult], float]:
    model = model or load_model(model_path)
    warmup(model)
    bs = batch_size or len(reqs)
    results: List[RequestResult] = []
    t0 = time.perf_counter()
    for i in range(0, len(reqs), bs):
        chunk = reqs[i:i + bs]
        s = _as_streamer(_TimingStreamer())
        outs = _generate(model, [r.prompt_ids for r in chunk], max(r.output_len for r in chunk), s)
        end = time.perf_counter()
        first = s.times[0] if s.times else end
        gaps = [b - a for a, b in zip(s.times, s.times[1:])]
        for r, o in zip(chunk, outs):
            n = r.output_len
            results.append(RequestResult(success=True, prompt_len=len(r.prompt_ids), output_len=n,
                                         ttft=first - t0, itl=gaps[:n - 1], latency=end - t0, start_time=0.0,
                                         output_ids=o[:n]))
        if progress is not None:
            progress.update(len(chunk))
    return results, time.perf_counter() - t0


def run_agent(model_path: str, sessions: List[AgentSession], model=None, progress=None
              ) -> Tuple[List[RequestResult], float]:
    model = model or load_model(model_path)
    warmup(model)
    results: List[RequestResult] = []
    t0 = time.perf_counter()
    for sess in sessions:
        history = list(sess.system_ids)
        for depth, turn in enumerate(sess.turns, 1):
            msgs = [(turn.new_ids, False)] + ([(turn.retry_ids, True)] if turn.retry_ids is not None else [])
            answer_prompt, answer = None, None
            for new_ids, is_retry in msgs:
                prompt = history + new_ids
                s = _as_streamer(_TimingStreamer())
                st = time.perf_counter()
                out = _generate(model, [prompt], sess.output_len, s)[0]
                end = time.perf_counter()
                first = s.times[0] if s.times else end
                results.append(RequestResult(
                    success=True, prompt_len=len(prompt), output_len=len(out), ttft=first - st,
                    itl=[b - a for a, b in zip(s.times, s.times[1:])], latency=end - st, start_time=st - t0,
                    output_ids=out, session=sess.session_id, turn=depth, is_retry=is_retry))
                answer_prompt, answer = prompt, out
                if progress is not None:
                    progress.update(1)
            history = answer_prompt + answer
    return results, time.perf_counter() - t0
