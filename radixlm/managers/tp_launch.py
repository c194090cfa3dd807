"""Launching the tensor-parallel ranks of one server or Engine (`--tp-size N`).

Rank 0 is the scheduler (the scheduler process, or the offline Engine's scheduler thread); this
module starts the other ranks of this node as processes that load their shard and run
`ModelRunner.run_follower`, and picks the rendezvous address when none is given (a free port on
127.0.0.1). Nodes hold consecutive blocks of tp_size / nnodes ranks (`--nnodes`, `--node-rank`,
`--dist-init-addr` = rank 0's host:port). Followers exit with their parent; a dead follower makes
rank 0's next collective fail (and the server's watchdog sees the process gone: 503, exit).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
from typing import List, Optional

from radixlm.distributed.parallel_state import free_port
from radixlm.engine.tp_worker import follower_ranks
from radixlm.server_args import ServerArgs

logger = logging.getLogger(__name__)


def prepare_tp_args(args: ServerArgs) -> ServerArgs:
    """Checks that the model splits over tp_size ranks (a clear error naming tp_size, before any
    process starts) and fills dist_init_addr with a free local port when unset."""
    if args.tp_size == 1:
        return args
    from radixlm.models.model_config import ModelConfig

    ModelConfig.from_path(args.model_path, args.dtype, args.context_length).check_tensor_parallel(args.tp_size)
    if args.dist_init_addr is None:
        args = args.replace(dist_init_addr=f"127.0.0.1:{free_port()}")
    return args


def _set_process_name(name: str) -> None:
    """The name `ps` and /proc/PID/comm show (Linux; elsewhere nothing)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME
    except Exception:  # noqa: BLE001 - cosmetic
        pass


def run_tp_follower_process(args: ServerArgs, tp_rank: int, parent_pid: int) -> None:
    """A follower rank's process main: load this rank's shard, then run rank 0's steps until told to
    stop or until the group fails (then exit non-zero)."""
    from radixlm.managers.scheduler_process import create_model_runner, exit_with_parent

    exit_with_parent(parent_pid)
    _set_process_name(f"radixlm-tp{tp_rank}")
    logging.basicConfig(level=args.log_level.upper(), format=f"[%(asctime)s tp{tp_rank}] %(message)s")
    try:
        runner = create_model_runner(args, tp_rank)
        runner.run_follower()
    except BaseException:  # noqa: BLE001 - logged; the exit code tells the launcher
        logger.exception("tensor-parallel rank %d failed", tp_rank)
        raise SystemExit(1)
    runner.shutdown()


def start_tp_followers(args: ServerArgs, parent_pid: int) -> List[mp.Process]:
    """Starts this node's follower ranks (spawned, daemonic); `args` as prepare_tp_args returned it."""
    spawn = mp.get_context("spawn")
    procs = []
    for rank in follower_ranks(args.tp_size, args.nnodes, args.node_rank):
        p = spawn.Process(target=run_tp_follower_process, args=(args, rank, parent_pid),
                          name=f"radixlm-tp{rank}", daemon=True)
        p.start()
        procs.append(p)
    return procs


def run_follower_node(args: ServerArgs) -> int:
    """`--node-rank` > 0: runs this node's ranks (no HTTP server) until they end; their exit code."""
    import os
    import time

    logging.basicConfig(level=args.log_level.upper(), format="[%(asctime)s] %(message)s")
    args = prepare_tp_args(args)
    procs = start_tp_followers(args, os.getpid())
    logger.info("node %d of %d: tensor-parallel ranks %s joining %s", args.node_rank, args.nnodes,
                follower_ranks(args.tp_size, args.nnodes, args.node_rank), args.dist_init_addr)
    try:
        while first_dead(procs) is None:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    code = max((p.exitcode or 0) for p in procs if not p.is_alive()) if first_dead(procs) else 0
    stop_processes(procs, timeout=1.0)
    return code


def first_dead(procs: List[mp.Process]) -> Optional[str]:
    """What happened to the first of `procs` that is no longer running, or None."""
    for p in procs:
        if not p.is_alive():
            return f"{p.name} exited with code {p.exitcode}"
    return None


def stop_processes(procs: List[mp.Process], timeout: float = 10.0) -> None:
    """Joins the processes (bounded), then terminates and kills what is left."""
    for p in procs:
        p.join(timeout=timeout)
        if p.is_alive():
            p.terminate()
            p.join(timeout=5)
        if p.is_alive():
            p.kill()
            p.join(timeout=5)
