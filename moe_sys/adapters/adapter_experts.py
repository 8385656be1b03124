"""Mixtures of adapter experts: an MoE layer in an FFN slot whose experts are adapters over the frozen
dense FFN, ``y = ffn(x) + mixture of expert deltas``.

The router is any of moe.ROUTERS (token, example or task level, with its balancing losses; ``smear``
for SMEAR). Two ways to aggregate:
  outputs  the MoE path: dispatch -> each expert's delta over its rows -> weighted combine, with the
           expert banks sharded over expert-parallel ranks and tokens exchanged all-to-all.
  params   the SMEAR path: expert parameters merged per example with the routing weights, then one
           forward of the merged adapter (needs a decision that is constant within an example).
The delta is 0 while the adapters are at their zero init, so the layer starts as the dense FFN
whatever the router and however much weight it gives. Mixtures wrap the LM's SwiGLU or the ViT's GELU
MLP (bottleneck experts only: LoRA experts adapt SwiGLU's gate/up/down).

Legend: B examples, S sequence, T tokens, D model dim, F FFN hidden, R rows, E experts, El local experts.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from moe_sys.adapters.base import AdapterLayer, PerExample, Rows, register_adapter
from moe_sys.adapters.bottleneck import BottleneckBank
from moe_sys.adapters.lora import LoRABank, lora_scale
from moe_sys.adapters.smear import SmearRouter, example_weights, merge_experts
from moe_sys.models.transformer import SwiGLU
from moe_sys.models.vit import MLP
from moe_sys.moe import dispatcher_a2a
from moe_sys.moe.layer import spec_from_config
from moe_sys.moe.routing import ROUTERS, RouterOutput, RoutingContext


class LoRAExperts(nn.Module):
    """E versions of the frozen SwiGLU FFN, each with its own LoRA on gate, up and down (MixLoRA-style).

    delta_e(x) = FFN_e(x) - FFN(x) = down(h_e - h) + lora_down_e(h_e), with h = silu(g) * u and h_e
    its LoRA'd twin: exactly 0 while every B is 0.
    """

    def __init__(self, num: int, d_model: int, d_ff: int, rank: int, scale: float):
        super().__init__()
        self.gate = LoRABank(num, d_model, d_ff, rank, scale)
        self.up = LoRABank(num, d_model, d_ff, rank, scale)
        self.down = LoRABank(num, d_ff, d_model, rank, scale)

    def params(self) -> Dict[str, torch.Tensor]:
        return {f"{part}.{k}": v for part in ("gate", "up", "down") for k, v in getattr(self, part).params().items()}

    def delta(self, x, p: Dict[str, torch.Tensor], layout, ffn: SwiGLU) -> torch.Tensor:
        def part(name):
            return {k: p[f"{name}.{k}"] for k in ("A", "B")}

        g, u = ffn.gate(x), ffn.up(x)
        h = F.silu(g) * u
        h_e = F.silu(g + self.gate.delta(x, part("gate"), layout)) * (u + self.up.delta(x, part("up"), layout))
        return ffn.down(h_e - h) + self.down.delta(h_e, part("down"), layout)


class BottleneckExperts(nn.Module):
    """E parallel bottleneck adapters beside the FFN: delta_e(x) = scale * up_e(act(down_e x + b_e))."""

    def __init__(self, num: int, d_model: int, dim: int, activation: str, scale: float):
        super().__init__()
        self.bank = BottleneckBank(num, d_model, d_model, dim, activation)
        self.scale = scale

    def params(self) -> Dict[str, torch.Tensor]:
        return self.bank.params()

    def delta(self, x, p: Dict[str, torch.Tensor], layout, ffn: SwiGLU) -> torch.Tensor:
        return self.scale * self.bank.delta(x, p, layout)


class AdapterMoE(AdapterLayer):
    """Route -> (dispatch -> expert deltas -> combine | merge per example -> one delta) -> ffn(x) + delta.

    ``shard_experts`` (applied by the adapters step of moe_sys.parallel) keeps this rank's slice of
    every expert parameter, as MoELayer does; DeepSpeed then saves one file per expert.
    """

    returns_routing = True

    def __init__(self, base_layer: SwiGLU, name: str, experts: nn.Module, router: nn.Module, num_experts: int,
                 aggregation: str = "outputs", segments: int = 1):
        """segments: for aggregation 'params', the routing is constant on that many equal segments of
        each sequence (1 = per example; SMEAR's causal segments otherwise)."""
        super().__init__(base_layer, name)
        self.experts, self.router = experts, router
        self.num_experts, self.aggregation, self.segments = num_experts, aggregation, segments
        self.ep_group: Optional[dist.ProcessGroup] = None
        self.ep_rank = 0

    def shard_experts(self, ep_group: Optional[dist.ProcessGroup], ep_rank: int, ep_size: int) -> None:
        """Keep experts [ep_rank*El, (ep_rank+1)*El) of every expert parameter (El = E / ep_size)."""
        local = self.num_experts // ep_size
        for module in self.experts.modules():
            for name, param in list(module.named_parameters(recurse=False)):
                shard = param.detach()[ep_rank * local:(ep_rank + 1) * local].clone()
                setattr(module, name, nn.Parameter(shard, requires_grad=param.requires_grad))
        self.ep_group, self.ep_rank = (ep_group if ep_size > 1 else None), ep_rank

    def forward(self, x_BSD: torch.Tensor, ctx: Optional[RoutingContext] = None) -> Tuple[torch.Tensor, RouterOutput]:
        B, S, D = x_BSD.shape
        routing = self.router(x_BSD.reshape(B * S, D), ctx if ctx is not None else RoutingContext((B, S)))
        if self.aggregation == "params":
            delta_BSD = self._merged_delta(x_BSD, routing)
        else:
            delta_BSD = self._routed_delta(x_BSD.reshape(B * S, D), routing).view(B, S, D)
        return self.base_layer(x_BSD) + delta_BSD, routing

    def _routed_delta(self, x_TD: torch.Tensor, routing: RouterOutput) -> torch.Tensor:
        x_RD, counts_El, meta = dispatcher_a2a.dispatch(x_TD, routing, self.num_experts, self.ep_group)
        delta_RD = self.experts.delta(x_RD, self.experts.params(), Rows(counts_El.tolist()), self.base_layer)
        return dispatcher_a2a.combine(delta_RD, meta)

    def _merged_delta(self, x_BSD: torch.Tensor, routing: RouterOutput) -> torch.Tensor:
        B, S, D = x_BSD.shape
        x_NLD = x_BSD.reshape(B * self.segments, S // self.segments, D)  # N decisions of L tokens each
        w_NE = example_weights(routing, tuple(x_NLD.shape[:2]), self.num_experts)
        params_N = merge_experts(self.experts.params(), w_NE, self.ep_group, self.ep_rank)
        return self.experts.delta(x_NLD, params_N, PerExample, self.base_layer).view(B, S, D)


def _experts(spec, base_layer: nn.Module, d_model: int) -> nn.Module:
    e, E = spec.expert, spec.num_experts
    if e.kind == "bottleneck":  # beside the FFN: any FFN (the LM's SwiGLU, the ViT's GELU MLP)
        return BottleneckExperts(E, d_model, e.rank, e.activation, e.scale)
    if not isinstance(base_layer, SwiGLU):
        raise TypeError(f"{spec.name}: LoRA experts adapt a SwiGLU's gate/up/down; for a {type(base_layer).__name__} "
                        "use expert.kind: bottleneck")
    if not all(type(getattr(base_layer, n)) is nn.Linear for n in ("gate", "up", "down")):
        raise TypeError(f"{spec.name}: LoRA experts need the FFN's own nn.Linear layers; adapt them before "
                        "other adapters wrap gate/up/down")
    return LoRAExperts(E, base_layer.gate.in_features, base_layer.gate.out_features, e.rank,
                       lora_scale(e.alpha, e.rank, e.rslora))


@register_adapter("mixture", wraps=(SwiGLU, MLP))
def build_mixture(base_layer: nn.Module, spec, site) -> AdapterMoE:
    routing = spec.routing_config()
    router = ROUTERS[routing.router.type](site.d_model, spec.num_experts, spec.top_k, spec=spec_from_config(routing),
                                          num_tasks=site.num_domains)
    experts = _experts(spec, base_layer, site.d_model)
    return AdapterMoE(base_layer, spec.name, experts, router, spec.num_experts, spec.aggregation)


@register_adapter("smear", wraps=(SwiGLU, MLP))
def build_smear(base_layer: nn.Module, spec, site) -> AdapterMoE:
    router = SmearRouter(site.d_model, spec.num_experts, spec.expert_dropout, spec.segments)
    experts = _experts(spec, base_layer, site.d_model)
    return AdapterMoE(base_layer, spec.name, experts, router, spec.num_experts, spec.aggregation, spec.segments)
