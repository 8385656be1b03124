"""Optimizer parameter groups: weight decay only on matrices, experts split out for DeepSpeed, and
groups with their own learning-rate multiplier (a metric loss's proxies)."""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn as nn


def build_optimizer(model: nn.Module, train_cfg, lr_mults: Optional[Dict[str, float]] = None) -> torch.optim.Optimizer:
    """AdamW whose groups DeepSpeed's MoE helper has split, so ZeRO and gradient reduction
    treat expert parameters (``allreduce=False``) over the expert-data-parallel group.

    lr_mults: parameter-name prefix -> learning-rate multiplier (``Task.lr_mults``); those parameters
    get their own group at ``train.lr * mult`` without weight decay (the schedule scales each group's
    starting rate, so the ratio holds at every step).
    """
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    decay, no_decay, scaled = [], [], {prefix: [] for prefix in lr_mults or {}}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        prefix = next((p for p in scaled if name.startswith(p)), None)
        if prefix is not None:
            scaled[prefix].append(param)
        else:
            (decay if param.dim() >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": train_cfg.weight_decay, "name": "decay"},
              {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]
    groups += [{"params": params, "weight_decay": 0.0, "lr": train_cfg.lr * lr_mults[prefix], "name": f"lr_x_{prefix}"}
               for prefix, params in scaled.items() if params]
    groups = split_params_into_different_moe_groups_for_optimizer(groups)
    return torch.optim.AdamW(groups, lr=train_cfg.lr, betas=tuple(train_cfg.betas))
