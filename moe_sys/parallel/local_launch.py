"""Start `moe-sys` on N local ranks through the deepspeed launcher when no launcher started us."""
from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
from typing import List

log = logging.getLogger("moe_sys")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher_command(procs: int, cli_args: List[str]) -> List[str]:
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(procs),
            "--master_port", str(free_port()), "--no_local_rank", "--module", "moe_sys.cli", *cli_args]


def run_local(procs: int, cli_args: List[str]) -> int:
    """Run the deepspeed launcher in the foreground; its exit code becomes ours."""
    env = dict(os.environ)
    if not _has_gpu():
        env.setdefault("DS_ACCELERATOR", "cpu")
        # One compute thread per rank per core keeps ranks from fighting over the same cores.
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // procs)))
    cmd = launcher_command(procs, cli_args)
    log.info("no launcher detected: starting %d local ranks with the deepspeed launcher", procs)
    return subprocess.call(cmd, env=env)


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()
