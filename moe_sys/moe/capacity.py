"""Expert capacity and which slots are dropped when an expert is over it.

Legend: N tokens, K slots per token, E experts, C capacity (slots per expert).

Every policy ranks the slots routed to an expert and keeps its first C; they differ in the ranking:
  position  slot-major order: all first choices (in token order), then all second choices, ...
            (GShard, DeepSpeed top1/top2 without random selection). Truly positional.
  probs     highest affinity first (DeepSpeed topkgating, Megatron 'probs'), ties by position
  random    a fresh uniform priority per (token, expert), drawn as DeepSpeed's random token
            selection (use_rts) draws it, ties by position
  priority  V-MoE's batch prioritized routing (Riquelme et al. 2021; vmoe/moe.py
            _get_top_experts_per_item_common): slot-major like position, but inside each slot rank
            the tokens go by their highest gate value, max_e affinity, descending (ties by position),
            so the confident tokens of a batch are the last to lose their expert
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from moe_sys import ops


@dataclass(frozen=True)
class Capacity:
    """``moe.capacity_factor`` / ``eval_capacity_factor`` / ``min_capacity`` / ``router.drop_policy``."""

    factor: Optional[float] = None  # None = dropless
    eval_factor: Optional[float] = None  # None = same as factor
    min_capacity: int = 4
    drop_policy: str = "position"

    def factor_for(self, training: bool) -> Optional[float]:
        return self.factor if training or self.eval_factor is None else self.eval_factor

    def apply(self, expert_ids_NK: torch.Tensor, affinity_NE: torch.Tensor, training: bool) -> torch.Tensor:
        """expert_ids_NK with the slots over capacity set to -1 (unchanged when dropless)."""
        factor = self.factor_for(training)
        if factor is None:
            return expert_ids_NK
        N, K = expert_ids_NK.shape
        cap = capacity(N, affinity_NE.shape[1], K, factor, self.min_capacity)
        return drop_over_capacity(expert_ids_NK, self.priority(expert_ids_NK, affinity_NE), affinity_NE.shape[1], cap)

    def priority(self, expert_ids_NK: torch.Tensor, affinity_NE: torch.Tensor) -> Optional[torch.Tensor]:
        """Per-slot priority (higher is kept first); None = position."""
        if self.drop_policy == "position":
            return None
        if self.drop_policy == "priority":
            return batch_priority(expert_ids_NK.shape[1], affinity_NE)
        if self.drop_policy == "probs":
            source_NE = affinity_NE
        else:  # random: U(0,1) of shape [N, E], DeepSpeed's RTS draw
            source_NE = torch.rand(affinity_NE.shape, device=affinity_NE.device)
        return source_NE.gather(1, expert_ids_NK.clamp(min=0))


def batch_priority(top_k: int, affinity_NE: torch.Tensor) -> torch.Tensor:
    """priority_NK = -(k * N + r_n), r_n the token's rank by max_e affinity (descending, stable): every
    k-th choice outranks every (k+1)-th, and inside a choice rank the higher gate goes first. Exact
    integers, so no gate value (even 1.0) can push a token across slot ranks."""
    N = affinity_NE.shape[0]
    order_N = torch.argsort(affinity_NE.max(dim=1).values, descending=True, stable=True)
    rank_N = torch.empty_like(order_N)
    rank_N[order_N] = torch.arange(N, device=affinity_NE.device)
    k_K = torch.arange(top_k, device=affinity_NE.device)
    return -(k_K[None, :] * N + rank_N[:, None])


def capacity(num_tokens: int, num_experts: int, top_k: int, factor: float, min_capacity: int) -> int:
    """Slots per expert: ceil(T/E * cf*K), at least min_capacity (DeepSpeed's _capacity with cf*K)."""
    return max(math.ceil(num_tokens / num_experts * (factor * top_k)), min_capacity)


def drop_over_capacity(expert_ids_NK: torch.Tensor, priority_NK: Optional[torch.Tensor], num_experts: int,
                       cap: int) -> torch.Tensor:
    """Each expert keeps its ``cap`` best slots by priority (ties: slot-major position); others -> -1.

    The slots are put in priority order and handed to ops.build_index as one column, so the
    capacity cut is the same positional cut the dispatcher's index uses.
    """
    N, K = expert_ids_NK.shape
    ids = expert_ids_NK.t().reshape(-1)  # slot-major: every first choice before any second choice
    if priority_NK is None:
        order = torch.arange(ids.numel(), device=ids.device)
    else:
        order = torch.argsort(priority_NK.t().reshape(-1), descending=True, stable=True)
    kept_sorted = ops.build_index(ids[order].unsqueeze(1), num_experts, cap).dest_row_TK[:, 0] >= 0
    kept = torch.empty_like(kept_sorted)
    kept[order] = kept_sorted
    return torch.where(kept, ids, torch.full_like(ids, -1)).view(K, N).t()
