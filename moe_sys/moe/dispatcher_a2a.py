"""Expert-parallel dispatch: local permute, then all-to-all over an explicitly passed ep_group.

Rank r of the group owns global experts [r*El, (r+1)*El). After the exchange, rows arrive ordered
(source rank, local expert); they are regrouped to (local expert, source rank) so every local
expert sees one contiguous slice. Split sizes need one host sync per exchange (as in Megatron's
dropless all-to-all).

Legend: T tokens, D model dim, R rows, E global experts, El local experts, P = ep group size.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import torch.distributed as dist

from moe_sys.moe import dispatcher
from moe_sys.moe.routing import RouterOutput


class _AllToAll(torch.autograd.Function):
    """all_to_all_single with uneven splits; backward sends gradients back along the same routes."""

    @staticmethod
    def forward(ctx, x_RD, send_splits: List[int], recv_splits: List[int], group):
        ctx.splits, ctx.group = (send_splits, recv_splits), group
        out = x_RD.new_empty(sum(recv_splits), x_RD.shape[1])
        dist.all_to_all_single(out, x_RD.contiguous(), recv_splits, send_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad_RD):
        send_splits, recv_splits = ctx.splits
        return _AllToAll.apply(grad_RD, recv_splits, send_splits, ctx.group), None, None, None


@dataclass(frozen=True)
class A2AMeta:
    local: dispatcher.DispatchMeta
    send_splits: List[int]
    recv_splits: List[int]
    regroup_R: torch.Tensor  # rows in (local expert, source) order, as indices into the received rows
    group: dist.ProcessGroup


def _exchange_counts(counts_E: torch.Tensor, group) -> torch.Tensor:
    """counts_PEl[src, e] = rows that rank src sends to my local expert e."""
    recv = torch.empty_like(counts_E)
    dist.all_to_all_single(recv, counts_E.contiguous(), group=group)
    return recv.view(dist.get_world_size(group), -1)


def _regroup_order(counts_PEl: torch.Tensor) -> torch.Tensor:
    """Permutation taking rows ordered (source, expert) to (expert, source)."""
    P, El = counts_PEl.shape
    chunk = torch.arange(P * El, device=counts_PEl.device)
    chunk_of_row = torch.repeat_interleave(chunk, counts_PEl.reshape(-1))
    return torch.argsort((chunk_of_row % El) * P + chunk_of_row // El, stable=True)


def dispatch(x_TD: torch.Tensor, routing: RouterOutput, num_experts: int,
             group: Optional[dist.ProcessGroup]) -> Tuple[torch.Tensor, torch.Tensor, object]:
    """Returns x_RD for this rank's local experts (contiguous per expert), counts per local expert, meta."""
    x_RD, counts_E, local_meta = dispatcher.dispatch(x_TD, routing, num_experts)
    if group is None or dist.get_world_size(group) == 1:
        return x_RD, counts_E, local_meta
    P = dist.get_world_size(group)
    counts_PEl = _exchange_counts(counts_E, group)
    send_splits = counts_E.view(P, -1).sum(1).tolist()
    recv_splits = counts_PEl.sum(1).tolist()
    x_recv = _AllToAll.apply(x_RD, send_splits, recv_splits, group)
    order = _regroup_order(counts_PEl)
    return x_recv.index_select(0, order), counts_PEl.sum(0), A2AMeta(local_meta, send_splits, recv_splits, order, group)


def combine(y_RD: torch.Tensor, meta) -> torch.Tensor:
    """Inverse of dispatch: rows back to their source ranks, then the weighted local combine."""
    if isinstance(meta, dispatcher.DispatchMeta):
        return dispatcher.combine(y_RD, meta)
    y_recv = torch.empty_like(y_RD).index_copy(0, meta.regroup_R, y_RD)
    y_back = _AllToAll.apply(y_recv, meta.recv_splits, meta.send_splits, meta.group)
    return dispatcher.combine(y_back, meta.local)
