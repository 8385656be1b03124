"""Run a function on N real gloo ranks (separate processes) and collect what each returns."""
from __future__ import annotations

import os
import socket

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world_size, port, fn, args, results):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch

    from moe_sys.parallel.groups import init_distributed
    from moe_sys.parallel.local_launch import threads_per_rank

    torch.set_num_threads(threads_per_rank(world_size))  # as `moe-sys train` sets OMP_NUM_THREADS
    init_distributed("gloo")
    results[rank] = fn(rank, world_size, *args)


def run_ranks(fn, world_size: int, *args):
    """fn(rank, world_size, *args) on each rank; returns the list of results (must be picklable)."""
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        results = manager.dict()
        mp.start_processes(_entry, args=(world_size, free_port(), fn, args, results), nprocs=world_size,
                           start_method="spawn", join=True)
        return [results[r] for r in range(world_size)]
