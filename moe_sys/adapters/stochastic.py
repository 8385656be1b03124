"""Stochastic adapters (PUMA: Kim, Kim, Kwak, "Learning Unified Distance Metric Across Diverse Data
Distributions with Parameter-Efficient Transfer Learning", WACV 2025; code tjddus9597/PUMA-WACV25):
parallel bottleneck adapters whose branch is switched off per example in training.

Two placements:
  stochastic  one adapter beside each whole transformer block (LM or ViT),
              ``out = block(x) + gamma * adapter(x)``.
  puma        PUMA's own (models/prompt.py StochasticAdapter, used in models/vision_transformer.py
              forward_features): one beside the attention and one beside the MLP sub-layer of every block,
              each reading that sub-layer's normalised input n (norm1(x), norm2(x_attn)):
              ``f(n) + gamma * 0.1 * up(relu(down n))``, no biases, down He-uniform, up zero, the 0.1 fixed
              (not trained); the two sites draw their gammas independently (one timm DropPath each).

gamma ~ Bernoulli(1 - p_drop) per example in training, 1 at eval. Switching an example's adapter off
returns that layer to the pre-trained function exactly, so no dataset can make the model depend on
its adapter: the frozen path must keep working without it (seed 000).

Rescaling (``rescale``, default on): kept adapters are multiplied by 1/(1 - p_drop) in training, as
inverted dropout and timm's DropPath (scale_by_keep, which PUMA uses) do. Then the training-time
expectation of the branch, E[gamma] a, equals its eval value a; without it the eval output carries the
adapter at 1/(1 - p_drop) times its average training strength (2x at PUMA's p = 0.5), a shift the frozen
layers after it never saw.
"""
from __future__ import annotations

from typing import List, Union

import torch
import torch.nn as nn

from moe_sys.adapters.base import register_adapter
from moe_sys.adapters.bottleneck import BottleneckAdapter
from moe_sys.models.transformer import Block
from moe_sys.models.vit import ViTBlock


class StochasticAdapter(BottleneckAdapter):
    """A parallel BottleneckAdapter around a sub-module whose branch is dropped per example in training."""

    def __init__(self, base_layer: nn.Module, name: str, slots: List[str], d_model: int, dim: int = 32,
                 activation: str = "gelu", p_drop: float = 0.5, rescale: bool = True, scale: float = 1.0,
                 bias: bool = True):
        super().__init__(base_layer, name, slots, d_model, dim, activation, placement="parallel", scale=scale,
                         bias=bias)
        self.p_drop, self.rescale = p_drop, rescale

    def branch_scale(self, batch: int, device) -> Union[float, torch.Tensor]:
        """scale * gamma_B11: gamma 1 at eval; Bernoulli(1 - p) per example in training (/(1 - p) if rescale)."""
        if not self.training or self.p_drop == 0:
            return self.scale
        gamma_B = (torch.rand(batch, device=device) >= self.p_drop).float()
        if self.rescale and self.p_drop < 1:
            gamma_B = gamma_B / (1.0 - self.p_drop)
        return self.scale * gamma_B[:, None, None]


class PumaAdapter(StochasticAdapter):
    """PUMA's adapter beside one sub-layer (attention or MLP, dense or MoE), reading its input."""

    def __init__(self, base_layer: nn.Module, name: str, slots: List[str], d_model: int, dim: int = 32,
                 p_drop: float = 0.5, scale: float = 0.1, rescale: bool = True):
        super().__init__(base_layer, name, slots, d_model, dim, "relu", p_drop, rescale, scale, bias=False)
        # PUMA: kaiming_uniform_(a=1) of the [D, r] down matrix, whose fan-in torch reads as r: U(+-sqrt(3/r)).
        bound = (3.0 / dim) ** 0.5
        with torch.no_grad():
            self.bank.down_NIR.uniform_(-bound, bound)


@register_adapter("stochastic", wraps=(Block, ViTBlock))
def build(base_layer: nn.Module, spec, site) -> StochasticAdapter:
    return StochasticAdapter(base_layer, spec.name, spec.slot_names(), site.d_model, spec.dim, spec.activation,
                             spec.p_drop, spec.rescale)


@register_adapter("puma", wraps=nn.Module)
def build_puma(base_layer: nn.Module, spec, site) -> PumaAdapter:
    return PumaAdapter(base_layer, spec.name, spec.slot_names(), site.d_model, spec.dim, spec.p_drop, spec.scale,
                       spec.rescale)
