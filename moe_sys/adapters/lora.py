"""LoRA: y = W x + scale * B A dropout(x), with B zero-initialised so training starts at the base model.

Legend: N slots (or experts), B examples, S sequence, I input features, R rank, O output features.
"""
from __future__ import annotations

import math
from typing import Dict, List

import torch
import torch.nn as nn

from moe_sys.adapters.base import PerExample, SlotAdapter, mix, register_adapter


def lora_scale(alpha: float, rank: int, rslora: bool) -> float:
    """alpha / r (Hu et al.); rsLoRA's alpha / sqrt(r) keeps the update size stable as r grows."""
    return alpha / math.sqrt(rank) if rslora else alpha / rank


class LoRABank(nn.Module):
    """N low-rank deltas of one [O, I] weight: delta_n(x) = scale * (x @ A_n) @ B_n.

    Stored input-major ([N, I, R], [N, R, O]) like the expert banks, so the same tensors run per
    example (bmm) and per expert over sorted rows (grouped_mm).
    """

    def __init__(self, num: int, d_in: int, d_out: int, rank: int, scale: float):
        super().__init__()
        # nn.Linear's default init (kaiming-uniform, a=sqrt(5)) for A, as PEFT does; B = 0.
        self.A_NIR = nn.Parameter(torch.empty(num, d_in, rank).uniform_(-d_in ** -0.5, d_in ** -0.5))
        self.B_NRO = nn.Parameter(torch.zeros(num, rank, d_out))
        self.scale = scale

    def params(self) -> Dict[str, torch.Tensor]:
        return {"A": self.A_NIR, "B": self.B_NRO}

    def delta(self, x, p: Dict[str, torch.Tensor], layout) -> torch.Tensor:
        """scale * x A B, with p from ``params`` (per expert) or ``mix`` (per example)."""
        return layout.linear(layout.linear(x, p["A"]), p["B"]) * self.scale

    def delta_weight(self, n: int) -> torch.Tensor:
        """Slot n as a dense [O, I] change of the base weight."""
        return (self.A_NIR[n] @ self.B_NRO[n]).t() * self.scale


class LoRALinear(SlotAdapter):
    """LoRA around an nn.Linear; x is [B, S, I]."""

    mergeable = True

    def __init__(self, base_layer: nn.Linear, name: str, slots: List[str], rank: int = 8, alpha: float = 16.0,
                 dropout: float = 0.0, rslora: bool = False):
        super().__init__(base_layer, name, slots)
        self.bank = LoRABank(len(slots), base_layer.in_features, base_layer.out_features, rank,
                             lora_scale(alpha, rank, rslora))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x_BSI: torch.Tensor) -> torch.Tensor:
        y_BSO = self.base_layer(x_BSI)
        w_BN = self.slot_weights(x_BSI.shape[0], x_BSI.device)
        if w_BN is None:
            return y_BSO
        return y_BSO + self.bank.delta(self.dropout(x_BSI), mix(self.bank.params(), w_BN), PerExample)

    def _fold(self, slot: int, inverse: bool) -> None:
        weight = self.base_layer.weight
        delta = self.bank.delta_weight(slot).to(weight.dtype)
        weight.sub_(delta) if inverse else weight.add_(delta)


@register_adapter("lora", wraps=nn.Linear)
def build(base_layer: nn.Linear, spec, site) -> LoRALinear:
    return LoRALinear(base_layer, spec.name, spec.slot_names(), spec.rank, spec.alpha, spec.dropout, spec.rslora)
