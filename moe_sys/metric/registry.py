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
from moe_sys.metric.config import LossSpec
from moe_sys.metric.distributed import gather_batch


class PairLoss(nn.Module):
    """A pure pair-based loss with its hyper-parameters bound."""

    def __init__(self, fn: Callable[..., torch.Tensor], **params):
        super().__init__()
        self.fn = functools.partial(fn, **params)

    def forward(self, emb_BD: torch.Tensor, labels_B: torch.Tensor) -> torch.Tensor:
        return self.fn(emb_BD, labels_B)


def _pair(fn):
    return lambda params, num_classes, embedding_size: PairLoss(fn, **params)


def _classes(cls):
    return lambda params, num_classes, embedding_size: cls(num_classes, embedding_size, **params)


LOSSES: Dict[str, Callable[[dict, int, int], nn.Module]] = {
    "contrastive": _pair(losses.contrastive_loss),
    "triplet": _pair(losses.triplet_loss),
    "npair": _pair(losses.npair_loss),
    "ntxent": _pair(losses.ntxent_loss),
    "infonce": _pair(losses.ntxent_loss),
    "supcon": _pair(losses.supcon_loss),
    "multi_similarity": _pair(losses.multi_similarity_loss),
    "proxy_anchor": _classes(proxy_losses.ProxyAnchorLoss),
    "arcface": _classes(proxy_losses.ArcFaceLoss),
    "cosface": _classes(proxy_losses.CosFaceLoss),
    "curricularface": _classes(proxy_losses.CurricularFaceLoss),
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
        if self.gather:
            emb_BD, labels_B = gather_batch(emb_BD, labels_B, self.group)
        return self.loss(emb_BD, labels_B)


def build_loss(spec: LossSpec, num_classes: int, embedding_size: int,
               group: Optional[dist.ProcessGroup] = None) -> MetricLoss:
    """The loss of ``spec``; ``group`` is the data-parallel group to gather over (None: the default
    group when torch.distributed is initialised, else no gathering)."""
    params = spec.resolved().model_dump()
    return MetricLoss(LOSSES[spec.name](params, num_classes, embedding_size), spec.gather, group)
