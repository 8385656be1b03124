"""Routing metrics of one optimizer step, per MoE layer, for metrics.jsonl and ``moe-sys plot``.

Legend: L MoE layers, E experts, A domains, T tokens, B examples, K slots.

Keys written (lists are per layer, in depth order):
  expert_load [L][E]           fraction of chosen slots per expert (before capacity)
  dropped_fraction             mean over layers; layer_dropped_fraction [L]
  load_max_mean [L]            max_i load_i / mean_i load_i (1 = perfect balance, E = collapse)
  load_cv [L]                  std_i load_i / mean_i load_i
  router_entropy [L]           mean entropy of the routing distribution per decision (nats)
  domain_expert_usage [L][A][E]  share of each domain's computed slots that each expert processed
                               (a zero row when the step's batches held no sample of that domain)
"""
from __future__ import annotations

from typing import Callable, Dict, List, Tuple

import torch

from moe_sys.moe.routing import RouterOutput

Z_LOSS = "z"  # every other router loss name is a balancing loss, summed into aux_loss


def router_losses(routings: List[RouterOutput]) -> Dict[str, torch.Tensor]:
    """name -> sum over layers of the (already weighted) losses the routers returned."""
    out: Dict[str, torch.Tensor] = {}
    for routing in routings:
        for name, value in routing.losses.items():
            out[name] = out[name] + value if name in out else value
    return out


def split_losses(values: Dict[str, float]) -> Tuple[float, float]:
    """(aux_loss, z_loss): the sum of all balancing losses, and the z-loss."""
    return sum(v for k, v in values.items() if k != Z_LOSS), values.get(Z_LOSS, 0.0)


def domain_usage(expert_ids_TK: torch.Tensor, domain_B: torch.Tensor, num_domains: int, num_experts: int) -> torch.Tensor:
    """counts_AE[a, e] = computed slots of domain-a tokens on expert e."""
    S = expert_ids_TK.shape[0] // domain_B.shape[0]
    domain_TK = domain_B.repeat_interleave(S)[:, None].expand_as(expert_ids_TK)
    kept = expert_ids_TK >= 0
    flat = (domain_TK * num_experts + expert_ids_TK)[kept]
    return torch.bincount(flat, minlength=num_domains * num_experts).view(num_domains, num_experts).float()


class StepStats:
    """Sums per-layer statistics over a step's micro-batches; ``summary`` reduces them over ranks."""

    def __init__(self, num_domains: int):
        self.num_domains = num_domains
        self.sums: Dict[str, torch.Tensor] = {}

    def add(self, routings: List[RouterOutput], domain_B: torch.Tensor) -> None:
        E = routings[0].stats["load_E"].shape[0]
        values = {
            "load_LE": torch.stack([r.stats["load_E"] for r in routings]),
            "dropped_L": torch.stack([r.stats["dropped_fraction"] for r in routings]),
            "entropy_L": torch.stack([r.stats["entropy"] for r in routings]),
            "usage_LAE": torch.stack([domain_usage(r.expert_ids_TK, domain_B, self.num_domains, E) for r in routings]),
            "count": torch.ones(1, device=domain_B.device),
        }
        for key, value in values.items():
            self.sums[key] = self.sums[key] + value.float() if key in self.sums else value.float()

    def summary(self, reduce_sum: Callable[[torch.Tensor], torch.Tensor]) -> Dict[str, object]:
        """Metric fields, after summing over ranks with ``reduce_sum`` (one collective); {} without MoE layers."""
        if not self.sums:
            return {}
        shapes = {k: v.shape for k, v in self.sums.items()}
        flat = reduce_sum(torch.cat([v.reshape(-1) for v in self.sums.values()]))
        parts = dict(zip(shapes, flat.split([s.numel() for s in shapes.values()])))
        total = {k: parts[k].view(shape) for k, shape in shapes.items()}
        n = total["count"]
        load_LE = total["load_LE"] / n
        mean_L = load_LE.mean(1).clamp_min(1e-12)
        usage_LAE = total["usage_LAE"]
        usage_LAE = usage_LAE / usage_LAE.sum(-1, keepdim=True).clamp_min(1.0)
        dropped_L = total["dropped_L"] / n
        return {
            "expert_load": load_LE.tolist(),
            "dropped_fraction": float(dropped_L.mean()),
            "layer_dropped_fraction": dropped_L.tolist(),
            "load_max_mean": (load_LE.max(1).values / mean_L).tolist(),
            "load_cv": (load_LE.std(1, unbiased=False) / mean_L).tolist(),
            "router_entropy": (total["entropy_L"] / n).tolist(),
            "domain_expert_usage": usage_LAE.tolist(),
        }
