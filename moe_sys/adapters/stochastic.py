"""Stochastic adapters (PUMA, Kim et al. CVPR 2024): a parallel bottleneck adapter beside each whole
transformer block, ``out = block(x) + gamma * adapter(x)``.

gamma ~ Bernoulli(1 - p_drop) per example in training, 1 at eval. Switching an example's adapter off
returns that block to the pre-trained function exactly, so no dataset can make the model depend on
its adapter: the frozen path must keep working without it (seed 000).

Rescaling (``rescale``, default on): kept adapters are multiplied by 1/(1 - p_drop) in training, as
inverted dropout and timm's DropPath do. Then the training-time expectation of the branch, E[gamma] a,
equals its eval value a; without it the eval output carries the adapter at 1/(1 - p_drop) times its
average training strength (2x at PUMA's p = 0.5), a shift the frozen layers after it never saw.
"""
from __future__ import annotations

from typing import List, Union

import torch

from moe_sys.adapters.base import register_adapter
from moe_sys.adapters.bottleneck import BottleneckAdapter
from moe_sys.models.transformer import Block


class StochasticAdapter(BottleneckAdapter):
    """A parallel BottleneckAdapter around a Block whose branch is dropped per example in training."""

    def __init__(self, base_layer: Block, name: str, slots: List[str], d_model: int, dim: int = 32,
                 activation: str = "gelu", p_drop: float = 0.5, rescale: bool = True):
        super().__init__(base_layer, name, slots, d_model, dim, activation, placement="parallel", scale=1.0)
        self.p_drop, self.rescale = p_drop, rescale

    def branch_scale(self, batch: int, device) -> Union[float, torch.Tensor]:
        """gamma_B11: 1 at eval; Bernoulli(1 - p) per example in training (times 1/(1 - p) if rescale)."""
        if not self.training or self.p_drop == 0:
            return 1.0
        gamma_B = (torch.rand(batch, device=device) >= self.p_drop).float()
        if self.rescale and self.p_drop < 1:
            gamma_B = gamma_B / (1.0 - self.p_drop)
        return gamma_B[:, None, None]


@register_adapter("stochastic", wraps=Block)
def build(base_layer: Block, spec, site) -> StochasticAdapter:
    return StochasticAdapter(base_layer, spec.name, spec.slot_names(), site.d_model, spec.dim, spec.activation,
                             spec.p_drop, spec.rescale)
