"""Tensor-parallel topology and collectives: the one place radixlm touches torch.distributed.

Owns the process's `TPGroup` (rank, size, and two torch.distributed groups: `device_group` for the
model's all-reduce / all-gather, NCCL on CUDA and gloo on CPU; `cpu_group`, always gloo, for rank
0's per-step broadcast of the schedule to the other ranks) and the helpers layers call. With one
rank nothing here touches torch.distributed and every collective is the identity.

Every wait has a deadline: the device group's collectives and the start-up rendezvous fail after
`dist_timeout_s()` (a rank that hangs), and gloo fails at once when a peer process dies ("Connection
closed by peer"). The cpu group's timeout is long on purpose: followers wait on it while the server
is idle, and a dead rank 0 still ends that wait at once.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Tuple

import torch

logger = logging.getLogger(__name__)

ENV_TIMEOUT = "RADIXLM_DIST_TIMEOUT"  # seconds; default DEFAULT_TIMEOUT_S
DEFAULT_TIMEOUT_S = 120.0
IDLE_TIMEOUT = datetime.timedelta(days=7)  # the schedule broadcast: followers wait there while idle


@dataclass(frozen=True)
class TPGroup:
    rank: int = 0
    size: int = 1
    device_group: Any = None  # all-reduce / all-gather of activations
    cpu_group: Any = None  # gloo: the schedule rank 0 broadcasts each step (long timeout: idle waits)
    device: str = "cpu"

    @property
    def is_leader(self) -> bool:
        return self.rank == 0


_GROUP = TPGroup()


def get_tp_group() -> TPGroup:
    return _GROUP


def get_tp_rank() -> int:
    return _GROUP.rank


def get_tp_size() -> int:
    return _GROUP.size


def dist_timeout_s() -> float:
    return float(os.environ.get(ENV_TIMEOUT) or DEFAULT_TIMEOUT_S)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def parse_init_addr(addr: str) -> Tuple[str, int]:
    """'host:port' (IPv6 as '[::1]:port') -> (host, port); a clear error otherwise."""
    host, sep, port = addr.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"dist_init_addr: {addr!r} is not host:port")
    return host.strip("[]"), int(port)


def global_rank(tp_size: int, nnodes: int, node_rank: int, local_rank: int) -> int:
    """Rank of this node's `local_rank`-th process: nodes hold consecutive blocks of tp_size/nnodes."""
    return node_rank * (tp_size // nnodes) + local_rank


def _rendezvous(rank: int, size: int, host: str, port: int, timeout_s: float,
                peers_alive: Optional[Callable[[], Optional[str]]]):
    """The TCP store of the group. Rank 0 serves it and waits until every rank announced itself,
    failing at once when `peers_alive()` names a dead peer (a follower that crashed while starting)."""
    import torch.distributed as dist

    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore(host, port, size, is_master=rank == 0, timeout=timeout, wait_for_workers=False)
    if rank != 0:
        store.set(f"radixlm/joined/{rank}", "1")
        return store
    keys = [f"radixlm/joined/{r}" for r in range(1, size)]
    deadline = time.monotonic() + timeout_s
    while not store.check(keys):
        dead = peers_alive() if peers_alive is not None else None
        if dead:
            raise RuntimeError(f"tensor-parallel start-up failed: {dead}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"tensor-parallel start-up: not every one of the {size} ranks joined "
                               f"{host}:{port} within {timeout_s:.0f} s")
        time.sleep(0.05)
    return store


def init_tp_group(rank: int, size: int, init_addr: str, device: str, timeout_s: Optional[float] = None,
                  peers_alive: Optional[Callable[[], Optional[str]]] = None) -> TPGroup:
    """Joins the tensor-parallel group (blocks until all `size` ranks joined, at most the timeout) and
    makes it this process's group. `init_addr`: host:port of rank 0's rendezvous; `peers_alive`
    (rank 0): None while the other ranks' processes live, else what happened to them."""
    import torch.distributed as dist

    global _GROUP
    if _GROUP.size > 1:
        raise RuntimeError(f"this process is already rank {_GROUP.rank} of a tensor-parallel group")
    host, port = parse_init_addr(init_addr)
    timeout_s = timeout_s if timeout_s is not None else dist_timeout_s()
    backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(torch.device(device))
    store = _rendezvous(rank, size, host, port, timeout_s, peers_alive)
    dist.init_process_group(backend, store=store, rank=rank, world_size=size,
                            timeout=datetime.timedelta(seconds=timeout_s))
    cpu_group = dist.new_group(list(range(size)), backend="gloo", timeout=IDLE_TIMEOUT)
    _GROUP = TPGroup(rank, size, dist.group.WORLD, cpu_group, str(device))
    logger.info("tensor-parallel rank %d of %d joined (%s via %s:%d)", rank, size, backend, host, port)
    return _GROUP


def destroy_tp_group() -> None:
    import torch.distributed as dist

    global _GROUP
    if _GROUP.size > 1 and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - a peer already gone
            pass
    _GROUP = TPGroup()


# ---------------------------------------------------------------------------------- collectives
def tp_all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum over the ranks, in place; the identity with one rank."""
    if _GROUP.size == 1:
        return x
    import torch.distributed as dist

    dist.all_reduce(x, group=_GROUP.device_group)
    return x


def tp_all_gather(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """The ranks' tensors concatenated along `dim`, rank order; the identity with one rank."""
    if _GROUP.size == 1:
        return x
    import torch.distributed as dist

    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(_GROUP.size)]
    dist.all_gather(parts, x, group=_GROUP.device_group)
    return torch.cat(parts, dim=dim)


def tp_all_reduce_min(value: int) -> int:
    """The smallest of the ranks' `value`s (the KV capacity all ranks can hold)."""
    if _GROUP.size == 1:
        return value
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.int64, device=_GROUP.device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=_GROUP.device_group)
    return int(t.item())


def broadcast_from_leader(payload: Optional[torch.Tensor]) -> torch.Tensor:
    """Rank 0 sends a 1-D int64 CPU tensor to every rank (two gloo broadcasts: its length, then it);
    the others pass None and get it. Followers wait here between steps (see IDLE_TIMEOUT)."""
    import torch.distributed as dist

    g = _GROUP
    n = torch.tensor([payload.numel() if g.is_leader else 0], dtype=torch.int64)
    dist.broadcast(n, src=0, group=g.cpu_group)
    if g.is_leader:
        data = payload.to(dtype=torch.int64, device="cpu").contiguous()
    else:
        data = torch.empty(int(n.item()), dtype=torch.int64)
    if data.numel():
        dist.broadcast(data, src=0, group=g.cpu_group)
    return data
