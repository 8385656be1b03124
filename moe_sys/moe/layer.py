"""MoE block: route -> dispatch -> experts -> combine (+ shared experts). Replaces a dense FFN.

Legend: B batch, S sequence, D model dim, T = B*S tokens.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn

from moe_sys.moe import dispatcher_a2a, recompute
from moe_sys.moe.balance import BalanceSpec
from moe_sys.moe.capacity import Capacity
from moe_sys.moe.experts import ExpertBank
from moe_sys.moe.gate import Noise
from moe_sys.moe.routing import ROUTERS, RouterOutput, RouterSpec, RoutingContext
from moe_sys.moe.scoring import Selection


class MoELayer(nn.Module):
    """Single-device by default; ``shard_experts`` (applied by moe_sys.parallel) keeps this rank's
    slice of the expert bank and sets the expert-parallel group the all-to-all runs over.

    shared_experts: always-on experts beside the routed ones (DeepSeek, Qwen2-MoE), run as one
    dense FFN of width d_shared (default shared_experts * d_ff) on every token, replicated on every rank;
    shared_gate scales their output by sigmoid(x w) per token (Qwen2-MoE).

    checkpointed (``train.activation_checkpointing: moe``): the experts' activations are recomputed
    in the backward pass instead of kept.
    """

    checkpoint_unit = "experts"
    checkpointed = False

    def __init__(self, d_model: int, d_ff: int, num_experts: int, top_k: int, router: str = "topk",
                 activation: str = "swiglu", init_std: float = 0.02, spec: RouterSpec = RouterSpec(),
                 num_tasks: int = 1, shared_experts: int = 0, shared_gate: bool = False, d_shared: Optional[int] = None):
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k
        self.router = ROUTERS[router](d_model, num_experts, top_k, spec=spec, init_std=init_std, num_tasks=num_tasks)
        self.experts = ExpertBank(num_experts, d_model, d_ff, activation, init_std)
        # Names avoid "expert": DeepSpeed files every MoE state-dict key containing it as a routed expert.
        shared_width = d_shared or shared_experts * d_ff
        self.shared = ExpertBank(1, d_model, shared_width, activation, init_std) if shared_experts else None
        self.shared_gate = nn.Linear(d_model, 1, bias=False) if shared_experts and shared_gate else None
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
        # A recomputed block reuses the forward's choices, so its all-to-all exchanges the same rows.
        routing = replace(routing, expert_ids_TK=recompute.taped(self, "ids", lambda: routing.expert_ids_TK))
        x_RD, counts_E, meta = dispatcher_a2a.dispatch(x_TD, routing, self.num_experts, self.ep_group)
        y_RD = recompute.run(self.experts, x_RD, counts_E) if self.checkpointed else self.experts(x_RD, counts_E)
        y_TD = dispatcher_a2a.combine(y_RD, meta)
        if self.shared is not None:
            y_TD = y_TD + self._shared(x_TD)
        return y_TD.view(B, S, D), routing

    def _shared(self, x_TD: torch.Tensor) -> torch.Tensor:
        # One "expert" holding all rows: its counts live on the host, so no device sync.
        y_TD = self.shared(x_TD, torch.tensor([x_TD.shape[0]]))
        return y_TD * torch.sigmoid(self.shared_gate(x_TD)) if self.shared_gate is not None else y_TD


def spec_from_config(moe_cfg) -> RouterSpec:
    """moe.router / moe.balance / capacity fields -> the RouterSpec every router takes."""
    r, b = moe_cfg.router, moe_cfg.balance
    return RouterSpec(
        selection=Selection(r.score, r.pre_softmax, r.normalize, r.scale, r.num_groups, r.group_topk),
        capacity=Capacity(moe_cfg.capacity_factor, moe_cfg.eval_capacity_factor, moe_cfg.min_capacity, r.drop_policy),
        noise=Noise(r.jitter_eps, r.noisy_gating, r.sample_second),
        balance=BalanceSpec(tuple((term.type, term.coef) for term in b.losses),
                            b.bias.update_rate if b.bias.enabled else None),
        task_table=tuple(tuple(row) for row in r.task_table) if r.task_table is not None else None,
    )


def is_moe_layer(index: int, moe_cfg) -> bool:
    """Does layer ``index`` hold an MoE block? Every ``moe.every``-th layer from ``moe.first_moe_layer``
    (V-MoE's "every other block of the last 2n": first_moe_layer = L - 2n + 1, every = 2)."""
    first = moe_cfg.first_moe_layer
    return moe_cfg.enabled and index >= first and (index - first) % moe_cfg.every == 0


def build_moe_layer(d_model: int, d_ff: int, moe_cfg, init_std: float, num_tasks: int) -> MoELayer:
    """The MoE block a config asks for (moe_cfg: MoEConfig; num_tasks: number of data domains)."""
    return MoELayer(d_model, moe_cfg.d_expert or d_ff, moe_cfg.num_experts, moe_cfg.top_k, router=moe_cfg.router.type,
                    activation=moe_cfg.activation, init_std=init_std, spec=spec_from_config(moe_cfg),
                    num_tasks=num_tasks, shared_experts=moe_cfg.shared_experts, shared_gate=moe_cfg.shared_gate,
                    d_shared=moe_cfg.d_shared)
