"""Apply expert parallelism to a single-device model: shard expert banks, mark expert params."""
from __future__ import annotations

import torch.nn as nn

from moe_sys.moe.layer import MoELayer
from moe_sys.parallel.groups import ExpertGroups


def shard_and_mark_experts(model: nn.Module, groups: ExpertGroups) -> None:
    """Keep this rank's experts and mark them the way DeepSpeed expects.

    ``allreduce=False`` + ``group_name`` make DeepSpeed reduce expert gradients over the
    expert-data-parallel group only (the other EP ranks hold different experts).
    """
    for layer in model.modules():
        if isinstance(layer, MoELayer):
            layer.shard_experts(groups.ep_group, groups.ep_rank, groups.ep_size)
            for param in layer.experts.parameters():
                param.allreduce = False
                param.group_name = groups.name
