"""Prefix tuning (Li & Liang 2021): P learned key/value positions per layer that every query may attend to.

head = Attn(q, [P_K ; K], [P_V ; V]). Prefix keys carry no rotary position (they sit before every
token). With ``reparam_dim`` the prefix is trained through an MLP (tanh) over a learned embedding,
which the paper found more stable; ``eject()`` replaces it with the plain prefix it produces.
Not zero-initialised: a prefix changes the output from the first step. Examples with no adapter
(a zero weight row) get a mask that hides the prefix, so they see the base attention.

Legend: N slots, B examples, S sequence, P prefix length, C = 2 D (keys then values), H heads, d head dim.
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn as nn

from moe_sys.adapters.base import SlotAdapter, mix, register_adapter
from moe_sys.models.transformer import Attention


class PrefixBank(nn.Module):
    def __init__(self, num: int, length: int, d_model: int, reparam_dim: Optional[int] = None,
                 init_std: float = 0.02):
        super().__init__()
        if reparam_dim:
            self.embed_NPD = nn.Parameter(torch.randn(num, length, d_model) * init_std)
            self.mlp = nn.Sequential(nn.Linear(d_model, reparam_dim), nn.Tanh(), nn.Linear(reparam_dim, 2 * d_model))
        else:
            self.kv_NPC = nn.Parameter(torch.randn(num, length, 2 * d_model) * init_std)

    def prefixes(self) -> torch.Tensor:
        """[N, P, 2D] keys then values of every slot."""
        return self.mlp(self.embed_NPD) if hasattr(self, "mlp") else self.kv_NPC

    @torch.no_grad()
    def eject(self) -> None:
        """Drop the MLP, keeping the prefixes it computes as plain parameters."""
        if hasattr(self, "mlp"):
            kv_NPC = self.prefixes().detach().clone()
            del self.mlp, self.embed_NPD
            self.kv_NPC = nn.Parameter(kv_NPC)


class PrefixAttention(SlotAdapter):
    def __init__(self, base_layer: Attention, name: str, slots: List[str], d_model: int, length: int = 8,
                 reparam_dim: Optional[int] = None):
        super().__init__(base_layer, name, slots)
        self.bank = PrefixBank(len(slots), length, d_model, reparam_dim)

    def forward(self, x_BSD: torch.Tensor, cos=None, sin=None) -> torch.Tensor:
        B, _, D = x_BSD.shape
        w_BN = self.slot_weights(B, x_BSD.device)
        if w_BN is None:
            return self.base_layer(x_BSD, cos, sin)
        kv_BPC = mix({"kv": self.bank.prefixes()}, w_BN)["kv"]
        H = self.base_layer.n_heads
        k_BHPd, v_BHPd = kv_BPC.view(B, kv_BPC.shape[1], 2, H, D // H).permute(2, 0, 3, 1, 4)
        visible_BP = (w_BN.sum(-1) > 0)[:, None].expand(B, kv_BPC.shape[1])
        return self.base_layer(x_BSD, cos, sin, prefix_kv=(k_BHPd, v_BHPd, visible_BP))

    def eject(self) -> None:
        self.bank.eject()


@register_adapter("prefix", wraps=Attention)
def build(base_layer: Attention, spec, site) -> PrefixAttention:
    return PrefixAttention(base_layer, spec.name, spec.slot_names(), site.d_model, spec.length, spec.reparam_dim)
