"""Token-choice top-k router: each token picks its K best experts, then capacity may drop slots.

``route_rows`` is the top-k path itself; the example- and task-level routers run it on one row
per example instead of one per token.

Legend: N rows, T tokens, D model dim, E experts, K slots per row.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import torch
import torch.nn as nn

from moe_sys.moe import scoring
from moe_sys.moe.balance import Balancer
from moe_sys.moe.capacity import Capacity
from moe_sys.moe.gate import Gate
from moe_sys.moe.routing import (RouterOutput, RouterSpec, RoutingContext, Rows, register_router, route_stats,
                                 slot_drop_fraction, token_rows)


@dataclass(frozen=True)
class RowRouting:
    weights_NK: torch.Tensor  # final gate weights, 0 where dropped
    expert_ids_NK: torch.Tensor  # after capacity (-1 = dropped or padding)
    chosen_NK: torch.Tensor  # before capacity (-1 = padding)
    probs_NE: torch.Tensor  # the distribution losses and entropy read
    losses: Dict[str, torch.Tensor]


def route_rows(logits_NE: torch.Tensor, rows: Rows, top_k: int, spec: RouterSpec, balancer: Balancer,
               training: bool, capacity: Optional[Capacity] = None) -> RowRouting:
    """Choose -> count for the bias -> losses (training only) -> capacity -> final weights.

    Losses see the choice before capacity: a dropped token still asked for its expert, and that
    demand is what balancing should flatten (DeepSpeed and Megatron do the same).
    """
    gumbel_NE = scoring.sample_gumbel(logits_NE.shape, logits_NE.device) if training and spec.noise.sample_second else None
    weights_NK, chosen_NK, affinity_NE = scoring.choose(logits_NE, top_k, spec.selection, balancer.bias_E, gumbel_NE)
    if rows.valid_N is not None:  # padding takes no expert slot and no share of capacity
        chosen_NK = chosen_NK.masked_fill(rows.valid_N[:, None] == 0, -1)
    balancer.observe(chosen_NK, rows)
    probs_NE = scoring.loss_probs(affinity_NE, spec.selection.score)
    route_losses = balancer.losses(logits_NE, probs_NE, chosen_NK, rows) if training else {}
    kept_NK = capacity.apply(chosen_NK, affinity_NE, training) if capacity is not None else chosen_NK
    weights_NK = scoring.finish_weights(weights_NK, kept_NK >= 0, top_k, spec.selection)
    return RowRouting(weights_NK, kept_NK, chosen_NK, probs_NE, route_losses)


class GatedRouter(nn.Module):
    """A learned gate over the token/example representation plus the balancing state every
    gate-based router (token top-k, expert choice, example-level) shares."""

    def __init__(self, d_model: int, num_experts: int, top_k: int, spec: RouterSpec = RouterSpec(),
                 init_std: float = 0.02, num_tasks: int = 1):
        super().__init__()
        self.top_k, self.spec = top_k, spec
        self.gate = Gate(d_model, num_experts, init_std, spec.noise)
        self.balance = Balancer(num_experts, spec.balance, num_tasks)


@register_router("topk")
class TopKRouter(GatedRouter):
    """Token choice with any K: softmax or sigmoid scores, pre/post softmax, group limits, noise,
    aux-loss-free bias, and capacity with a position / probs / random drop policy."""

    def forward(self, x_TD: torch.Tensor, ctx: RoutingContext) -> RouterOutput:
        rows = token_rows(ctx, x_TD.device)
        logits_TE = self.gate(x_TD)
        r = route_rows(logits_TE, rows, self.top_k, self.spec, self.balance, self.training, self.spec.capacity)
        stats = route_stats(r.chosen_NK, slot_drop_fraction(r.chosen_NK, r.expert_ids_NK), r.probs_NE, rows.valid_N)
        return RouterOutput(r.weights_NK, r.expert_ids_NK, logits_TE, r.losses, stats)
