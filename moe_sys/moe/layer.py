"""MoE block: route -> dispatch -> experts -> combine. Replaces a dense FFN.

Legend: B batch, S sequence, D model dim, T = B*S tokens.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn

from moe_sys.moe import dispatcher_a2a
from moe_sys.moe.experts import ExpertBank
from moe_sys.moe.routing import ROUTERS, RouterOutput, RoutingContext


class MoELayer(nn.Module):
    """Single-device by default; ``shard_experts`` (applied by moe_sys.parallel) keeps this rank's
    slice of the expert bank and sets the expert-parallel group the all-to-all runs over."""

    def __init__(self, d_model: int, d_ff: int, num_experts: int, top_k: int, router: str = "topk",
                 activation: str = "swiglu", init_std: float = 0.02, **router_kwargs):
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k
        self.router = ROUTERS[router](d_model, num_experts, top_k, **router_kwargs)
        nn.init.normal_(self.router.weight, std=init_std)
        self.experts = ExpertBank(num_experts, d_model, d_ff, activation, init_std)
        self.ep_group: Optional[dist.ProcessGroup] = None

    def shard_experts(self, ep_group: Optional[dist.ProcessGroup], ep_rank: int, ep_size: int) -> None:
        """Keep experts [ep_rank*El, (ep_rank+1)*El) of the full bank (El = E / ep_size)."""
        local = self.num_experts // ep_size
        for name, param in list(self.experts.named_parameters()):
            shard = param.detach()[ep_rank * local:(ep_rank + 1) * local].clone()
            setattr(self.experts, name, nn.Parameter(shard, requires_grad=param.requires_grad))
        self.experts.num_experts = local
        self.ep_group = ep_group if ep_size > 1 else None

    def forward(self, x_BSD: torch.Tensor, ctx: Optional[RoutingContext] = None) -> Tuple[torch.Tensor, RouterOutput]:
        B, S, D = x_BSD.shape
        x_TD = x_BSD.reshape(B * S, D)
        routing = self.router(x_TD, ctx if ctx is not None else RoutingContext((B, S)))
        x_RD, counts_E, meta = dispatcher_a2a.dispatch(x_TD, routing, self.num_experts, self.ep_group)
        y_RD = self.experts(x_RD, counts_E)
        y_TD = dispatcher_a2a.combine(y_RD, meta)
        return y_TD.view(B, S, D), routing
