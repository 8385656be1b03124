"""Stop requests from the scheduler, acted on only at step boundaries.

SLURM sends SIGUSR1 ahead of the time limit (``#SBATCH --signal=USR1@120``) and SIGTERM when a job
is cancelled or preempted. A handler that checkpointed on the spot could run in the middle of a
collective or an optimizer step, so ours only remembers the signal. After each step the ranks vote
with an all-reduce: a signal may reach only some of them (``kill PID``, one node's slurmd), and all
must take the same branch, since writing a checkpoint is itself collective.

SIGUSR1 means "time is running out": checkpoint, and under SLURM put the job back in the queue.
SIGTERM means "stop": checkpoint and exit (SLURM requeues preempted jobs itself where configured).
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
from typing import Mapping, Optional

import torch
import torch.distributed as dist

log = logging.getLogger("moe_sys")

# When ranks saw different signals the higher wins: a SIGTERM anywhere means nobody requeues.
_PRIORITY = {signal.SIGUSR1: 1, signal.SIGTERM: 2}


class StopSignals:
    """Remembers SIGTERM/SIGUSR1 from construction until ``restore()``."""

    def __init__(self) -> None:
        self.received = 0
        self._previous = {sig: signal.signal(sig, self._remember) for sig in _PRIORITY}

    def _remember(self, signum: int, frame) -> None:
        self.received = max(self.received, _PRIORITY[signal.Signals(signum)])

    def agreed(self, device: torch.device) -> Optional[signal.Signals]:
        """The signal every rank acts on now (collective: call it on all ranks at the same step)."""
        flag = torch.tensor([self.received], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return next((sig for sig, level in _PRIORITY.items() if level == int(flag.item())), None)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def after_stop(sig: signal.Signals, step: int, more_steps: bool, env: Mapping[str, str] = os.environ) -> None:
    """Rank 0, once the checkpoint of ``step`` is complete: say why we stop, requeue if asked to."""
    log.info("%s at step %d: checkpoint written, stopping", sig.name, step)
    job = env.get("SLURM_JOB_ID")
    if sig != signal.SIGUSR1 or not job or not more_steps:
        return
    # The requeued job starts the batch script again with SLURM_RESTART_COUNT > 0, which makes
    # launch/slurm/train.sbatch pass --resume. SLURM cancels this run of the job right away.
    proc = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    if proc.returncode == 0:
        log.info("requeued SLURM job %s; it resumes from step %d", job, step)
    else:
        log.warning("could not requeue SLURM job %s (%s); resume it with --resume", job, proc.stderr.strip())
