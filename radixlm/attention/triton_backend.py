"""triton attention: Triton kernels over the paged KV pool (`--attention-backend triton`).

Per step, `init_forward_metadata` computes everything the kernels need once (extend: the query
start offsets and the list of (request, query-row block) tiles; decode: the number of KV splits and
the stage-1 scratch buffers); per layer, `forward_*` only launches kernels:
  extend: KV store, then `extend_attention_fwd` (prefix through req_to_token + new tokens causally)
  decode: KV store, then `decode_attention_fwd` (split-KV stage 1 per (request, kv head, split) with
          the GQA group's q heads together, stage 2 merge).
Kernel designs are described in `radixlm/attention/triton_kernels/`.

CUDA graphs (decode only; `radixlm/engine/cuda_graph_runner.py`): `init_cuda_graph_state(buckets, ...)`
fixes, per bucket batch size, the number of KV splits (from the batch size and the SM count, never
from the lengths: the kernels skip empty splits, so more splits than a request has tokens is fine)
and views of one stage-1 scratch buffer sized for the largest need; `init_forward_metadata_cuda_graph(bs)`
installs them. Nothing then depends on host values, so a captured graph replays with any lengths.

On CUDA the kernels compile. On CPU tensors they run under Triton's interpreter (TRITON_INTERPRET=1,
set here on first use if the kernels are not imported yet): correct but slow, for tests only;
`auto` never picks this backend on CPU. Needs the `triton` package (CUDA builds of torch ship it).
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from typing import Dict, Iterable, Optional, Tuple

import torch

from radixlm.attention.base import AttentionBackend
from radixlm.attention.forward_context import ForwardBatch

logger = logging.getLogger(__name__)

_KERNELS_MODULE = "radixlm.attention.triton_kernels"


def extend_config(head_dim: int, cuda: bool) -> dict:
    """Extend kernel launch parameters. CPU (interpreter): few, mid-sized programs."""
    if not cuda:
        return dict(block_m=32, block_n=32, num_warps=4, num_stages=1)
    if head_dim <= 64:
        return dict(block_m=128, block_n=64, num_warps=4, num_stages=2)
    if head_dim <= 128:
        return dict(block_m=128, block_n=64, num_warps=8, num_stages=2)
    return dict(block_m=64, block_n=32, num_warps=4, num_stages=2)


def decode_config(head_dim: int, cuda: bool) -> dict:
    if not cuda:
        return dict(block_n=32, num_warps=4, num_stages=1)
    return dict(block_n=64 if head_dim <= 128 else 32, num_warps=4, num_stages=2)


@dataclass
class _ExtendMeta:
    qo_start: torch.Tensor  # [B] int32: first row of each request in q
    tile_req: torch.Tensor  # [num_tiles] int32
    tile_m: torch.Tensor  # [num_tiles] int32: first query row (within the request) of the tile
    cfg: dict


@dataclass
class _DecodeMeta:
    num_splits: int
    cfg: dict
    mid: Optional[Tuple[torch.Tensor, torch.Tensor]] = None  # (mid_o [B, Hq, S, D], mid_lse [B, Hq, S])


def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


class TritonAttnBackend(AttentionBackend):
    """Options (all optional; defaults depend on the device):
    extend_block_m / extend_block_n / decode_block_n: block sizes;
    num_kv_splits: a fixed number of decode KV splits (default: chosen per step);
    max_kv_splits, min_tokens_per_split: bounds of that choice;
    num_q_heads: the model's q heads, so that even the first decode step preallocates its scratch
    (and required for CUDA graphs)."""

    supports_cuda_graph = True  # decode metadata can come from static buffers (see the module docstring)

    def __init__(self, extend_block_m: Optional[int] = None, extend_block_n: Optional[int] = None,
                 decode_block_n: Optional[int] = None, num_kv_splits: Optional[int] = None,
                 max_kv_splits: Optional[int] = None, min_tokens_per_split: Optional[int] = None,
                 num_q_heads: Optional[int] = None, **_unused):
        try:
            import triton  # noqa: F401  (the kernels themselves are imported on first use)
        except ImportError as e:
            raise RuntimeError("attention backend 'triton' needs the `triton` package (pip install triton); "
                               "use --attention-backend torch_native otherwise") from e
        self.overrides = dict(extend_block_m=extend_block_m, extend_block_n=extend_block_n,
                              decode_block_n=decode_block_n)
        self.num_kv_splits = num_kv_splits
        self.max_kv_splits = max_kv_splits
        self.min_tokens_per_split = min_tokens_per_split
        self._k = None  # the kernels package, imported on first use
        # q heads: given by the runner, or learnt at the first decode layer; sizes the decode scratch
        # that init_forward_metadata preallocates
        self._num_q_heads: Optional[int] = num_q_heads
        self._sm: Optional[int] = None
        self._extend: Optional[_ExtendMeta] = None
        self._decode: Optional[_DecodeMeta] = None
        self._graph_meta: Dict[int, _DecodeMeta] = {}  # bucket batch size -> fixed decode metadata

    # ------------------------------------------------------------------ set-up
    def _kernels(self, device: torch.device):
        if self._k is None:
            if device.type == "cpu" and _KERNELS_MODULE not in sys.modules \
                    and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
                logger.warning("triton attention on CPU: running the kernels in Triton's interpreter "
                               "(TRITON_INTERPRET=1); this is for testing and is slow")
                os.environ["TRITON_INTERPRET"] = "1"
            import radixlm.attention.triton_kernels as k
            self._k = k
        if device.type == "cpu" and not self._k.INTERPRETED:
            raise RuntimeError("triton attention got CPU tensors but its kernels were compiled for the GPU; set "
                               "TRITON_INTERPRET=1 before importing them, or use --attention-backend torch_native")
        return self._k

    def _extend_cfg(self, head_dim: int, cuda: bool) -> dict:
        cfg = extend_config(head_dim, cuda)
        if self.overrides["extend_block_m"]:
            cfg["block_m"] = self.overrides["extend_block_m"]
        if self.overrides["extend_block_n"]:
            cfg["block_n"] = self.overrides["extend_block_n"]
        return cfg

    def _decode_cfg(self, head_dim: int, cuda: bool) -> dict:
        cfg = decode_config(head_dim, cuda)
        if self.overrides["decode_block_n"]:
            cfg["block_n"] = self.overrides["decode_block_n"]
        return cfg

    def _occupancy_splits(self, batch: int, num_kv_heads: int, device: torch.device) -> int:
        """Enough (request, kv head, split) programs to fill the GPU (~2 waves), at most
        `max_kv_splits`; a fixed `num_kv_splits` wins. Depends on no request length."""
        if self.num_kv_splits:
            return int(self.num_kv_splits)
        cuda = device.type == "cuda"
        max_splits = self.max_kv_splits or (32 if cuda else 4)
        if not cuda:
            return max_splits
        if self._sm is None:
            self._sm = _sm_count(device)
        return max(1, min(-(-2 * self._sm // max(1, batch * num_kv_heads)), max_splits))

    def _choose_num_splits(self, batch: int, num_kv_heads: int, max_len: int, device: torch.device) -> int:
        """The occupancy choice, with each split keeping at least `min_tokens_per_split` tokens of
        the longest request."""
        if self.num_kv_splits:
            return int(self.num_kv_splits)
        min_tokens = self.min_tokens_per_split or (64 if device.type == "cuda" else 16)
        by_len = -(-max_len // min_tokens)
        return max(1, min(by_len, self._occupancy_splits(batch, num_kv_heads, device)))

    # ------------------------------------------------------------------ CUDA graphs
    def init_cuda_graph_state(self, buckets: Iterable[int], num_kv_heads: int, head_dim: int,
                              device: torch.device) -> None:
        """Fixed decode metadata for every bucket batch size: its split count and views of one
        stage-1 scratch allocation (buckets replay one at a time, so they share it)."""
        if self._num_q_heads is None:
            raise RuntimeError("CUDA graphs need the model's q heads: create the backend with num_q_heads")
        device = torch.device(device)
        self._kernels(device)
        hq, d = self._num_q_heads, head_dim
        cfg = self._decode_cfg(head_dim, device.type == "cuda")
        splits = {int(bs): self._occupancy_splits(int(bs), num_kv_heads, device) for bs in buckets}
        rows = max(bs * s for bs, s in splits.items()) * hq
        mid_o = torch.empty(rows * d, dtype=torch.float32, device=device)
        mid_lse = torch.empty(rows, dtype=torch.float32, device=device)
        self._graph_meta = {}
        for bs, s in splits.items():
            mid = (mid_o[:bs * hq * s * d].view(bs, hq, s, d), mid_lse[:bs * hq * s].view(bs, hq, s))
            self._graph_meta[bs] = _DecodeMeta(s, cfg, mid)

    def graph_num_splits(self, bs: int) -> int:
        return self._graph_meta[bs].num_splits

    def init_forward_metadata_cuda_graph(self, bs: int) -> None:
        """Decode metadata of bucket `bs` for a step whose inputs live in the graph runner's static
        buffers (capture, and the eager padded run); a replay needs no call at all."""
        meta = self._graph_meta.get(bs)
        if meta is None:
            raise RuntimeError(f"no CUDA-graph state for batch size {bs}; init_cuda_graph_state() knows "
                               f"{sorted(self._graph_meta)}")
        self._extend = None
        self._decode = meta

    def init_forward_metadata(self, fb: ForwardBatch) -> None:
        device = fb.seq_lens.device
        k = self._kernels(device)
        pool = fb.token_to_kv_pool
        cuda = device.type == "cuda"
        if fb.forward_mode.is_decode:
            self._extend = None
            splits = self._choose_num_splits(fb.batch_size, pool.num_kv_heads, fb.max_seq_len, device)
            meta = _DecodeMeta(splits, self._decode_cfg(pool.head_dim, cuda))
            if self._num_q_heads is not None:
                meta.mid = k.decode_attention.decode_buffers(fb.batch_size, self._num_q_heads, splits, pool.head_dim,
                                                             device)
            self._decode = meta
        else:
            self._decode = None
            cfg = self._extend_cfg(pool.head_dim, cuda)
            qo_start, acc = [], 0
            for n in fb.extend_seq_lens_cpu:
                qo_start.append(acc)
                acc += int(n)
            tile_req, tile_m = k.extend_attention.extend_tiles(fb.extend_seq_lens_cpu, cfg["block_m"])
            packed = torch.tensor(qo_start + tile_req + tile_m, dtype=torch.int32)
            if cuda:  # pinned: a pageable non_blocking copy would still wait for the forward in flight
                packed = packed.pin_memory()
            packed = packed.to(device, non_blocking=True)
            b, n = len(qo_start), len(tile_req)
            self._extend = _ExtendMeta(packed[:b], packed[b:b + n], packed[b + n:], cfg)

    # ------------------------------------------------------------------ per layer
    def _store(self, k, v, layer, fb: ForwardBatch):
        k_buf, v_buf = fb.token_to_kv_pool.get_kv_buffer(layer.layer_id)
        self._k.store_kv(k, v, fb.out_cache_loc, k_buf, v_buf)
        return k_buf, v_buf

    def forward_extend(self, q, k, v, layer, fb: ForwardBatch) -> torch.Tensor:
        meta = self._extend
        if meta is None:
            raise RuntimeError("init_forward_metadata() was not called for this extend batch")
        hq, hk, d = layer.num_heads, layer.num_kv_heads, layer.head_dim
        k_buf, v_buf = self._store(k, v, layer, fb)
        q3, k3, v3 = q.reshape(-1, hq, d), k.reshape(-1, hk, d), v.reshape(-1, hk, d)
        o = torch.empty((q3.shape[0], hq, d), dtype=q.dtype, device=q.device)
        cfg = meta.cfg
        self._k.extend_attention_fwd(
            q3, k3, v3, o, k_buf, v_buf, fb.req_to_token_pool.req_to_token, fb.req_pool_indices,
            fb.extend_prefix_lens, meta.qo_start, fb.extend_seq_lens, meta.tile_req, meta.tile_m, layer.scaling,
            block_m=cfg["block_m"], block_n=cfg["block_n"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
            sliding_window=getattr(layer, "sliding_window", None))
        return o.view(-1, hq * d)

    def forward_decode(self, q, k, v, layer, fb: ForwardBatch) -> torch.Tensor:
        meta = self._decode
        if meta is None:
            raise RuntimeError("init_forward_metadata() was not called for this decode batch")
        hq, d = layer.num_heads, layer.head_dim
        k_buf, v_buf = self._store(k, v, layer, fb)
        q3 = q.reshape(-1, hq, d)
        batch = q3.shape[0]
        if meta.mid is None or meta.mid[0].shape[1] != hq:
            self._num_q_heads = hq
            meta.mid = self._k.decode_attention.decode_buffers(batch, hq, meta.num_splits, d, q.device)
        o = torch.empty((batch, hq, d), dtype=q.dtype, device=q.device)
        cfg = meta.cfg
        self._k.decode_attention_fwd(
            q3, o, k_buf, v_buf, fb.req_to_token_pool.req_to_token, fb.req_pool_indices, fb.seq_lens,
            meta.num_splits, meta.mid[0], meta.mid[1], layer.scaling,
            block_n=cfg["block_n"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
            sliding_window=getattr(layer, "sliding_window", None))
        return o.view(-1, hq * d)
