"""CudaGraphRunner: decode steps replayed from CUDA graphs (SGLang's `--cuda-graph-max-bs`).

Owns, for one ModelRunner: the bucket batch sizes (1, 2, 4, 8, then every 8, up to and including
cuda_graph_max_bs), static input buffers sized for the largest bucket (input_ids, positions,
req_pool_indices, seq_lens, out_cache_loc) and one graph per bucket, captured at start-up in one
shared memory pool, that runs the model and the logits of every row (decode: one token per request).
In: a DECODE `ScheduleBatch` of at most max_bs requests (input ids as a host list or a device
tensor). Out: (logits [B, vocab], hidden [B, h]): views of the bucket's static outputs, valid until
the next replay.

Padding: a batch of B requests runs in the smallest bucket >= B; rows B.. are padding rows: token 0
at position 0 with seq_len 1, req_to_token row `ReqToTokenPool.padding_row` (all zeros, never handed
out) and KV slot PADDING_SLOT = 0 (in the allocator's padding page 0, never handed out). So padding
rows read and write slot 0 only, real rows never read it, and rows are independent in every layer:
the real rows' logits and KV are those of the unpadded batch.

Only attention backends with `supports_cuda_graph` (triton) take part: their decode metadata comes
from static buffers (`TritonAttnBackend.init_cuda_graph_state`); torch_native needs host-side max
lengths per step. `use_graphs=False` runs the same padded buckets eagerly, without capturing: the
CPU tests check the padding that way. It decides nothing about which requests run and never
allocates KV slots or req_to_token rows.
"""

from __future__ import annotations

import bisect
import logging
import time
from typing import Dict, List, Optional, Tuple

import torch

from radixlm.attention.forward_context import ForwardBatch, forward_context
from radixlm.core import ForwardMode, ScheduleBatch
from radixlm.distributed.parallel_state import get_tp_size

logger = logging.getLogger(__name__)

PADDING_SLOT = 0  # the first slot of the allocator's padding page 0
SMALL_GPU_BYTES = 25 << 30  # SGLang's rule: below this, capture only up to batch 8
DEFAULT_MAX_BS, SMALL_GPU_MAX_BS = 160, 8


def capture_bucket_sizes(max_bs: int) -> List[int]:
    """1, 2, 4, 8, then steps of 8, capped at (and always including) max_bs."""
    if max_bs < 1:
        raise ValueError(f"cuda_graph_max_bs must be at least 1, got {max_bs}")
    return [b for b in (1, 2, 4, 8) if b < max_bs] + list(range(16, max_bs, 8)) + [max_bs]


def resolve_cuda_graph_max_bs(requested: Optional[int], max_running_requests: int, device) -> int:
    """`requested`, or SGLang's default by GPU size; never above max_running_requests."""
    if requested is None:
        total = torch.cuda.get_device_properties(torch.device(device)).total_memory
        requested = SMALL_GPU_MAX_BS if total < SMALL_GPU_BYTES else DEFAULT_MAX_BS
    return max(1, min(int(requested), int(max_running_requests)))


def create_cuda_graph_runner(model_runner) -> Optional["CudaGraphRunner"]:
    """The runner's graphs, or None: off on CPU, with --disable-cuda-graph, or (logged) with an
    attention backend that cannot be captured or with tensor parallelism."""
    cfg = model_runner.cfg
    if cfg.disable_cuda_graph or not str(model_runner.device).startswith("cuda"):
        return None
    if get_tp_size() > 1:  # the followers' steps and the collectives are not captured
        logger.warning("CUDA graphs are off with tp_size %d (untested with tensor parallelism on GPU)",
                       get_tp_size())
        return None
    backend = model_runner.attn_backend
    if not getattr(backend, "supports_cuda_graph", False):
        logger.info("CUDA graphs are off: the %s attention backend needs host-side max lengths every step "
                    "(only triton can be captured)", type(backend).__name__)
        return None
    max_bs = resolve_cuda_graph_max_bs(cfg.cuda_graph_max_bs, cfg.max_running_requests, model_runner.device)
    try:
        return CudaGraphRunner(model_runner, max_bs)
    except Exception as e:  # a failed capture must say how to run without graphs
        raise RuntimeError(f"CUDA graph capture failed ({type(e).__name__}: {e}); "
                           "--disable-cuda-graph runs decode eagerly") from e


def _pinned(rows) -> torch.Tensor:
    """Host int64 tensor for a non-blocking copy: pinned on CUDA machines (unpinned where pinning
    is unavailable, as in the CPU tests of the padding)."""
    t = torch.tensor(rows, dtype=torch.int64)
    return t.pin_memory() if torch.cuda.is_available() else t


class CudaGraphRunner:
    def __init__(self, model_runner, max_bs: int, use_graphs: bool = True):
        self.model = model_runner.model
        self.req_to_token_pool = model_runner.req_to_token_pool
        self.token_to_kv_pool = model_runner.token_to_kv_pool
        self.attn_backend = model_runner.attn_backend
        self.device = torch.device(model_runner.device)
        self.buckets = capture_bucket_sizes(max_bs)
        self.max_bs = self.buckets[-1]
        self.use_graphs = use_graphs
        self.padding_row = self.req_to_token_pool.padding_row
        self.req_to_token_pool.req_to_token[self.padding_row, 0] = PADDING_SLOT
        self._init_static_buffers()
        pool = self.token_to_kv_pool
        self.attn_backend.init_cuda_graph_state(self.buckets, pool.num_kv_heads, pool.head_dim, self.device)
        self._batches: Dict[int, ForwardBatch] = {n: self._bucket_batch(n) for n in self.buckets}
        self.graphs: Dict[int, "torch.cuda.CUDAGraph"] = {}
        self.outputs: Dict[int, Tuple[torch.Tensor, torch.Tensor]] = {}
        self.capture_s = 0.0
        self.num_replays = 0
        if use_graphs:
            self.capture()

    # ------------------------------------------------------------------ set-up
    def _init_static_buffers(self) -> None:
        """One int64 [5, width] tensor; its rows (64-byte aligned) are the static inputs."""
        width = -(-self.max_bs // 8) * 8
        self._static = torch.zeros((5, width), dtype=torch.int64, device=self.device)
        self.input_ids, self.positions = self._static[0], self._static[1]
        self.req_pool_indices, self.seq_lens, self.out_cache_loc = self._static[2], self._static[3], self._static[4]
        self.req_pool_indices.fill_(self.padding_row)
        self.seq_lens.fill_(1)
        self.out_cache_loc.fill_(PADDING_SLOT)
        self._ones = torch.ones(width, dtype=torch.int64, device=self.device)

    def _bucket_batch(self, n: int) -> ForwardBatch:
        """The ForwardBatch of bucket n over the static buffers. Its host lists are placeholders:
        graph-mode attention reads lengths from the device tensors only."""
        return ForwardBatch(
            forward_mode=ForwardMode.DECODE, input_ids=self.input_ids[:n], positions=self.positions[:n],
            out_cache_loc=self.out_cache_loc[:n], req_pool_indices=self.req_pool_indices[:n],
            seq_lens=self.seq_lens[:n], extend_prefix_lens=self.positions[:n], extend_seq_lens=self._ones[:n],
            seq_lens_cpu=[1] * n, extend_prefix_lens_cpu=[0] * n, extend_seq_lens_cpu=[1] * n,
            req_to_token_pool=self.req_to_token_pool, token_to_kv_pool=self.token_to_kv_pool,
            attn_backend=self.attn_backend)

    def _run(self, n: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """The model over bucket n's static inputs: (logits [n, vocab], hidden [n, h])."""
        fb = self._batches[n]
        self.attn_backend.init_forward_metadata_cuda_graph(n)
        with forward_context(fb):
            hidden = self.model(fb.input_ids, fb.positions)
        return self.model.compute_logits(hidden), hidden

    def capture(self) -> None:
        """Warm-up then capture of every bucket, largest first (smaller ones reuse the pool's blocks).
        The static inputs hold padding values throughout, so capture only touches slot 0."""
        t0 = time.perf_counter()
        with torch.cuda.device(self.device), torch.inference_mode():
            self.pool = torch.cuda.graph_pool_handle()
            for n in reversed(self.buckets):
                self._capture_one(n)
            torch.cuda.synchronize()
        self.capture_s = time.perf_counter() - t0
        logger.info("CUDA graphs captured for decode batch sizes %s in %.1f s", self.buckets, self.capture_s)

    def _capture_one(self, n: int) -> None:
        # Warm-up on a side stream (as torch.cuda.graph's docs ask): compiles the Triton kernels for
        # this bucket's shapes and lets cuBLAS pick its algorithms before capture.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._run(n)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self._run(n)
        self.graphs[n] = graph
        self.outputs[n] = out

    # ------------------------------------------------------------------ one step
    def bucket_for(self, bs: int) -> int:
        return self.buckets[bisect.bisect_left(self.buckets, bs)]

    def can_run(self, batch: ScheduleBatch) -> bool:
        return (batch.forward_mode.is_decode and 0 < batch.batch_size <= self.max_bs
                and not any(batch.input_logprob_ranges))

    def _load_inputs(self, batch: ScheduleBatch, bs: int, n: int) -> None:
        """Copies the step's inputs into rows :bs of the static buffers, padding values into bs:n."""
        pad = n - bs
        pos = [int(p) for p in batch.prefix_lens]  # decode: the new token's position = tokens cached
        host = [pos + [0] * pad, [r.kv.req_pool_idx for r in batch.reqs] + [self.padding_row] * pad,
                [p + 1 for p in pos] + [1] * pad]
        ids = batch.input_ids
        # pinned + non_blocking: no wait for the work in flight (a pageable copy would first sync the stream)
        if isinstance(ids, torch.Tensor):  # overlapped decode: last step's sampled ids, on the device
            self._static[1:4, :n].copy_(_pinned(host), non_blocking=True)
            self.input_ids[:bs].copy_(ids.reshape(-1))
            self.input_ids[bs:n].zero_()
        else:
            self._static[0:4, :n].copy_(_pinned([list(ids) + [0] * pad] + host), non_blocking=True)
        self.out_cache_loc[:bs].copy_(batch.out_cache_loc)
        self.out_cache_loc[bs:n].fill_(PADDING_SLOT)

    @torch.inference_mode()
    def replay(self, batch: ScheduleBatch) -> Tuple[torch.Tensor, torch.Tensor]:
        """(logits [B, vocab], hidden [B, h]) of a decode batch that `can_run`."""
        bs = batch.batch_size
        n = self.bucket_for(bs)
        self._load_inputs(batch, bs, n)
        if self.use_graphs:
            self.graphs[n].replay()
            logits, hidden = self.outputs[n]
        else:
            logits, hidden = self._run(n)
        self.num_replays += 1
        return logits[:bs], hidden[:bs]
