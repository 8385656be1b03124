"""Apply expert parallelism to a single-device model: shard expert banks, mark expert params."""
from __future__ import annotations

import torch.nn as nn

from moe_sys.moe.layer import MoELayer
from moe_sys.parallel.groups import ExpertGroups


def shard_and_mark_experts(model: nn.Module, groups: ExpertGroups) -> None:
    """Keep this rank's experts of every MoE layer and mark them the way DeepSpeed expects."""
    for layer in model.modules():
        if isinstance(layer, MoELayer):
            shard_and_mark(layer, groups)


def shard_and_mark(layer: nn.Module, groups: ExpertGroups) -> None:
    """One expert-parallel layer (an MoE block, or a mixture of adapter experts): keep this rank's
    slice of ``layer.experts`` and mark it.

    ``allreduce=False`` + ``group_name`` make DeepSpeed reduce expert gradients over the
    expert-data-parallel group only (the other EP ranks hold different experts).
    """
    layer.shard_experts(groups.ep_group, groups.ep_rank, groups.ep_size)
    for param in layer.experts.parameters():
        param.allreduce = False
        param.group_name = groups.name


def is_expert_parallel(module: nn.Module) -> bool:
    """Layers whose ``experts`` are sharded over EP ranks: MoE blocks and mixtures of adapter experts."""
    return callable(getattr(module, "shard_experts", None))
