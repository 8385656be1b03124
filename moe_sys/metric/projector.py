"""The projector head: encoder feature [B, F] -> L2-normalised embedding [B, D].

PUMA uses one linear layer (feature 384 -> 128); SimCLR an MLP with a ReLU. Retrieval and every
cosine-based loss then compare unit vectors.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


class Projector(nn.Module):
    """``kind`` linear: x W^T + b; mlp: Linear -> ReLU -> Linear (hidden width ``hidden`` or F)."""

    def __init__(self, in_dim: int, dim: int = 128, kind: str = "linear", hidden: Optional[int] = None):
        super().__init__()
        if kind == "linear":
            self.net = nn.Linear(in_dim, dim)
        elif kind == "mlp":
            width = hidden or in_dim
            self.net = nn.Sequential(nn.Linear(in_dim, width), nn.ReLU(), nn.Linear(width, dim))
        else:
            raise ValueError(f"projector kind {kind!r}: expected 'linear' or 'mlp'")

    def forward(self, feat_BF: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net(feat_BF), dim=-1)
