"""(IA)^3 (Liu et al. 2022): learned vectors l rescale keys, values and the FFN hidden.

k' = l_k * (W_k x), v' = l_v * (W_v x), ffn = W_down(l_ff * h). Output targets rescale output features
(for the fused q/k/v projection only the k and v rows); feedforward targets rescale their input,
which is the FFN hidden for the down projection (as PEFT's ``feedforward_modules``). Stored as
delta = l - 1, zero-initialised: then an example with no adapter (a zero weight row) mixes to l = 1,
and slots mix linearly in l.

Legend: N slots, B examples, S sequence, W rescaled features.
"""
from __future__ import annotations

from typing import List

import torch
import torch.nn as nn

from moe_sys.adapters.base import SlotAdapter, matches, mix, register_adapter


class IA3Linear(SlotAdapter):
    mergeable = True

    def __init__(self, base_layer: nn.Linear, name: str, slots: List[str], scale_input: bool = False,
                 offset: int = 0):
        """offset: output features before it are left alone (the q third of a fused q/k/v projection)."""
        super().__init__(base_layer, name, slots)
        self.scale_input, self.offset = scale_input, 0 if scale_input else offset
        width = base_layer.in_features if scale_input else base_layer.out_features - self.offset
        self.delta_NW = nn.Parameter(torch.zeros(len(slots), width))

    def forward(self, x_BSI: torch.Tensor) -> torch.Tensor:
        w_BN = self.slot_weights(x_BSI.shape[0], x_BSI.device)
        if w_BN is None:
            return self.base_layer(x_BSI)
        l_B1W = 1.0 + mix({"delta": self.delta_NW}, w_BN)["delta"][:, None, :]
        if self.scale_input:
            return self.base_layer(x_BSI * l_B1W)
        y_BSO = self.base_layer(x_BSI)
        return torch.cat([y_BSO[..., :self.offset], y_BSO[..., self.offset:] * l_B1W], dim=-1)

    def _fold(self, slot: int, inverse: bool) -> None:
        """W <- W diag(l) (input) or diag(l) W (output rows); unmerge divides, exact to rounding."""
        l_W = 1.0 + self.delta_NW[slot].to(self.base_layer.weight.dtype)
        factor_W = 1.0 / l_W if inverse else l_W
        if self.scale_input:
            self.base_layer.weight.mul_(factor_W[None, :])
            return
        self.base_layer.weight[self.offset:].mul_(factor_W[:, None])
        if self.base_layer.bias is not None:
            self.base_layer.bias[self.offset:].mul_(factor_W)


@register_adapter("ia3", wraps=nn.Linear)
def build(base_layer: nn.Linear, spec, site) -> IA3Linear:
    fused = matches(site.path, spec.fused_qkv)
    return IA3Linear(base_layer, spec.name, spec.slot_names(), scale_input=matches(site.path, spec.feedforward),
                     offset=_q_width(base_layer) if fused else 0)


def _q_width(qkv: nn.Linear) -> int:
    """Where k starts in a fused q/k/v projection (q is wider than k and v under grouped-query attention)."""
    sizes = getattr(qkv, "split_sizes", None)
    return sizes[0] if sizes is not None else qkv.out_features // 3
