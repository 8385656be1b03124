"""Task-level router: each example is routed by its domain/task id alone (Kudugunta et al., 2021).

Two modes:
  table      ``moe.router.task_table[a]`` lists the K experts of task a (in data.domains order);
             every token of the example goes to them with weight 1/K. Nothing is learned.
  embedding  (no table) a learned embedding per task feeds the gate; top-k per example as in the
             token router, so balancing losses and the aux-loss-free bias apply.
Batches may mix tasks: each example is routed by its own id. Only the id is read, so this router
is causal.

Legend: B examples, A tasks, T tokens, D model dim, E experts, K slots.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from moe_sys.moe.balance import Balancer
from moe_sys.moe.gate import Gate
from moe_sys.moe.router_example import route_examples, to_tokens
from moe_sys.moe.routing import RouterOutput, RouterSpec, RoutingContext, example_rows, register_router


@register_router("task")
class TaskRouter(nn.Module):
    def __init__(self, d_model: int, num_experts: int, top_k: int, spec: RouterSpec = RouterSpec(),
                 init_std: float = 0.02, num_tasks: int = 1):
        super().__init__()
        self.top_k, self.spec, self.num_experts = top_k, spec, num_experts
        if spec.task_table is not None:
            self.register_buffer("table_AK", torch.tensor(spec.task_table, dtype=torch.int64), persistent=False)
        else:
            self.table_AK = None
            # Unit scale, like the normed hidden states the token router sees.
            self.task_embed_AD = nn.Parameter(torch.randn(num_tasks, d_model))
            self.gate = Gate(d_model, num_experts, init_std, spec.noise)
            self.balance = Balancer(num_experts, spec.balance, num_tasks)

    def forward(self, x_TD: torch.Tensor, ctx: RoutingContext) -> RouterOutput:
        if ctx.domain_B is None:
            raise ValueError("task-level routing needs the batch's domain ids (RoutingContext.domain_B)")
        rows = example_rows(ctx, x_TD.device)
        if self.table_AK is None:
            logits_BE = self.gate(self.task_embed_AD[ctx.domain_B])
            return route_examples(logits_BE, rows, ctx, self.top_k, self.spec, self.balance, self.training)
        ids_BK = self.table_AK[ctx.domain_B]
        weights_BK = torch.full(ids_BK.shape, 1.0 / self.top_k, device=x_TD.device)
        probs_BE = torch.zeros(ids_BK.shape[0], self.num_experts, device=x_TD.device).scatter(1, ids_BK, weights_BK)
        # No learned logits: report ones whose softmax is the table's weights.
        logits_BE = torch.log(probs_BE.clamp_min(1e-30))
        return to_tokens(weights_BK, ids_BK, logits_BE, probs_BE, rows, ctx, {})
