"""ModelRunner: owns the model, the KV memory, the attention backend and the sampler.

In: a `ScheduleBatch` from the scheduler. Out: next-token ids (and logprobs) for the requests that
sample this step. It builds the step's `ForwardBatch` once, runs the model inside
`forward_context`, computes logits only at each request's last position and samples. It sizes the
KV pool at start-up (`max_total_tokens`, or `mem_fraction_static` of device memory on CUDA).
It never decides which requests run: that is the scheduler's job.

Tensor parallelism (`tp_size` > 1): every rank builds a runner with its `tp_rank`; it joins the
process group, loads its shard of the weights and holds the KV of its own heads. Rank 0's runner
(under the scheduler) broadcasts each step to the others before computing it (engine/tp_worker.py);
the others run `run_follower`. Any failure of a forward under TP is fatal to the group (the ranks
may be mid-collective): `on_tp_failure` is called, and every later forward fails at once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, List, Optional

import torch

from radixlm.attention import create_attention_backend, resolve_backend_name
from radixlm.attention.forward_context import ForwardBatch, forward_context
from radixlm.core import ScheduleBatch
from radixlm.distributed.parallel_state import destroy_tp_group, get_tp_group, init_tp_group, tp_all_reduce_min
from radixlm.engine import tp_worker
from radixlm.engine.cpu_compile_runner import create_cpu_compile_runner
from radixlm.engine.cuda_graph_runner import create_cuda_graph_runner
from radixlm.engine.host_memory import keep_freed_host_memory
from radixlm.engine.sampler import SampleOutput, Sampler
from radixlm.layers.linear import kv_head_sharding
from radixlm.mem.allocator import TokenToKVPoolAllocator
from radixlm.mem.host_copy import to_device_int64
from radixlm.mem.kv_pool import MHATokenToKVPool, ReqToTokenPool
from radixlm.models.loader import load_model
from radixlm.models.model_config import ModelConfig
from radixlm.server_args import DEFAULT_MAX_RUNNING_REQUESTS, default_of

logger = logging.getLogger(__name__)

CPU_KV_BUDGET_BYTES = 2 << 30  # default KV budget on CPU when max_total_tokens is not given
INPUT_LOGPROB_CHUNK = 1024  # prompt positions per logits matmul when prompt logprobs are asked


@dataclass
class RunnerConfig:
    """The runner's options; `derive_config(RunnerConfig, server_args, ...)` builds it from the
    validated ServerArgs (defaults come from there too, except the device: cpu here)."""

    device: str = "cpu"
    attention_backend: str = default_of("attention_backend")
    moe_runner_backend: str = default_of("moe_runner_backend")
    load_format: str = default_of("load_format")
    max_total_tokens: Optional[int] = None
    mem_fraction_static: float = default_of("mem_fraction_static")
    max_running_requests: int = DEFAULT_MAX_RUNNING_REQUESTS
    page_size: int = default_of("page_size")
    random_seed: int = default_of("random_seed")
    show_progress: bool = False
    # CUDA graphs for decode batches up to this size (None: 160, or 8 on GPUs under 25 GiB; never above
    # max_running_requests); CUDA with the triton backend only
    cuda_graph_max_bs: Optional[int] = None
    disable_cuda_graph: bool = False
    # CPU: decode batches up to torch_compile_max_bs run a torch.compile'd step (engine/cpu_compile_runner.py)
    enable_torch_compile: bool = False
    torch_compile_max_bs: Optional[int] = None
    # tensor parallelism: this process is rank tp_rank of tp_size, rendezvous at dist_init_addr (host:port)
    tp_size: int = default_of("tp_size")
    tp_rank: int = 0
    dist_init_addr: Optional[str] = None
    lora: Optional[Any] = None  # a lora.manager.LoRAConfig with --enable-lora


class ModelRunner:
    def __init__(self, model_config: ModelConfig, cfg: RunnerConfig,
                 peers_alive: Optional[Callable[[], Optional[str]]] = None):
        self.model_config = model_config
        self.cfg = cfg
        self.device = cfg.device
        if str(cfg.device) == "cpu":
            keep_freed_host_memory()
        torch.manual_seed(cfg.random_seed)
        self.tp = self._init_tensor_parallel(peers_alive)
        self.tp_broken: Optional[str] = None  # why the group failed (then every forward fails at once)
        self.on_tp_failure: Callable[[BaseException], None] = lambda e: None  # the server exits here
        self.num_heads = model_config.num_heads // self.tp.size  # this rank's heads
        self.num_kv_heads = kv_head_sharding(model_config.num_heads, model_config.num_kv_heads, self.tp.size,
                                             self.tp.rank)[0]
        self.model = load_model(model_config, cfg.device, cfg.load_format, cfg.random_seed, cfg.show_progress,
                                cfg.moe_runner_backend)
        self.max_total_num_tokens = tp_all_reduce_min(self._kv_capacity())  # what every rank can hold
        self.allocator = TokenToKVPoolAllocator(self.max_total_num_tokens, cfg.page_size, device=cfg.device)
        self.token_to_kv_pool = MHATokenToKVPool(
            self.allocator.num_slots_total, model_config.num_layers, self.num_kv_heads,
            model_config.head_dim, model_config.dtype, cfg.device)
        self.req_to_token_pool = ReqToTokenPool(cfg.max_running_requests + 1, model_config.context_len + 1,
                                                cfg.device)
        self.attn_backend = create_attention_backend(self._attention_backend_name(), cfg.device,
                                                     num_q_heads=self.num_heads)
        self.sampler = Sampler(model_config.vocab_size, model_config.eos_token_ids)
        self.lora_manager = self._init_lora()
        # captures now; None when graphs are off (and with LoRA: its per-step slots are not in the graphs)
        self.cuda_graph_runner = None if self.lora_manager else create_cuda_graph_runner(self)
        self.cpu_compile_runner = create_cpu_compile_runner(self)  # None without --enable-torch-compile

    # ------------------------------------------------------------------ set-up
    def _init_tensor_parallel(self, peers_alive):
        cfg = self.cfg
        if cfg.tp_size == 1:
            return get_tp_group()
        self.model_config.check_tensor_parallel(cfg.tp_size)  # before waiting for the other ranks
        if not cfg.dist_init_addr:
            raise ValueError("tp_size > 1 needs dist_init_addr (host:port of rank 0's rendezvous)")
        return init_tp_group(cfg.tp_rank, cfg.tp_size, cfg.dist_init_addr, cfg.device, peers_alive=peers_alive)

    def _init_lora(self):
        if self.cfg.lora is None:
            return None
        from radixlm.lora.manager import LoRAManager

        return LoRAManager(self.model, self.model_config, self.cfg.lora, self.device)

    def _attention_backend_name(self) -> str:
        name = resolve_backend_name(self.cfg.attention_backend, self.device)
        if self.tp.size > 1 and name != "torch_native":
            if self.cfg.attention_backend != "auto":
                raise ValueError(f"tp_size {self.tp.size} with attention_backend {name!r} is untested (tensor "
                                 "parallelism is tested on CPU with torch_native): use --attention-backend "
                                 "torch_native")
            logger.warning("tp_size %d: the torch_native attention backend is used (%s with tensor "
                           "parallelism is untested on GPU)", self.tp.size, name)
            return "torch_native"
        return name

    def shutdown(self) -> None:
        """Rank 0: tells the followers to stop (they return from run_follower); every rank: leaves
        the group. Safe to call twice and when the group already failed."""
        if self.tp.size == 1:
            return
        if self.tp.is_leader and self.tp_broken is None:
            try:
                tp_worker.send_stop()
            except Exception as e:  # noqa: BLE001 - a follower already gone
                logger.warning("could not stop the tensor-parallel followers: %s", e)
        self.tp_broken = self.tp_broken or "shut down"
        destroy_tp_group()

    def _kv_capacity(self) -> int:
        mc = self.model_config
        per_token = MHATokenToKVPool.bytes_per_token(mc.num_layers, self.num_kv_heads, mc.head_dim, mc.dtype)
        if self.cfg.max_total_tokens is not None:
            if self.cfg.max_total_tokens < self.cfg.page_size:
                raise ValueError("max_total_tokens must hold at least one page")
            return self.cfg.max_total_tokens
        if str(self.device).startswith("cuda"):
            free, total = torch.cuda.mem_get_info(self.device)
            used = total - free  # weights and everything else allocated so far
            budget = total * self.cfg.mem_fraction_static - used
            if budget <= per_token * 16:
                raise RuntimeError(f"mem_fraction_static={self.cfg.mem_fraction_static} leaves no room for the KV "
                                   f"cache after the weights ({used / 2**30:.1f} GiB used of {total / 2**30:.1f}). "
                                   "Raise --mem-fraction-static.")
            return int(budget // per_token)
        return int(min(CPU_KV_BUDGET_BYTES // per_token, max(mc.context_len * 16, 32768)))

    # ------------------------------------------------------------------ one step
    def build_forward_batch(self, batch: ScheduleBatch) -> ForwardBatch:
        """The step's device tensors, sent in one host->device copy: on CUDA from pinned memory and
        non-blocking, so that preparing step N+1 never waits for step N to finish (overlap)."""
        positions, seq_lens = [], []
        for pre, ext in zip(batch.prefix_lens, batch.extend_lens):
            positions.extend(range(pre, pre + ext))
            seq_lens.append(pre + ext)
        ids_on_device = isinstance(batch.input_ids, torch.Tensor)
        rows = [positions, [r.kv.req_pool_idx for r in batch.reqs], seq_lens, list(batch.prefix_lens),
                list(batch.extend_lens)] + ([] if ids_on_device else [list(batch.input_ids)])
        sizes = [len(x) for x in rows]
        flat = to_device_int64([v for x in rows for v in x], self.device)
        parts = list(torch.split(flat, sizes))
        return ForwardBatch(
            forward_mode=batch.forward_mode,
            input_ids=batch.input_ids.to(self.device) if ids_on_device else parts[5],
            positions=parts[0],
            out_cache_loc=batch.out_cache_loc.to(self.device),
            req_pool_indices=parts[1],
            seq_lens=parts[2],
            extend_prefix_lens=parts[3],
            extend_seq_lens=parts[4],
            seq_lens_cpu=seq_lens,
            extend_prefix_lens_cpu=list(batch.prefix_lens),
            extend_seq_lens_cpu=list(batch.extend_lens),
            req_to_token_pool=self.req_to_token_pool,
            token_to_kv_pool=self.token_to_kv_pool,
            attn_backend=self.attn_backend,
            lora=self.lora_manager.prepare([r.lora_path for r in batch.reqs], batch.extend_lens)
            if self.lora_manager else None,
        )

    @torch.inference_mode()
    def forward(self, batch: ScheduleBatch):
        """Runs the model; returns (logits at every request's last new token [B, vocab], hidden [T, h]).
        Decode batches the CUDA graphs cover replay one (outputs valid until the next step)."""
        if self.cuda_graph_runner is not None and self.cuda_graph_runner.can_run(batch):
            return self.cuda_graph_runner.replay(batch)
        if self.cpu_compile_runner is not None and self.cpu_compile_runner.can_run(batch):
            return self.cpu_compile_runner.run(batch)
        fb = self.build_forward_batch(batch)
        if self.tp.size == 1:
            return self.run_forward_batch(fb)
        return self._tp_call(lambda: (tp_worker.send_forward(fb), self.run_forward_batch(fb))[1])

    def run_forward_batch(self, fb: ForwardBatch):
        """(logits at every request's last new token [B, vocab], hidden [T, h]) of a built step; the
        followers of tensor parallelism call this for each step rank 0 sends."""
        self.attn_backend.init_forward_metadata(fb)
        with forward_context(fb):
            hidden = self.model(fb.input_ids, fb.positions)
        last = torch.cumsum(fb.extend_seq_lens, 0) - 1
        return self.model.compute_logits(hidden[last]), hidden

    @torch.inference_mode()
    def forward_all_logits(self, batch: ScheduleBatch) -> torch.Tensor:
        """Logits at every new token of the batch [T, vocab] (speculative verification)."""
        _, hidden = self.forward(batch)
        return self._logits_at(hidden, torch.arange(hidden.shape[0], device=hidden.device))

    def run_follower(self) -> None:
        """A tensor-parallel rank other than 0: runs rank 0's steps until it stops (engine/tp_worker.py)."""
        if self.tp.is_leader:
            raise RuntimeError("rank 0 runs the scheduler, not the follower loop")
        tp_worker.run_follower(self)

    def _tp_call(self, fn):
        if self.tp_broken is not None:
            raise RuntimeError(f"the tensor-parallel group is unusable ({self.tp_broken})")
        try:
            return fn()
        except BaseException as e:
            self.tp_broken = f"{type(e).__name__}: {e}"
            logger.error("tensor-parallel forward failed; the group is unusable: %s", self.tp_broken)
            self.on_tp_failure(e)
            raise

    def _logits_at(self, hidden: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return self.model.compute_logits(hidden[idx])
        return self._tp_call(lambda: (tp_worker.send_logits(idx), self.model.compute_logits(hidden[idx]))[1])

    @torch.inference_mode()
    def forward_and_sample(self, batch: ScheduleBatch, defer_host_copy: bool = False) -> SampleOutput:
        """`defer_host_copy`: the sampled ids stay on the device, with a non-blocking copy to the host in
        flight (`SampleOutput.resolve()` waits for it); the overlap scheduler uses this."""
        logits, hidden = self.forward(batch)
        rows = [i for i, s in enumerate(batch.sample) if s]
        if rows:
            reqs = [batch.reqs[i] for i in rows]
            if len(rows) != batch.batch_size:
                logits = logits[torch.tensor(rows, device=logits.device)]
            out = self.sampler(logits, reqs, defer_host_copy=defer_host_copy)
        else:
            out = SampleOutput(next_token_ids=[])
        if any(batch.input_logprob_ranges):
            out.input_logprobs = self.input_logprobs(batch, hidden)
        return out

    def input_logprobs(self, batch: ScheduleBatch, hidden: torch.Tensor) -> List[Optional[list]]:
        """Prompt logprobs: for each requested absolute position p, the logprob of token p+1 given
        tokens 0..p (and the top-k alternatives). Returns per request [(p+1, lp, token, tops)]."""
        res: List[Optional[list]] = []
        offset = 0
        for req, pre, ext, rng in zip(batch.reqs, batch.prefix_lens, batch.extend_lens, batch.input_logprob_ranges):
            if rng is None:
                res.append(None)
                offset += ext
                continue
            a, b = rng
            fill = req.fill_ids
            entries = []
            for c in range(a, b, INPUT_LOGPROB_CHUNK):
                d = min(b, c + INPUT_LOGPROB_CHUNK)
                idx = torch.arange(offset + c - pre, offset + d - pre, device=hidden.device)
                lps = torch.log_softmax(self._logits_at(hidden, idx).float(), dim=-1)
                targets = torch.tensor(fill[c + 1:d + 1], device=lps.device)
                chosen = lps.gather(1, targets[:, None]).squeeze(1).tolist()
                tops = [None] * (d - c)
                if req.top_logprobs_num > 0:
                    v, t = lps.topk(min(req.top_logprobs_num, lps.shape[1]), dim=-1)
                    tops = [list(zip(vr, tr)) for vr, tr in zip(v.tolist(), t.tolist())]
                entries.extend(zip(range(c + 1, d + 1), chosen, fill[c + 1:d + 1], tops))
            res.append(entries)
            offset += ext
        return res
