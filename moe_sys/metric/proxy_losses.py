"""Losses with learnable class vectors (proxies / classifier weights): pure functions plus the small
modules that hold their state.

Shape legend: B embeddings, D embedding width, C classes.
Notation: x_i = a_i/|a_i|, w_c = W_c/|W_c|, cos_ic = <x_i, w_c>, theta_ic = arccos(cos_ic).
Definitions and defaults are pytorch-metric-learning 2.9's, CurricularFace is PUMA's (pml has none);
``docs/metric.md`` says where ours differ. Learnable vectors are ``nn.Parameter``s [C, D]; running
statistics are buffers, so both travel in checkpoints.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from moe_sys.metric.pairs import masked_logsumexp

_EDGE = 1e-7  # arccos has an infinite slope at +-1: keep cosines strictly inside


def _cosine_BC(emb_BD: torch.Tensor, weight_CD: torch.Tensor) -> torch.Tensor:
    """cos_ic in the embeddings' precision (an engine may hold the class vectors in bf16)."""
    return F.normalize(emb_BD, dim=1) @ F.normalize(weight_CD.to(emb_BD.dtype), dim=1).T


def proxy_anchor_loss(emb_BD: torch.Tensor, labels_B: torch.Tensor, proxies_CD: torch.Tensor,
                      margin: float = 0.1, alpha: float = 32.0) -> torch.Tensor:
    """Proxy-Anchor (Kim et al. 2020), with P+ the classes present in the batch, X_c+ their images:

    L = 1/|P+| sum_{c in P+} log(1 + sum_{i in X_c+} e^{-alpha (cos_ic - margin)})
      + 1/C    sum_{c}       log(1 + sum_{i not in X_c+} e^{alpha (cos_ic + margin)}).
    """
    cos_BC = _cosine_BC(emb_BD, proxies_CD)
    pos_BC = F.one_hot(labels_B, proxies_CD.shape[0]).bool()
    present = pos_BC.any(0).sum().clamp_min(1)
    pos_C = masked_logsumexp(-alpha * (cos_BC - margin), pos_BC, dim=0, add_one=True)
    neg_C = masked_logsumexp(alpha * (cos_BC + margin), ~pos_BC, dim=0, add_one=True)
    return pos_C.sum() / present + neg_C.sum() / proxies_CD.shape[0]


def additive_angular_target(cos_B: torch.Tensor, margin: float) -> torch.Tensor:
    """ArcFace's target logit cos(theta + m), kept decreasing past theta = pi - m by the fall-back
    cos(theta) - m sin(m) (pml 2.9 and InsightFace)."""
    theta_B = torch.acos(cos_B.clamp(-1 + _EDGE, 1 - _EDGE))
    return torch.where(theta_B <= math.pi - margin, torch.cos(theta_B + margin), cos_B - margin * math.sin(margin))


def arcface_loss(emb_BD: torch.Tensor, labels_B: torch.Tensor, weight_CD: torch.Tensor, margin: float = 28.6,
                 scale: float = 64.0) -> torch.Tensor:
    """ArcFace (Deng et al. 2019): L = mean_i CE(scale * z_i, y_i) with z_ic = cos_ic for c != y_i and
    z_iy = cos(theta_iy + m) (see ``additive_angular_target``); ``margin`` in degrees as pml."""
    cos_BC = _cosine_BC(emb_BD, weight_CD)
    target_B = additive_angular_target(cos_BC.gather(1, labels_B[:, None])[:, 0], math.radians(margin))
    logits_BC = cos_BC.scatter(1, labels_B[:, None], target_B[:, None])
    return F.cross_entropy(scale * logits_BC, labels_B)


def cosface_loss(emb_BD: torch.Tensor, labels_B: torch.Tensor, weight_CD: torch.Tensor, margin: float = 0.35,
                 scale: float = 64.0) -> torch.Tensor:
    """CosFace (Wang et al. 2018): L = mean_i CE(scale * z_i, y_i), z_ic = cos_ic - m [c = y_i]."""
    cos_BC = _cosine_BC(emb_BD, weight_CD)
    logits_BC = cos_BC - margin * F.one_hot(labels_B, weight_CD.shape[0]).to(cos_BC.dtype)
    return F.cross_entropy(scale * logits_BC, labels_B)


def curricularface_loss(emb_BD: torch.Tensor, labels_B: torch.Tensor, weight_CD: torch.Tensor, t_C: torch.Tensor,
                        margin: float = 0.3, scale: float = 32.0) -> torch.Tensor:
    """CurricularFace (Huang et al. 2020) as PUMA has it: with phi_i = cos(theta_iy + m) (the ArcFace
    target), negatives harder than the target are re-weighted by the class's running t_y,

    z_iy = phi_i,  z_ic = cos_ic if cos_ic <= phi_i else cos_ic (t_{y_i} + cos_ic),
    L = mean_i CE(scale * z_i, y_i).   ``margin`` in radians (PUMA: 0.3, scale 32).
    """
    cos_BC = _cosine_BC(emb_BD, weight_CD)
    phi_B = additive_angular_target(cos_BC.gather(1, labels_B[:, None])[:, 0], margin)
    hard_BC = cos_BC > phi_B[:, None]
    neg_BC = torch.where(hard_BC, cos_BC * (t_C[labels_B][:, None] + cos_BC), cos_BC)
    logits_BC = neg_BC.scatter(1, labels_B[:, None], phi_B[:, None])
    return F.cross_entropy(scale * logits_BC, labels_B)


def class_mean_cosine(emb_BD: torch.Tensor, labels_B: torch.Tensor, weight_CD: torch.Tensor):
    """(mean_C, present_C): each class's mean cos(x_i, w_c) over its images in the batch, and which
    classes had any (no gradient: this feeds CurricularFace's running t)."""
    with torch.no_grad():
        cos_B = _cosine_BC(emb_BD, weight_CD).gather(1, labels_B[:, None])[:, 0]
        C = weight_CD.shape[0]
        total_C = torch.zeros(C, dtype=cos_B.dtype, device=cos_B.device).index_add_(0, labels_B, cos_B)
        count_C = torch.zeros_like(total_C).index_add_(0, labels_B, torch.ones_like(cos_B))
        return total_C / count_C.clamp_min(1), count_C > 0


class ProxyAnchorLoss(nn.Module):
    """``proxy_anchor_loss`` with its proxies [C, D] (pml init: Kaiming normal, fan_out)."""

    def __init__(self, num_classes: int, embedding_size: int, margin: float = 0.1, alpha: float = 32.0):
        super().__init__()
        self.margin, self.alpha = margin, alpha
        self.proxies = nn.Parameter(torch.empty(num_classes, embedding_size))
        nn.init.kaiming_normal_(self.proxies, mode="fan_out")

    def forward(self, emb_BD: torch.Tensor, labels_B: torch.Tensor) -> torch.Tensor:
        return proxy_anchor_loss(emb_BD, labels_B, self.proxies, self.margin, self.alpha)


class _ClassWeightLoss(nn.Module):
    """Softmax-with-margin losses: class weights W [C, D] (pml init: standard normal)."""

    def __init__(self, num_classes: int, embedding_size: int, margin: float, scale: float):
        super().__init__()
        self.margin, self.scale = margin, scale
        self.weight = nn.Parameter(torch.randn(num_classes, embedding_size))


class ArcFaceLoss(_ClassWeightLoss):
    def __init__(self, num_classes: int, embedding_size: int, margin: float = 28.6, scale: float = 64.0):
        super().__init__(num_classes, embedding_size, margin, scale)

    def forward(self, emb_BD: torch.Tensor, labels_B: torch.Tensor) -> torch.Tensor:
        return arcface_loss(emb_BD, labels_B, self.weight, self.margin, self.scale)


class CosFaceLoss(_ClassWeightLoss):
    def __init__(self, num_classes: int, embedding_size: int, margin: float = 0.35, scale: float = 64.0):
        super().__init__(num_classes, embedding_size, margin, scale)

    def forward(self, emb_BD: torch.Tensor, labels_B: torch.Tensor) -> torch.Tensor:
        return cosface_loss(emb_BD, labels_B, self.weight, self.margin, self.scale)


class CurricularFaceLoss(_ClassWeightLoss):
    """``curricularface_loss`` with PUMA's state: weights [C, D] (Kaiming uniform, fan_out) and a
    per-class running t_C (buffer, starts at 0). In training, after each loss,
    t_c <- momentum * t_c + (1 - momentum) * mean cos(x_i, w_c) over the batch's images of class c."""

    def __init__(self, num_classes: int, embedding_size: int, margin: float = 0.3, scale: float = 32.0,
                 momentum: float = 0.99):
        super().__init__(num_classes, embedding_size, margin, scale)
        nn.init.kaiming_uniform_(self.weight, mode="fan_out")
        self.momentum = momentum
        self.register_buffer("t", torch.zeros(num_classes))

    def forward(self, emb_BD: torch.Tensor, labels_B: torch.Tensor) -> torch.Tensor:
        loss = curricularface_loss(emb_BD, labels_B, self.weight, self.t, self.margin, self.scale)
        if self.training:
            mean_C, present_C = class_mean_cosine(emb_BD, labels_B, self.weight)
            updated_C = self.momentum * self.t + (1 - self.momentum) * mean_C.to(self.t.dtype)
            self.t.copy_(torch.where(present_C, updated_C, self.t))
        return loss
