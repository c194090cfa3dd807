"""A scheduler test harness without a model: `StubRunner` stands in for the model runner, so
admission, chunking, retraction, aborts, overlap zombies and failures run in milliseconds with the
real scheduler, allocator, request table and radix cache.

The stub "model" is a fixed function of a request's last input token and its position
(`stub_token`), so a request's output does not depend on how it was batched, chunked, retracted or
overlapped: runs of one workload under different settings must give identical tokens. Every
forward also checks that the request table maps each new token's position to the slot the batch
writes (`violations`), and a test can make chosen forwards raise (`fail`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Callable, Dict, List, Optional, Tuple

import torch

from radixlm.core import ForwardMode, Req, ScheduleBatch
from radixlm.engine.sampler import SampleOutput
from radixlm.mem.allocator import TokenToKVPoolAllocator
from radixlm.mem.kv_pool import ReqToTokenPool
from radixlm.sampling_params import SamplingParams
from radixlm.sched.scheduler import Scheduler, SchedulerConfig

VOCAB = 97
EOS = 0


def stub_token(last: int, pos: int) -> int:
    """The stub model's next token: never EOS, a function of the last token and its position only."""
    return 1 + (last * 31 + pos * 17) % (VOCAB - 1)


@dataclass
class Step:
    mode: str  # "extend" | "decode" | "mixed"
    rows: List[Tuple[str, int, int]]  # (rid, prefix_len, extend_len)


class StubRunner:
    def __init__(self, pool_size: int, page_size: int = 1, max_running: int = 16, context_len: int = 4096):
        self.device = "cpu"
        self.allocator = TokenToKVPoolAllocator(pool_size, page_size)
        self.req_to_token_pool = ReqToTokenPool(max_running + 1, context_len + 1, "cpu")
        self.model_config = SimpleNamespace(eos_token_ids=[EOS], vocab_size=VOCAB, context_len=context_len)
        self.sampler = SimpleNamespace(grammar_backend=None)
        self.steps: List[Step] = []
        self.fail: Optional[Callable[[ScheduleBatch], bool]] = None
        self.violations: List[str] = []

    def forward_and_sample(self, batch: ScheduleBatch, defer_host_copy: bool = False) -> SampleOutput:
        mode = "mixed" if batch.num_mixed_decode else ("decode" if batch.forward_mode == ForwardMode.DECODE
                                                        else "extend")
        self.steps.append(Step(mode, [(r.rid, p, e) for r, p, e in
                                      zip(batch.reqs, batch.prefix_lens, batch.extend_lens)]))
        if self.fail is not None and self.fail(batch):
            raise RuntimeError("injected forward failure")
        ids = batch.input_ids.tolist() if isinstance(batch.input_ids, torch.Tensor) else list(batch.input_ids)
        table = self.req_to_token_pool.req_to_token
        out, off = [], 0
        for req, pre, ext, sample in zip(batch.reqs, batch.prefix_lens, batch.extend_lens, batch.sample):
            want = batch.out_cache_loc[off:off + ext]
            if not torch.equal(table[req.kv.req_pool_idx, pre:pre + ext], want):
                self.violations.append(f"{req.rid}: request table disagrees with the batch's slots at {pre}")
            off += ext
            if sample:
                out.append(stub_token(ids[off - 1], pre + ext - 1))
        return SampleOutput(next_token_ids=out, next_token_ids_device=torch.tensor(out, dtype=torch.int64))

    def steps_of(self, rid: str) -> List[Step]:
        return [s for s in self.steps if any(r == rid for r, _, _ in s.rows)]


def make_scheduler(pool_size: int, page_size: int = 1, max_running: int = 16, context_len: int = 4096,
                   **cfg) -> Scheduler:
    runner = StubRunner(pool_size, page_size, max_running, context_len)
    cfg.setdefault("enable_overlap", False)
    return Scheduler(runner, SchedulerConfig(max_running_requests=max_running, **cfg), context_len)


def make_req(rid: str, prompt_len: int, max_new_tokens: int, seed: int = 0, **sp) -> Req:
    g = torch.Generator().manual_seed(seed)
    ids = (torch.randint(1, VOCAB, (prompt_len,), generator=g)).tolist()
    return Req(rid, ids, SamplingParams(max_new_tokens=max_new_tokens, temperature=0, **sp))


@dataclass
class Run:
    outputs: Dict[str, List[int]] = field(default_factory=dict)
    finish: Dict[str, dict] = field(default_factory=dict)
    token_step: Dict[str, List[int]] = field(default_factory=dict)  # step index of each output token
    steps: int = 0


def drive(sched: Scheduler, arrivals: Dict[int, List[Req]], max_steps: int = 5000,
          on_step: Optional[Callable[[int], Optional[list]]] = None) -> Run:
    """Steps the scheduler until every request finished; requests arrive before the step named by
    their key, and `on_step(step)` runs before each step (the outputs it returns count too). The
    KV-ownership invariant is checked after every step."""
    run = Run()
    pending = dict(arrivals)
    total = sum(len(v) for v in arrivals.values())
    for step in range(max_steps):
        for req in pending.pop(step, []):
            sched.add_request(req)
            run.outputs[req.rid] = []
            run.token_step[req.rid] = []
        outs = list(on_step(step) or []) if on_step is not None else []  # e.g. aborts' outputs
        for out in outs + sched.step():
            run.outputs[out.rid].extend(out.new_token_ids)
            run.token_step[out.rid].extend([step] * len(out.new_token_ids))
            if out.finished_reason is not None:
                run.finish[out.rid] = out.finished_reason.to_json()
        sched.check_integrity()
        run.steps = step + 1
        if len(run.finish) == total and not pending and not sched.has_work():
            break
    else:
        raise AssertionError(f"not done after {max_steps} steps: {len(run.finish)}/{total} finished")
    assert not sched.runner.violations, sched.runner.violations[:3]
    return run


def assert_idle_and_clean(sched: Scheduler) -> None:
    """Nothing in flight, nothing locked, and every slot back once the cache is flushed."""
    sched.check_integrity()
    assert sched.tree_cache.protected_size() == 0
    assert sched.flush_cache()
    assert sched.allocator.available_size() == sched.allocator.size
    assert sched.req_to_token_pool.available_size() == sched.req_to_token_pool.size - 1
