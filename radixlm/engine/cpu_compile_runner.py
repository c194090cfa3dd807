"""CpuCompileRunner: CPU decode steps through `torch.compile` (SGLang's `--enable-torch-compile`).

Owns, for one ModelRunner on the CPU: the batch-size buckets (1, 2, 4, 8, then every 8, up to
`--torch-compile-max-bs`, as the CUDA graphs), one persistent decode `ForwardBatch` whose tensors
are replaced every step, and the compiled step: the model over the step's tokens and the logits of
every row. Inductor fuses the elementwise work of each layer (RMSNorm, rope, SiLU-and-mul, residual
adds) into generated C++ loops and, with freezing, runs every linear layer on a weight it prepacked
for oneDNN; what remains per step is one Python call instead of ~700 eager op dispatches.

Shapes: the batch is padded to its bucket (padding rows: token 0 at position 0 writing and reading
only KV slot PADDING_SLOT = 0, the allocator's never-handed-out slot, exactly as the CUDA graphs do),
so each bucket is compiled once, at its first use (`warmup()` compiles a list ahead). The keys a step
reads are `req_to_token[row, :L]` with L the longest sequence rounded up to LEN_ALIGN: that length is
a dynamic dimension of the compiled graph (marked with `torch._dynamo.mark_dynamic`), so growing
sequences never recompile. Slots past a row's length are masked (the torch_native decode attention
with a per-step index and mask, attention/torch_native.py).

In: a DECODE `ScheduleBatch` of at most max_bs requests. Out: (logits [B, vocab], hidden [B, h]).
The reference is the eager path (`ModelRunner.run_forward_batch`); tests compare the two. Not used
with LoRA, tensor parallelism, sliding-window layers or an attention backend other than torch_native
(`create_cpu_compile_runner` says which and returns None).
"""

from __future__ import annotations

import bisect
import logging
import time
from typing import Dict, List, Optional, Tuple

import torch

from radixlm.attention.forward_context import ForwardBatch, forward_context
from radixlm.core import ForwardMode, ScheduleBatch
from radixlm.engine.cuda_graph_runner import PADDING_SLOT, capture_bucket_sizes

logger = logging.getLogger(__name__)

LEN_ALIGN = 32  # key lengths are rounded up to this (>= 2: a dynamic dimension must never be 1)
DEFAULT_MAX_BS = 32  # SGLang's --torch-compile-max-bs default


def create_cpu_compile_runner(model_runner) -> Optional["CpuCompileRunner"]:
    """The runner's compiled decode step, or None: off without --enable-torch-compile, off the CPU,
    or (logged) with LoRA, tensor parallelism, sliding windows or another attention backend."""
    cfg = model_runner.cfg
    if not cfg.enable_torch_compile:
        return None
    why = None
    if str(model_runner.device) != "cpu":
        why = "it compiles the CPU decode step (CUDA runs CUDA graphs)"
    elif model_runner.lora_manager is not None:
        why = "LoRA's per-step adapter slots are not in the compiled graph"
    elif model_runner.tp.size > 1:
        why = "untested with tensor parallelism"
    elif type(model_runner.attn_backend).__name__ != "TorchNativeAttnBackend":
        why = "it needs the torch_native attention backend"
    elif any(getattr(m, "sliding_window", None) for m in model_runner.model.modules()):
        why = "sliding-window layers are not compiled"
    if why:
        logger.warning("--enable-torch-compile is off for this model: %s", why)
        return None
    max_bs = max(1, min(int(cfg.torch_compile_max_bs or DEFAULT_MAX_BS), int(cfg.max_running_requests)))
    return CpuCompileRunner(model_runner, max_bs)


def _configure_inductor() -> None:
    import torch._dynamo
    import torch._inductor.config as ic

    ic.freezing = True  # weights become constants: prepacked for oneDNN, folded into the graph
    # one entry per bucket (each bucket is a static batch size), plus room for dtype/guard variants
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    if hasattr(torch._dynamo.config, "recompile_limit"):
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)


class CpuCompileRunner:
    def __init__(self, model_runner, max_bs: int, compile: bool = True):
        self.model = model_runner.model
        self.req_to_token_pool = model_runner.req_to_token_pool
        self.token_to_kv_pool = model_runner.token_to_kv_pool
        self.attn_backend = model_runner.attn_backend
        self.buckets: List[int] = capture_bucket_sizes(max_bs)
        self.max_bs = self.buckets[-1]
        self.padding_row = self.req_to_token_pool.padding_row
        self.req_to_token_pool.req_to_token[self.padding_row, 0] = PADDING_SLOT
        self.table_width = self.req_to_token_pool.req_to_token.shape[1]
        self.use_compile = compile
        self.compile_s: Dict[int, float] = {}  # bucket -> seconds of its first (compiling) call
        self.num_runs = 0
        self._fb = ForwardBatch(
            forward_mode=ForwardMode.DECODE, input_ids=torch.zeros(1, dtype=torch.int64),
            positions=torch.zeros(1, dtype=torch.int64), out_cache_loc=torch.zeros(1, dtype=torch.int64),
            req_pool_indices=torch.zeros(1, dtype=torch.int64), seq_lens=torch.ones(1, dtype=torch.int64),
            extend_prefix_lens=torch.zeros(1, dtype=torch.int64), extend_seq_lens=torch.ones(1, dtype=torch.int64),
            seq_lens_cpu=[1], extend_prefix_lens_cpu=[0], extend_seq_lens_cpu=[1],
            req_to_token_pool=self.req_to_token_pool, token_to_kv_pool=self.token_to_kv_pool,
            attn_backend=self.attn_backend)
        if compile:
            _configure_inductor()
            self._step = torch.compile(self._forward, fullgraph=True, dynamic=False)
        else:
            self._step = self._forward

    def _forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        hidden = self.model(input_ids, positions)
        return self.model.compute_logits(hidden), hidden

    # ------------------------------------------------------------------ one step
    def bucket_for(self, bs: int) -> int:
        return self.buckets[bisect.bisect_left(self.buckets, bs)]

    def can_run(self, batch: ScheduleBatch) -> bool:
        return (batch.forward_mode.is_decode and 0 < batch.batch_size <= self.max_bs
                and not any(batch.input_logprob_ranges))

    def _inputs(self, batch: ScheduleBatch, n: int):
        """(input_ids, positions, out_cache_loc, req_pool_indices, seq_lens) padded to n rows."""
        bs = batch.batch_size
        pad = n - bs
        pos = [int(p) for p in batch.prefix_lens]  # decode: the new token's position = tokens cached
        rows = [r.kv.req_pool_idx for r in batch.reqs] + [self.padding_row] * pad
        host = torch.tensor([pos + [0] * pad, rows, [p + 1 for p in pos] + [1] * pad], dtype=torch.int64)
        ids = batch.input_ids
        if isinstance(ids, torch.Tensor):
            input_ids = torch.zeros(n, dtype=torch.int64)
            input_ids[:bs] = ids.reshape(-1)
        else:
            input_ids = torch.tensor(list(ids) + [0] * pad, dtype=torch.int64)
        loc = torch.full((n,), PADDING_SLOT, dtype=torch.int64)
        loc[:bs] = batch.out_cache_loc
        return input_ids, host[0], loc, host[1], host[2], max(pos) + 1

    def run(self, batch: ScheduleBatch) -> Tuple[torch.Tensor, torch.Tensor]:
        """(logits [B, vocab], hidden [B, h]) of a decode batch that `can_run`."""
        bs = batch.batch_size
        n = self.bucket_for(bs)
        input_ids, positions, loc, rows, seq_lens, max_len = self._inputs(batch, n)
        length = min(-(-max_len // LEN_ALIGN) * LEN_ALIGN, self.table_width)
        fb = self._fb
        fb.input_ids, fb.positions, fb.out_cache_loc = input_ids, positions, loc
        fb.req_pool_indices, fb.seq_lens = rows, seq_lens
        self.attn_backend.init_decode_metadata(fb, length, mark_dynamic=self.use_compile)
        first = n not in self.compile_s
        t0 = time.perf_counter()
        with forward_context(fb):
            logits, hidden = self._step(input_ids, positions)
        if first:
            self.compile_s[n] = time.perf_counter() - t0
            if self.use_compile:
                logger.info("torch.compile: decode batch bucket %d compiled in %.1f s", n, self.compile_s[n])
        self.num_runs += 1
        return logits[:bs], hidden[:bs]
