"""Which launcher started this process, and the rank environment it implies.

torch.distributed's env:// init reads RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT.
The deepspeed launcher and torchrun set them; under ``srun`` they are derived from SLURM's variables.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, Mapping


@dataclass(frozen=True)
class LaunchEnv:
    launcher: str  # "deepspeed" | "torchrun" | "slurm" | "none"
    rank: int
    local_rank: int
    world_size: int


def detect(env: Mapping[str, str] = os.environ) -> LaunchEnv:
    if "TORCHELASTIC_RUN_ID" in env:
        return _from_torch_env(env, "torchrun")
    if "RANK" in env and "WORLD_SIZE" in env:
        return _from_torch_env(env, "deepspeed")
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        return LaunchEnv("slurm", int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", 0)), int(env["SLURM_NTASKS"]))
    return LaunchEnv("none", 0, 0, 1)


def _from_torch_env(env: Mapping[str, str], launcher: str) -> LaunchEnv:
    return LaunchEnv(launcher, int(env["RANK"]), int(env.get("LOCAL_RANK", 0)), int(env["WORLD_SIZE"]))


def torch_env(launch: LaunchEnv, env: Mapping[str, str] = os.environ) -> Dict[str, str]:
    """Variables env:// needs that the launcher did not set (SLURM: master = first node of the job)."""
    out = {"RANK": str(launch.rank), "LOCAL_RANK": str(launch.local_rank), "WORLD_SIZE": str(launch.world_size)}
    if launch.launcher == "slurm":
        out.setdefault("MASTER_ADDR", env.get("MASTER_ADDR", _first_host(env.get("SLURM_JOB_NODELIST", "localhost"))))
        out.setdefault("MASTER_PORT", env.get("MASTER_PORT", str(29500 + int(env.get("SLURM_JOB_ID", 0)) % 1000)))
    return {k: v for k, v in out.items() if k not in env}


def _first_host(nodelist: str) -> str:
    """First hostname of a SLURM nodelist such as ``node[01-04,07],gpu5`` -> ``node01``."""
    head = nodelist.split(",")[0]
    if "[" not in head:
        return head
    prefix, rest = head.split("[", 1)
    return prefix + rest.split("-")[0].split(",")[0].rstrip("]")
