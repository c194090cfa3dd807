"""LoRAManager: the adapters a server holds, and the bounded pool of device slots they run from.

Owns the adapters in host memory (name -> LoRAAdapter, from --lora-paths and /load_lora_adapter),
the `--max-loras-per-batch` device slots (each LoRALinear's A/B buffers hold one adapter per slot)
and which adapter sits in which slot. `prepare(reqs, extend_lens)` is called by the model runner
for every step: it makes every adapter of the batch resident (copying it from host memory into a
free slot, or the least recently used one no request of this step needs) and returns the step's
`LoRABatchInfo` (None when every row is the base model). The scheduler keeps the distinct adapters
of the running requests within the slots, so a step never needs more. Thread-safe: the overlap
worker prepares steps while the scheduler thread loads or unloads adapters.
"""

from __future__ import annotations

import itertools
import logging
import threading
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch

from radixlm.lora.adapter import MODULE_PACKING, LoRAAdapter, LoRAError, expand_target_modules, load_adapter
from radixlm.lora.layers import LoRABatchInfo, wrap_model

logger = logging.getLogger(__name__)

DEFAULT_MAX_RANK = 64  # --max-lora-rank when no adapter is given at start-up


@dataclass
class LoRAConfig:
    lora_paths: Dict[str, str] = field(default_factory=dict)  # name -> adapter directory
    max_loras_per_batch: int = 8
    max_lora_rank: Optional[int] = None  # None: the largest rank of lora_paths
    lora_target_modules: Optional[List[str]] = None  # None: those of lora_paths (all when none given)
    backend: str = "auto"  # torch | triton | auto (triton on CUDA)


def parse_lora_paths(items) -> Dict[str, str]:
    """SGLang's --lora-paths items: `NAME=PATH` or `PATH` (named after itself); or a dict."""
    if not items:
        return {}
    if isinstance(items, dict):
        return dict(items)
    out: Dict[str, str] = {}
    for it in ([items] if isinstance(items, str) else items):
        name, sep, path = str(it).partition("=")
        if not sep:
            name, path = it, it
        if not name or not path:
            raise ValueError(f"lora_paths: {it!r} is not NAME=PATH")
        if name in out:
            raise ValueError(f"lora_paths: adapter name {name!r} is given twice")
        out[name] = path
    return out


class LoRAManager:
    def __init__(self, model, model_config, cfg: LoRAConfig, device):
        self.model_config, self.cfg, self.device = model_config, cfg, device
        self._uids = itertools.count(1)
        self._lock = threading.RLock()
        everything = set(MODULE_PACKING)
        initial = {n: load_adapter(n, p, model_config, 1 << 30, everything, next(self._uids))
                   for n, p in cfg.lora_paths.items()}
        self.max_rank = cfg.max_lora_rank or max((a.rank for a in initial.values()), default=DEFAULT_MAX_RANK)
        if cfg.lora_target_modules:
            self.modules = expand_target_modules(cfg.lora_target_modules)
        else:
            self.modules = set().union(*(a.target_modules for a in initial.values())) if initial else everything
        self.num_slots = cfg.max_loras_per_batch
        self.wrappers = wrap_model(model, model_config, self.modules, self.num_slots, self.max_rank, device)
        backend = cfg.backend
        if backend == "auto":
            backend = "triton" if torch.device(device).type == "cuda" else "torch"
        self.backend = backend
        self.adapters: Dict[str, LoRAAdapter] = {}
        self.slot_names: List[Optional[str]] = [None] * self.num_slots
        self._slot_used = [0] * self.num_slots  # step counter of last use (LRU)
        self._steps = 0
        self.num_slot_loads = 0
        for name, a in initial.items():
            self._check(a)
            self.adapters[name] = a

    # ------------------------------------------------------------------ registry
    def _check(self, a: LoRAAdapter) -> None:
        if a.rank > self.max_rank:
            raise LoRAError(f"adapter {a.name!r}: rank {a.rank} is above --max-lora-rank {self.max_rank}")
        extra = sorted(a.target_modules - self.modules)
        if extra:
            raise LoRAError(f"adapter {a.name!r}: target modules {', '.join(extra)} are not enabled "
                            f"(--lora-target-modules allows {', '.join(sorted(self.modules))})")

    def load(self, name: str, path: str) -> LoRAAdapter:
        if not isinstance(name, str) or not name or ":" in name:
            raise LoRAError(f"lora_name: {name!r} must be a non-empty string without ':'")
        with self._lock:
            if name in self.adapters:
                raise LoRAError(f"lora_name: an adapter named {name!r} is already loaded")
        a = load_adapter(name, path, self.model_config, self.max_rank, self.modules, next(self._uids))
        self._check(a)
        with self._lock:
            if name in self.adapters:
                raise LoRAError(f"lora_name: an adapter named {name!r} is already loaded")
            self.adapters[name] = a
        logger.info("LoRA adapter %r loaded from %s (rank %d, %s)", name, path, a.rank,
                    ", ".join(sorted(a.target_modules)))
        return a

    def unload(self, name: str) -> None:
        """Forgets an adapter; the caller made sure no request uses it."""
        with self._lock:
            if name not in self.adapters:
                raise LoRAError(f"lora_name: no adapter named {name!r} is loaded")
            del self.adapters[name]
            for i, n in enumerate(self.slot_names):
                if n == name:
                    self.slot_names[i] = None
        logger.info("LoRA adapter %r unloaded", name)

    def uid_of(self, name: str) -> int:
        with self._lock:
            a = self.adapters.get(name)
        if a is None:
            raise LoRAError(f"lora_path: unknown LoRA adapter {name!r} (loaded: {', '.join(self.names()) or 'none'})")
        return a.uid

    def names(self) -> List[str]:
        with self._lock:
            return sorted(self.adapters)

    def info(self) -> Dict[str, dict]:
        with self._lock:
            return {n: {"path": a.path, "rank": a.rank, "target_modules": sorted(a.target_modules)}
                    for n, a in self.adapters.items()}

    # ------------------------------------------------------------------ slots
    def prepare(self, lora_names: Sequence[Optional[str]], extend_lens: Sequence[int]) -> Optional[LoRABatchInfo]:
        """Makes the step's adapters resident; the step's LoRABatchInfo (None: base model only)."""
        if not any(lora_names):
            return None
        with self._lock:
            self._steps += 1
            needed = {n for n in lora_names if n}
            if len(needed) > self.num_slots:
                raise RuntimeError(f"a step needs {len(needed)} adapters but there are {self.num_slots} slots")
            slot_of = {n: i for i, n in enumerate(self.slot_names) if n is not None}
            for name in sorted(needed):
                if name not in slot_of:
                    slot_of[name] = self._fill_slot(name, needed)
                self._slot_used[slot_of[name]] = self._steps
            slots = [slot_of[n] if n else -1 for n in lora_names]
        return LoRABatchInfo.build(slots, list(extend_lens), self.device, self.backend)

    def _fill_slot(self, name: str, needed: set) -> int:
        adapter = self.adapters.get(name)
        if adapter is None:
            raise LoRAError(f"unknown LoRA adapter {name!r}")
        free = [i for i, n in enumerate(self.slot_names) if n is None or n not in needed]
        slot = min(free, key=lambda i: (self.slot_names[i] is not None, self._slot_used[i]))
        for layer, w in self.wrappers:
            w.set_slot(slot, {p: adapter.weights[(layer, p)] for p in w.piece_names if (layer, p) in adapter.weights})
        self.slot_names[slot] = name
        self.num_slot_loads += 1
        return slot

    @property
    def slots_used(self) -> int:
        return sum(n is not None for n in self.slot_names)
