"""The learned router projection x -> logits, in fp32, with its training-time noise.

Legend: N rows (tokens or examples), D model dim, E experts.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class Noise:
    """Exploration noise, applied only in training (``moe.router`` keys of the same name).

    jitter_eps: inputs multiplied by U[1-eps, 1+eps] (Switch Transformer; DeepSpeed 'Jitter',
        Megatron moe_input_jitter_eps).
    noisy_gating: Shazeer et al. 2017: logits + N(0,1) * softplus(x W_noise), W_noise learned.
    sample_second: slots 2..K drawn by Gumbel-max instead of taken greedily (DeepSpeed top-2).
    """

    jitter_eps: float = 0.0
    noisy_gating: bool = False
    sample_second: bool = False


class Gate(nn.Module):
    """logits_NE = x_ND @ weight_ED^T in fp32: softmax over E in half precision flips near-tied
    choices between ranks and runs."""

    def __init__(self, d_model: int, num_experts: int, init_std: float = 0.02, noise: Noise = Noise()):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_experts, d_model) * init_std)
        # Zero init: the learned noise scale starts at softplus(0) = 0.69 for every expert.
        self.noise_weight = nn.Parameter(torch.zeros(num_experts, d_model)) if noise.noisy_gating else None
        self.jitter_eps = noise.jitter_eps

    def forward(self, x_ND: torch.Tensor) -> torch.Tensor:
        x_ND = x_ND.float()
        if self.training and self.jitter_eps > 0:
            x_ND = x_ND * torch.empty_like(x_ND).uniform_(1.0 - self.jitter_eps, 1.0 + self.jitter_eps)
        logits_NE = x_ND @ self.weight.float().t()
        if self.training and self.noise_weight is not None:
            logits_NE = logits_NE + torch.randn_like(logits_NE) * F.softplus(x_ND @ self.noise_weight.float().t())
        return logits_NE
