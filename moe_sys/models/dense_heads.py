"""Light task decoders on a ViT's tokens: a dense decoder per pixel task and a global head.

Legend: B batch, S tokens, N patches (g x g grid), D model dim, K decoder width, O outputs, H, W pixels.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class DenseDecoder(nn.Module):
    """Patch tokens on their grid -> ``layers`` x (3x3 conv + GELU) -> bilinear upsampling to the image
    -> 1x1 conv head (SETR-naive style: the decoder stays light, the encoder does the work)."""

    def __init__(self, d_model: int, hidden: int, layers: int, out: int, image_size: int):
        super().__init__()
        convs, width = [], d_model
        for _ in range(layers):
            convs += [nn.Conv2d(width, hidden, 3, padding=1), nn.GELU()]
            width = hidden
        self.body, self.head = nn.Sequential(*convs), nn.Conv2d(width, out, 1)
        self.image_size = image_size

    def forward(self, tokens_BSD: torch.Tensor, num_patches: int) -> torch.Tensor:
        """tokens_BSD: the encoder's normed tokens, the patches last, row-major. Returns [B, O, H, W]."""
        B, _, D = tokens_BSD.shape
        g = int(round(num_patches ** 0.5))
        grid_BDgg = tokens_BSD[:, -num_patches:].transpose(1, 2).reshape(B, D, g, g)
        h = F.interpolate(self.body(grid_BDgg), size=(self.image_size,) * 2, mode="bilinear", align_corners=False)
        return self.head(h)


class GlobalHead(nn.Module):
    """The pooled feature -> Linear -> GELU -> Linear (``layers`` = 0: one Linear)."""

    def __init__(self, d_model: int, hidden: int, layers: int, out: int):
        super().__init__()
        self.net = (nn.Sequential(nn.Linear(d_model, hidden), nn.GELU(), nn.Linear(hidden, out)) if layers
                    else nn.Linear(d_model, out))

    def forward(self, features_BD: torch.Tensor) -> torch.Tensor:
        return self.net(features_BD)
