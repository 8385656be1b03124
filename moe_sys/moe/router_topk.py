"""Token-choice top-k router: each token picks its K highest-scoring experts.

Legend: T tokens, D model dim, E experts, K slots per token.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn

from moe_sys import ops
from moe_sys.moe import losses
from moe_sys.moe.routing import RouterOutput, RoutingContext, register_router


def capacity(num_tokens: int, num_experts: int, top_k: int, factor: float, min_capacity: int) -> int:
    """Slots per expert: ceil(T*K/E * factor), at least min_capacity (GShard/DeepSpeed convention)."""
    return max(math.ceil(num_tokens * top_k / num_experts * factor), min_capacity)


@register_router("topk")
class TopKRouter(nn.Module):
    """Softmax gating in fp32, top-k selection, optional capacity with positional dropping.

    Weights are renormalised over the K chosen experts when K > 1; with K = 1 the raw probability
    is kept so the LM loss still sends gradient to the router (Switch Transformer).
    """

    def __init__(self, d_model: int, num_experts: int, top_k: int, capacity_factor: Optional[float] = None,
                 eval_capacity_factor: Optional[float] = None, min_capacity: int = 4,
                 aux_loss_coef: float = 1e-2, z_loss_coef: float = 1e-3):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, d_model))
        self.num_experts, self.top_k = num_experts, top_k
        self.capacity_factor = capacity_factor
        self.eval_capacity_factor = eval_capacity_factor if eval_capacity_factor is not None else capacity_factor
        self.min_capacity = min_capacity
        self.aux_loss_coef, self.z_loss_coef = aux_loss_coef, z_loss_coef

    def forward(self, x_TD: torch.Tensor, ctx: Optional[RoutingContext] = None) -> RouterOutput:
        # Gating in fp32: softmax over E in half precision flips near-tied choices between ranks.
        logits_TE = x_TD.float() @ self.weight.float().t()
        probs_TE = torch.softmax(logits_TE, dim=-1)
        weights_TK, expert_ids_TK = torch.topk(probs_TE, self.top_k, dim=-1)
        if self.top_k > 1:
            weights_TK = weights_TK / weights_TK.sum(-1, keepdim=True).clamp_min(1e-20)
        load_E = torch.bincount(expert_ids_TK.reshape(-1), minlength=self.num_experts).float()
        route_losses = {}
        if self.aux_loss_coef > 0:
            route_losses["aux_loss"] = self.aux_loss_coef * losses.switch_aux_loss(probs_TE, expert_ids_TK)
        if self.z_loss_coef > 0:
            route_losses["z_loss"] = self.z_loss_coef * losses.z_loss(logits_TE)
        expert_ids_TK = self._drop_over_capacity(expert_ids_TK)
        kept_TK = expert_ids_TK >= 0
        weights_TK = weights_TK * kept_TK
        stats = {"load_E": load_E / max(expert_ids_TK.numel(), 1),
                 "dropped_fraction": 1.0 - kept_TK.float().mean() if kept_TK.numel() else load_E.new_zeros(())}
        return RouterOutput(weights_TK, expert_ids_TK, logits_TE, route_losses, stats)

    def _drop_over_capacity(self, expert_ids_TK: torch.Tensor) -> torch.Tensor:
        factor = self.capacity_factor if self.training else self.eval_capacity_factor
        if factor is None:
            return expert_ids_TK
        cap = capacity(expert_ids_TK.shape[0], self.num_experts, self.top_k, factor, self.min_capacity)
        index = ops.build_index(expert_ids_TK, self.num_experts, cap)
        return torch.where(index.dest_row_TK >= 0, expert_ids_TK, torch.full_like(expert_ids_TK, -1))
