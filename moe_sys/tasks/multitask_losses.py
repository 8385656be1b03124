"""Per-task losses of the dense multitask task and the weighting that sums them (pure functions; the
formula in each docstring).

Legend: B samples, C classes, H, W pixels, T tasks.
"""
from __future__ import annotations

from typing import Callable, Dict

import torch
import torch.nn.functional as F

BERHU_FRACTION = 0.2  # Laina et al. 2016: c = 0.2 max |error| of the batch


def cross_entropy(logits_BC: torch.Tensor, target_B: torch.Tensor) -> torch.Tensor:
    """mean over samples (and pixels, for logits [B, C, H, W] and targets [B, H, W]) of -log softmax[target]."""
    return F.cross_entropy(logits_BC, target_B)


def l1(pred_B1HW: torch.Tensor, target_BHW: torch.Tensor) -> torch.Tensor:
    """mean |pred - target| over samples and pixels."""
    return (pred_B1HW[:, 0] - target_BHW).abs().mean()


def berhu(pred_B1HW: torch.Tensor, target_BHW: torch.Tensor) -> torch.Tensor:
    """Reverse Huber (Laina et al., 2016): |x| where |x| <= c, (x^2 + c^2) / (2c) beyond; x = pred - target,
    c = 0.2 max |x| over the batch (no gradient through c); mean over samples and pixels."""
    x = pred_B1HW[:, 0] - target_BHW
    c = (BERHU_FRACTION * x.detach().abs().max()).clamp(min=1e-12)
    return torch.where(x.abs() <= c, x.abs(), (x * x + c * c) / (2 * c)).mean()


def cosine(pred_B3HW: torch.Tensor, target_B3HW: torch.Tensor) -> torch.Tensor:
    """mean over samples and pixels of 1 - cos(pred, target); pred is normalised here, targets are unit."""
    return (1 - F.cosine_similarity(pred_B3HW, target_B3HW, dim=1, eps=1e-8)).mean()


LOSSES: Dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "ce": cross_entropy, "l1": l1, "berhu": berhu, "cosine": cosine}


def uncertainty_weighted(losses_T: torch.Tensor, log_var_T: torch.Tensor) -> torch.Tensor:
    """Kendall, Gal & Cipolla (CVPR 2018), with s_t = log sigma_t^2 learned per task:
    terms_t = exp(-s_t) / 2 * L_t + s_t / 2 (their regression form, used for every task as LibMTL's UW
    does); returns the terms [T] (their sum is the loss)."""
    return 0.5 * torch.exp(-log_var_T) * losses_T + 0.5 * log_var_T
