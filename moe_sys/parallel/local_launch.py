"""Start `moe-sys` on N local ranks through the deepspeed launcher when no launcher started us."""
from __future__ import annotations

import base64
import glob
import json
import logging
import os
import signal
import socket
import subprocess
import sys
from typing import List

log = logging.getLogger("moe_sys")

# Signals passed on to the ranks: they make them checkpoint and stop at the next step boundary.
FORWARDED = (signal.SIGTERM, signal.SIGUSR1)


def free_port() -> int:
    """A TCP port free on every interface (so also on the one other nodes connect to)."""
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def threads_per_rank(procs: int) -> int:
    """One compute thread per rank per core: ranks on a CPU-only machine then do not fight over cores."""
    return max(1, (os.cpu_count() or 1) // procs)


def launcher_command(procs: int, port: int, cli_args: List[str]) -> List[str]:
    """DeepSpeed's per-node launcher, given the one-node world the `deepspeed` runner would hand it
    (``{"localhost": [0..procs-1]}``, base64 JSON): the same ranks and environment as through the
    runner, one Python process (and DeepSpeed import, ~3.5 s on 2 cores) fewer per run."""
    world_info = base64.urlsafe_b64encode(json.dumps({"localhost": list(range(procs))}).encode()).decode()
    return [sys.executable, "-u", "-m", "deepspeed.launcher.launch", f"--world_info={world_info}",
            "--master_addr=127.0.0.1", f"--master_port={port}", "--module", "--no_local_rank", "moe_sys.cli",
            *cli_args]


def run_local(procs: int, cli_args: List[str]) -> int:
    """Run the deepspeed launcher in the foreground; its exit code becomes ours.

    SIGTERM/SIGUSR1 sent to us go to the ranks themselves: the deepspeed launcher dies of SIGUSR1,
    and answers SIGTERM by killing the ranks 30 s later, checkpoint written or not.
    """
    env = dict(os.environ)
    if not _has_gpu():
        env.setdefault("DS_ACCELERATOR", "cpu")
        env.setdefault("OMP_NUM_THREADS", str(threads_per_rank(procs)))
    port = free_port()
    log.info("no launcher detected: starting %d local ranks with the deepspeed launcher (rendezvous 127.0.0.1:%d)",
             procs, port)
    child = subprocess.Popen(launcher_command(procs, port, cli_args), env=env)

    def forward(signum, frame):
        _signal_ranks(child.pid, signum)

    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED}
    try:
        return child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        remove_shm_buffers("127.0.0.1", port)


def remove_shm_buffers(master_addr: str, port: int) -> None:
    """Delete the /dev/shm buffers DeepSpeed's CPU all-reduce op creates when all ranks share a
    machine (67 MB per rank, named after the rendezvous address): it never unlinks them, so every
    CPU run would leave its share of RAM behind."""
    for path in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{master_addr}_{port}_*"):
        try:
            os.remove(path)
        except FileNotFoundError:
            pass


def _signal_ranks(launcher_pid: int, signum: int) -> None:
    """Signal the launcher's descendants that run moe_sys.cli (the ranks, not the launchers)."""
    import psutil  # a DeepSpeed dependency

    for proc in psutil.Process(launcher_pid).children(recursive=True):
        try:
            cmdline = " ".join(proc.cmdline())
            if "moe_sys.cli" in cmdline and "deepspeed.launcher" not in cmdline:
                proc.send_signal(signum)
        except psutil.Error:  # it exited meanwhile
            pass


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()
