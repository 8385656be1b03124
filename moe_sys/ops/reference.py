"""Pure-PyTorch token dispatch/combine: the oracle every kernel is tested against, and the fallback.

Legend: T tokens, K slots per token (top-k), E experts, D model dim, R routed rows, C capacity.

A routing is a table ``expert_ids_TK`` (``-1`` marks a slot the router dropped). ``build_index``
turns it into ``dest_row_TK``: the row each (token, slot) occupies in the expert-sorted buffer,
``-1`` when the slot is dropped. Two layouts share the same permute/unpermute ops:

- dropless: rows of expert e occupy ``[offsets[e], offsets[e] + counts[e])``; R = sum(counts);
- capacity: rows of expert e occupy ``[e*C, e*C + min(counts[e], C))``; R = E*C, padding rows are
  zero. Slots beyond C are dropped in priority order (all first choices before second choices,
  earlier tokens first), as GShard and DeepSpeed do.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch


class RoutingIndex(NamedTuple):
    """Where each routed slot goes. counts_E: kept rows per expert; num_rows: R."""

    dest_row_TK: torch.Tensor
    counts_E: torch.Tensor
    num_rows: int


def build_index(expert_ids_TK: torch.Tensor, num_experts: int, capacity: Optional[int] = None) -> RoutingIndex:
    """Per-expert counts and each slot's destination row (histogram + stable position).

    Args:
        expert_ids_TK: int64 [T, K], -1 for slots already dropped by the router.
        num_experts: E.
        capacity: C for the capacity layout [E, C, D]; None for the dropless layout.
    Returns:
        RoutingIndex with dest_row_TK int64 [T, K] (-1 = dropped), counts_E int64 [E].
    """
    T, K = expert_ids_TK.shape
    ids = expert_ids_TK.t().reshape(-1)  # slot-major: first choices of all tokens come first
    routed = ids >= 0
    sort_key = torch.where(routed, ids, torch.full_like(ids, num_experts))
    order = torch.argsort(sort_key, stable=True)
    all_counts = torch.bincount(sort_key, minlength=num_experts + 1)[:num_experts]
    starts = torch.cumsum(all_counts, 0) - all_counts
    pos_sorted = torch.arange(ids.numel(), device=ids.device) - torch.cat([starts, starts.new_zeros(1)])[sort_key[order]]
    pos = torch.empty_like(pos_sorted)
    pos[order] = pos_sorted
    safe_ids = ids.clamp(min=0)
    if capacity is None:
        dest = starts[safe_ids] + pos
        counts, num_rows = all_counts, int(all_counts.sum())
        keep = routed
    else:
        keep = routed & (pos < capacity)
        dest = safe_ids * capacity + pos
        counts, num_rows = all_counts.clamp(max=capacity), num_experts * capacity
    dest = torch.where(keep, dest, torch.full_like(dest, -1))
    return RoutingIndex(dest.view(K, T).t().contiguous(), counts, num_rows)


def permute(x_TD: torch.Tensor, dest_row_TK: torch.Tensor, num_rows: int) -> torch.Tensor:
    """x_RD[dest_row_TK[t, k]] = x_TD[t]; rows nobody writes stay zero. Returns [R, D]."""
    T, K = dest_row_TK.shape
    flat = dest_row_TK.reshape(-1)
    kept = flat >= 0
    token_of_slot = torch.arange(T, device=x_TD.device).repeat_interleave(K)
    out = x_TD.new_zeros(num_rows, x_TD.shape[1])
    return out.index_copy(0, flat[kept], x_TD.index_select(0, token_of_slot[kept]))


def unpermute(y_RD: torch.Tensor, dest_row_TK: torch.Tensor, weights_TK: Optional[torch.Tensor]) -> torch.Tensor:
    """y_TD[t] = sum over kept k of weights_TK[t, k] * y_RD[dest_row_TK[t, k]].

    Accumulates in fp32 for half inputs; weights None means all ones (the plain inverse of permute).
    Returns [T, D] in y_RD's dtype.
    """
    T, K = dest_row_TK.shape
    kept = dest_row_TK >= 0
    # dropped slots read an appended zero row: valid also when every slot was dropped (R = 0)
    padded_RD = torch.cat([y_RD, y_RD.new_zeros(1, y_RD.shape[1])])
    rows = padded_RD.index_select(0, torch.where(kept, dest_row_TK, y_RD.shape[0]).reshape(-1)).view(T, K, y_RD.shape[1])
    acc_dtype = torch.float32 if y_RD.dtype in (torch.float16, torch.bfloat16) else y_RD.dtype
    w = kept.to(acc_dtype) if weights_TK is None else weights_TK.to(acc_dtype) * kept
    return torch.einsum("tkd,tk->td", rows.to(acc_dtype), w).to(y_RD.dtype)
