"""Example-level router: one decision per sequence, from the mask-aware mean of its hidden states.

Every token of an example goes to the same top-k experts with the same weights (padding tokens go
nowhere). The pooled mean covers the whole sequence, so in a causal LM early tokens are routed by
what comes later; Config.check asks for ``moe.router.allow_noncausal: true``.

Legend: B examples, S sequence, T = B*S tokens, D model dim, E experts, K slots.
"""
from __future__ import annotations

from typing import Optional

import torch

from moe_sys.moe.balance import Balancer
from moe_sys.moe.router_topk import GatedRouter, route_rows
from moe_sys.moe.routing import (RouterOutput, RouterSpec, RoutingContext, Rows, example_rows, register_router,
                                 route_stats)


def masked_mean(x_BSD: torch.Tensor, mask_BS: Optional[torch.Tensor]) -> torch.Tensor:
    """Mean over the real tokens of each example (an all-padding example pools to 0). [B, D]"""
    if mask_BS is None:
        return x_BSD.mean(1)
    m_BS1 = mask_BS.to(x_BSD.dtype).unsqueeze(-1)
    return (x_BSD * m_BS1).sum(1) / m_BS1.sum(1).clamp_min(1.0)


def route_examples(logits_BE: torch.Tensor, rows: Rows, ctx: RoutingContext, top_k: int, spec: RouterSpec,
                   balancer: Balancer, training: bool) -> RouterOutput:
    """Top-k per example (dropless: capacity would split an example), then copied to its tokens."""
    r = route_rows(logits_BE, rows, top_k, spec, balancer, training)
    return to_tokens(r.weights_NK, r.expert_ids_NK, logits_BE, r.probs_NE, rows, ctx, r.losses)


def to_tokens(weights_BK, expert_ids_BK, logits_BE, probs_BE, rows: Rows, ctx: RoutingContext, route_losses) -> RouterOutput:
    """Per-example decisions -> per-token RouterOutput; padding tokens get -1 / weight 0."""
    B, S = ctx.batch_shape
    example_T = torch.arange(B, device=logits_BE.device).repeat_interleave(S)
    weights_TK, ids_TK = weights_BK[example_T], expert_ids_BK[example_T]
    if ctx.mask_BS is not None:
        pad_T1 = ctx.mask_BS.reshape(-1, 1) == 0
        weights_TK, ids_TK = weights_TK.masked_fill(pad_T1, 0.0), ids_TK.masked_fill(pad_T1, -1)
    stats = route_stats(ids_TK, torch.zeros((), device=logits_BE.device), probs_BE, rows.valid_N)
    return RouterOutput(weights_TK, ids_TK, logits_BE[example_T], route_losses, stats)


@register_router("example")
class ExampleRouter(GatedRouter):
    def forward(self, x_TD: torch.Tensor, ctx: RoutingContext) -> RouterOutput:
        B, S = ctx.batch_shape
        logits_BE = self.gate(masked_mean(x_TD.view(B, S, -1), ctx.mask_BS))
        return route_examples(logits_BE, example_rows(ctx, x_TD.device), ctx, self.top_k, self.spec, self.balance,
                              self.training)
