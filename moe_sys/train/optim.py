"""Optimizer parameter groups: weight decay only on matrices, experts split out for DeepSpeed."""
from __future__ import annotations

import torch
import torch.nn as nn


def build_optimizer(model: nn.Module, train_cfg) -> torch.optim.Optimizer:
    """AdamW whose groups DeepSpeed's MoE helper has split, so ZeRO and gradient reduction
    treat expert parameters (``allreduce=False``) over the expert-data-parallel group."""
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.dim() >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": train_cfg.weight_decay, "name": "decay"},
              {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]
    groups = split_params_into_different_moe_groups_for_optimizer(groups)
    return torch.optim.AdamW(groups, lr=train_cfg.lr, betas=tuple(train_cfg.betas))
