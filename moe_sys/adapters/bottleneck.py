"""Bottleneck adapters: a(h) = up(act(down h + b)), up zero-initialised so each starts as a no-op.

sequential (Houlsby; Pfeiffer when only after the FFN): y = f(x) + s * a(f(x)), inside the block's
residual branch. parallel (He et al. 2022): y = f(x) + s * a(x), reading the sublayer's input.

Legend: N slots (or experts), B examples, S sequence, I input features, R bottleneck width, O output features.
"""
from __future__ import annotations

from typing import Dict, List, Union

import torch
import torch.nn as nn

from moe_sys.adapters.base import ACTIVATIONS, PerExample, SlotAdapter, mix, register_adapter
from moe_sys.models.transformer import returns_routing


class BottleneckBank(nn.Module):
    """N bottleneck adapters stacked on dim 0 (input-major, like LoRABank)."""

    def __init__(self, num: int, d_in: int, d_out: int, dim: int, activation: str, bias: bool = True):
        super().__init__()
        self.down_NIR = nn.Parameter(torch.empty(num, d_in, dim).uniform_(-d_in ** -0.5, d_in ** -0.5))
        self.bias_NR = nn.Parameter(torch.zeros(num, dim)) if bias else None
        self.up_NRO = nn.Parameter(torch.zeros(num, dim, d_out))
        self.activation = activation

    def params(self) -> Dict[str, torch.Tensor]:
        bias = {"bias": self.bias_NR} if self.bias_NR is not None else {}
        return {"down": self.down_NIR, **bias, "up": self.up_NRO}

    def delta(self, x, p: Dict[str, torch.Tensor], layout) -> torch.Tensor:
        h = layout.linear(x, p["down"])
        h = layout.bias(h, p["bias"]) if "bias" in p else h
        return layout.linear(ACTIVATIONS[self.activation](h), p["up"])


class BottleneckAdapter(SlotAdapter):
    """A bottleneck adapter around any sublayer mapping [B, S, D] -> [B, S, D] (extra arguments and
    a returned routing, as MoE blocks take and give, pass through)."""

    def __init__(self, base_layer: nn.Module, name: str, slots: List[str], d_model: int, dim: int = 16,
                 activation: str = "relu", placement: str = "sequential", scale: float = 1.0, bias: bool = True):
        super().__init__(base_layer, name, slots)
        self.bank = BottleneckBank(len(slots), d_model, d_model, dim, activation, bias)
        self.placement, self.scale = placement, scale
        self.returns_routing = returns_routing(base_layer)

    def forward(self, x_BSD: torch.Tensor, *args, **kwargs):
        out = self.base_layer(x_BSD, *args, **kwargs)
        y_BSD = out[0] if isinstance(out, tuple) else out
        w_BN = self.slot_weights(x_BSD.shape[0], x_BSD.device)
        if w_BN is not None:
            source = x_BSD if self.placement == "parallel" else y_BSD
            branch = self.bank.delta(source, mix(self.bank.params(), w_BN), PerExample)
            y_BSD = y_BSD + self.branch_scale(x_BSD.shape[0], x_BSD.device) * branch
        return (y_BSD, *out[1:]) if isinstance(out, tuple) else y_BSD

    def branch_scale(self, batch: int, device) -> Union[float, torch.Tensor]:
        return self.scale


@register_adapter("bottleneck", wraps=nn.Module)
def build(base_layer: nn.Module, spec, site) -> BottleneckAdapter:
    return BottleneckAdapter(base_layer, spec.name, spec.slot_names(), site.d_model, spec.dim, spec.activation,
                             spec.placement, spec.scale)
