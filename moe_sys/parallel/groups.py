"""Process groups. The only module that reads DeepSpeed's group registry.

DeepSpeed names its expert groups ``ep_size_{N}``; expert parameters carry that name so the engine
reduces their gradients over the expert-data-parallel group only.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class ExpertGroups:
    name: str  # DeepSpeed's group name, also written on expert params as ``group_name``
    ep_group: dist.ProcessGroup
    ep_rank: int
    ep_size: int
    edp_group: dist.ProcessGroup  # ranks holding replicas of the same experts


def default_backend(requested: str = "auto") -> str:
    if requested != "auto":
        return requested
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_distributed(backend: str = "auto") -> None:
    """Join the job DeepSpeed-style (env:// from RANK/WORLD_SIZE/MASTER_ADDR set by any launcher)."""
    import deepspeed

    from moe_sys.ops.build import prefer_environment_tools

    if not dist.is_initialized():
        prefer_environment_tools()  # DeepSpeed JIT-builds its CPU all-reduce op here
        deepspeed.init_distributed(dist_backend=default_backend(backend), verbose=False)


def create_expert_groups(ep_size: int) -> ExpertGroups:
    """Create (or fetch) DeepSpeed's expert-parallel and expert-data-parallel groups for ep_size."""
    from deepspeed.utils import groups

    name = f"ep_size_{ep_size}"
    if name not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(ep_size)
    return ExpertGroups(
        name=name,
        ep_group=groups._get_expert_parallel_group(name),
        ep_rank=groups._get_expert_parallel_rank(name),
        ep_size=groups._get_expert_parallel_world_size(name),
        edp_group=groups._get_expert_data_parallel_group(name),
    )


def expert_parallel_rank(group_name: str) -> int:
    """This rank's index in DeepSpeed's expert-parallel group ``group_name`` (a param's ``group_name``)."""
    from deepspeed.utils import groups

    return groups._get_expert_parallel_rank(group_name)
