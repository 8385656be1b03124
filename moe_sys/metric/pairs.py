"""Pairwise distances and label masks shared by the miners and the pair-based losses.

Shape legend: B embeddings in the batch, D embedding width.

Distances follow pytorch-metric-learning's defaults: embeddings are L2-normalised first, then
``euclidean`` is ||a - b||_2 (LpDistance) and ``cosine`` is <a, b> (CosineSimilarity).
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F


def euclidean_BB(emb_BD: torch.Tensor) -> torch.Tensor:
    """d_ij = || a_i/|a_i| - a_j/|a_j| ||_2."""
    x_BD = F.normalize(emb_BD, dim=1)
    return torch.cdist(x_BD, x_BD, p=2)


def cosine_BB(emb_BD: torch.Tensor) -> torch.Tensor:
    """s_ij = cos(a_i, a_j)."""
    x_BD = F.normalize(emb_BD, dim=1)
    return x_BD @ x_BD.T


def label_masks(labels_B: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(pos_BB, neg_BB) bool: same label and i != j; different label."""
    same_BB = labels_B[:, None] == labels_B[None, :]
    eye_BB = torch.eye(len(labels_B), dtype=torch.bool, device=labels_B.device)
    return same_BB & ~eye_BB, ~same_BB


def all_triplets(labels_B: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every (a, p, n) with label(a) == label(p), a != p, label(n) != label(a)."""
    pos_BB, neg_BB = label_masks(labels_B)
    a, p, n = torch.nonzero(pos_BB[:, :, None] & neg_BB[:, None, :], as_tuple=True)
    return a, p, n


def masked_logsumexp(x_BB: torch.Tensor, mask_BB: torch.Tensor, dim: int, add_one: bool) -> torch.Tensor:
    """log(sum_{mask} exp(x)) (+ exp(0) inside when add_one); rows with an empty mask give 0 when add_one.

    Stable: the row maximum (over kept entries and the added 0) is taken out first.
    """
    x_BB = x_BB.masked_fill(~mask_BB, float("-inf"))
    if add_one:
        zeros = torch.zeros_like(x_BB.select(dim, 0)).unsqueeze(dim)
        x_BB = torch.cat([x_BB, zeros], dim=dim)
    return torch.logsumexp(x_BB, dim=dim)
