"""Losses by name: ``build_loss(LossSpec, ...)`` -> a module ``loss(emb_BD, labels_B) -> scalar``.

Shape legend: B embeddings on this rank, D embedding width, C training classes.
Every loss, stateless or not, is an ``nn.Module`` here so the task can treat them alike (put the
module's parameters in the optimizer, its state in the checkpoint).
"""
from __future__ import annotations

import functools
from typing import Callable, Dict, Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from moe_sys.metric import losses, proxy_losses
from moe_sys.config.metric import LossSpec
from moe_sys.metric.distributed import gather_batch


class PairLoss(nn.Module):
    """A pure pair-based loss with its hyper-parameters bound."""

    def __init__(self, fn: Callable[..., torch.Tensor], **params):
        super().__init__()
        self.fn = functools.partial(fn, **params)

    def forward(self, emb_BD: torch.Tensor, labels_B: torch.Tensor) -> torch.Tensor:
        return self.fn(emb_BD, labels_B)


# name -> a pure loss function (hyper-parameters as keywords) or a module class
# (num_classes, embedding_size, **hyper-parameters); config.LOSS_PARAMS holds the same names.
LOSSES: Dict[str, Callable] = {
    "contrastive": losses.contrastive_loss,
    "triplet": losses.triplet_loss,
    "npair": losses.npair_loss,
    "ntxent": losses.ntxent_loss,
    "infonce": losses.ntxent_loss,
    "supcon": losses.supcon_loss,
    "multi_similarity": losses.multi_similarity_loss,
    "proxy_anchor": proxy_losses.ProxyAnchorLoss,
    "arcface": proxy_losses.ArcFaceLoss,
    "cosface": proxy_losses.CosFaceLoss,
    "curricularface": proxy_losses.CurricularFaceLoss,
}


class MetricLoss(nn.Module):
    """The configured loss, computed on the global batch when ``gather`` (see metric/distributed.py
    for why the loss is not rescaled: after the engine's gradient averaging, gradients equal those of
    one rank holding the concatenated batch)."""

    def __init__(self, loss: nn.Module, gather: bool = True, group: Optional[dist.ProcessGroup] = None):
        super().__init__()
        self.loss = loss
        self.gather = gather
        self.group = group

    def forward(self, emb_BD: torch.Tensor, labels_B: torch.Tensor) -> torch.Tensor:
        # at least fp32: the losses exponentiate similarities scaled by up to 1/0.07 or 64
        emb_BD = emb_BD.to(torch.promote_types(emb_BD.dtype, torch.float32))
        if self.gather:
            emb_BD, labels_B = gather_batch(emb_BD, labels_B, self.group)
        return self.loss(emb_BD, labels_B)


def build_loss(spec: LossSpec, num_classes: int, embedding_size: int,
               group: Optional[dist.ProcessGroup] = None) -> MetricLoss:
    """The loss of ``spec``; ``group`` is the data-parallel group to gather over (None: the default
    group when torch.distributed is initialised, else no gathering)."""
    params = spec.resolved().model_dump()
    target = LOSSES[spec.name]
    inner = target(num_classes, embedding_size, **params) if isinstance(target, type) else PairLoss(target, **params)
    return MetricLoss(inner, spec.gather, group)
