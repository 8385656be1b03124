"""Which launcher started this process, and the rank environment it implies.

torch.distributed's env:// init reads RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT.
The deepspeed launcher and torchrun set them. ``srun`` and ``mpirun`` do not: under ``srun`` they
are derived from SLURM's step variables, under ``mpirun`` from MPI itself (through mpi4py, which
works for every MPI, where each MPI names its environment variables differently).
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Dict, Mapping, Tuple

# Variables a process started by mpiexec sees (PRRTE/PMIx, MPICH/Intel Hydra); srun sets them too
# when it runs an MPI program itself (--mpi=pmix/pmi2), which SLURM's own variables describe as well.
PMI_MARKERS = ("PMIX_RANK", "PMI_SIZE")


@dataclass(frozen=True)
class LaunchEnv:
    launcher: str  # "deepspeed" | "torchrun" | "env" | "mpi" | "slurm" | "none"
    rank: int
    local_rank: int
    world_size: int


def detect(env: Mapping[str, str] = os.environ) -> LaunchEnv:
    """The launcher that started us. Order matters: torchrun and deepspeed set RANK themselves, and
    an mpirun inside a SLURM job also sees the SLURM step of its daemons."""
    if "TORCHELASTIC_RUN_ID" in env:
        return _from_torch_env(env, "torchrun")
    if "RANK" in env and "WORLD_SIZE" in env:
        # The deepspeed launcher also exports CROSS_RANK; anything else that set RANK is plain env://.
        return _from_torch_env(env, "deepspeed" if "CROSS_RANK" in env else "env")
    if "OMPI_COMM_WORLD_SIZE" in env:  # Open MPI's mpirun, inside a SLURM job or not
        return _from_mpi()
    if _srun_task(env):
        return LaunchEnv("slurm", int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", 0)),
                         int(env["SLURM_STEP_NUM_TASKS"]))
    if any(marker in env for marker in PMI_MARKERS):
        return _from_mpi()
    return LaunchEnv("none", 0, 0, 1)


def _srun_task(env: Mapping[str, str]) -> bool:
    """A task srun started. SLURM_STEP_NUM_TASKS exists only inside a step, so the batch script itself
    (SLURM_PROCID=0, SLURM_NTASKS=N too) is not rank 0 of N. An mpiexec inside a job runs its ranks in
    its daemons' step (one task per node): their MPI world (PMI_SIZE) is larger than that step."""
    if "SLURM_STEP_NUM_TASKS" not in env or "SLURM_PROCID" not in env:
        return False
    return env.get("PMI_SIZE", env["SLURM_STEP_NUM_TASKS"]) == env["SLURM_STEP_NUM_TASKS"]


def _from_torch_env(env: Mapping[str, str], launcher: str) -> LaunchEnv:
    return LaunchEnv(launcher, int(env["RANK"]), int(env.get("LOCAL_RANK", 0)), int(env["WORLD_SIZE"]))


def _from_mpi() -> LaunchEnv:
    """Rank and size from MPI_COMM_WORLD; the local rank is the rank among processes sharing memory."""
    from mpi4py import MPI

    world = MPI.COMM_WORLD
    node = world.Split_type(MPI.COMM_TYPE_SHARED)
    launch = LaunchEnv("mpi", world.Get_rank(), node.Get_rank(), world.Get_size())
    node.Free()
    return launch


def torch_env(launch: LaunchEnv, env: Mapping[str, str] = os.environ) -> Dict[str, str]:
    """Variables env:// needs that the launcher did not set (SLURM: master = first node of the job;
    MPI: rank 0's host and a port it found free, broadcast to every rank)."""
    out = {"RANK": str(launch.rank), "LOCAL_RANK": str(launch.local_rank), "WORLD_SIZE": str(launch.world_size)}
    if launch.launcher == "slurm":
        out["MASTER_ADDR"] = _first_host(env.get("SLURM_JOB_NODELIST", "localhost"))
        out["MASTER_PORT"] = str(slurm_port(int(env.get("SLURM_JOB_ID", 0))))
    elif launch.launcher == "mpi" and not ("MASTER_ADDR" in env and "MASTER_PORT" in env):
        out["MASTER_ADDR"], out["MASTER_PORT"] = _mpi_rendezvous()
    return {k: v for k, v in out.items() if k not in env}


def _mpi_rendezvous() -> Tuple[str, str]:
    """Rank 0's host name (not its address: Debian maps its own name to 127.0.1.1, which other
    nodes cannot reach, while they resolve the name through DNS) and a port free there."""
    from mpi4py import MPI

    from moe_sys.parallel.local_launch import free_port

    world = MPI.COMM_WORLD
    here = (socket.gethostname(), str(free_port())) if world.Get_rank() == 0 else None
    return world.bcast(here, root=0)


def slurm_port(job_id: int) -> int:
    """The job's rendezvous port, as launch/slurm/*.sbatch compute it: jobs sharing a node get
    different ports unless their ids differ by a multiple of 20000; below Linux's ephemeral range."""
    return 10000 + job_id % 20000


def _first_host(nodelist: str) -> str:
    """First hostname of a SLURM nodelist such as ``node[01-04,07],gpu5`` -> ``node01``."""
    head = nodelist.split(",")[0]
    if "[" not in head:
        return head
    prefix, rest = head.split("[", 1)
    return prefix + rest.split("-")[0].split(",")[0].rstrip("]")
