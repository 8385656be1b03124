"""Small collectives the loop and the tasks share: sums/means over every (data-parallel) rank."""
from __future__ import annotations

from typing import Dict

import torch
import torch.distributed as dist


def to_device(batch: Dict[str, torch.Tensor], device) -> Dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def global_sum(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().clone()
    dist.all_reduce(t)
    return t


def global_mean(t: torch.Tensor) -> torch.Tensor:
    return global_sum(t) / dist.get_world_size()
