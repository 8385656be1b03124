"""Expert-choice router (Zhou et al., 2022): each expert takes its top-C tokens of the batch.

C = ceil(T/E * cf*K) (``moe.capacity_factor``, default 1: the compute of token-choice top-K).
Load is balanced by construction; a token may get 0..E experts (0: it passes through the residual).
Because an expert compares a token with every other token of the micro-batch, including later
positions of the same sequence, a causal LM accepts this router only with
``moe.router.allow_noncausal: true`` (see Config.check).

Legend: T tokens, D model dim, E experts, C tokens per expert, M max experts any token got.
"""
from __future__ import annotations

from typing import Tuple

import torch

from moe_sys.moe import scoring
from moe_sys.moe.capacity import capacity
from moe_sys.moe.router_topk import GatedRouter
from moe_sys.moe.routing import RouterOutput, RoutingContext, register_router, route_stats, token_rows


@register_router("expert_choice")
class ExpertChoiceRouter(GatedRouter):
    def forward(self, x_TD: torch.Tensor, ctx: RoutingContext) -> RouterOutput:
        rows = token_rows(ctx, x_TD.device)
        logits_TE = self.gate(x_TD)
        affinity_TE = scoring.affinity(logits_TE, self.spec.selection.score)
        picked_TE = self._pick(affinity_TE, rows.valid_N)
        weights_TM, ids_TM = per_token_slots(picked_TE, affinity_TE * self.spec.selection.scale)
        probs_TE = scoring.loss_probs(affinity_TE, self.spec.selection.score)
        route_losses = self.balance.losses(logits_TE, probs_TE, ids_TM, rows) if self.training else {}
        valid_T = rows.valid_N if rows.valid_N is not None else torch.ones_like(affinity_TE[:, 0])
        unpicked = ((~picked_TE.any(1)).float() * valid_T).sum() / valid_T.sum().clamp_min(1.0)
        return RouterOutput(weights_TM, ids_TM, logits_TE, route_losses,
                            route_stats(ids_TM, unpicked, probs_TE, rows.valid_N))

    def _pick(self, affinity_TE: torch.Tensor, valid_T) -> torch.Tensor:
        """picked_TE[t, e]: expert e took token t (its top-C by affinity; padding never taken)."""
        T, E = affinity_TE.shape
        cap = self.spec.capacity
        factor = cap.factor_for(self.training)
        C = min(capacity(T, E, self.top_k, factor if factor is not None else 1.0, cap.min_capacity), T)
        rank_TE = affinity_TE if valid_T is None else affinity_TE.masked_fill(valid_T[:, None] == 0, float("-inf"))
        top_CE = torch.topk(rank_TE, C, dim=0).indices
        picked_TE = torch.zeros_like(affinity_TE, dtype=torch.bool).scatter(0, top_CE, True)
        return picked_TE if valid_T is None else picked_TE & (valid_T[:, None] > 0)


def per_token_slots(picked_TE: torch.Tensor, weight_TE: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """[T, E] picks -> [T, M] slots (M = most experts any token got; -1 / weight 0 pad the rest).

    M needs one host sync; it keeps dispatch from carrying E slots per token.
    """
    M = max(int(picked_TE.sum(1).max()), 1) if picked_TE.numel() else 1
    order_TE = torch.argsort((~picked_TE).to(torch.int8), dim=1, stable=True)  # picked experts first
    ids_TM = order_TE[:, :M]
    got_TM = picked_TE.gather(1, ids_TM)
    return weight_TE.gather(1, ids_TM) * got_TM, torch.where(got_TM, ids_TM, torch.full_like(ids_TM, -1))
