"""Local dispatch/combine: tokens -> expert-sorted rows -> tokens. Stateless: metadata is returned.

Legend: T tokens, K slots, D model dim, R routed rows, E experts.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import torch

from moe_sys import ops
from moe_sys.moe.routing import RouterOutput


@dataclass(frozen=True)
class DispatchMeta:
    """What combine needs to undo dispatch: each slot's row and its gate weight."""

    dest_row_TK: torch.Tensor
    weights_TK: torch.Tensor


def dispatch(x_TD: torch.Tensor, routing: RouterOutput, num_experts: int) -> Tuple[torch.Tensor, torch.Tensor, DispatchMeta]:
    """Rows of x_TD sorted by expert (dropless layout).

    Returns:
        x_RD: [R, D] rows grouped by expert id; counts_E: int64 [E] rows per expert; meta.
    """
    index = ops.build_index(routing.expert_ids_TK, num_experts)
    x_RD = ops.permute(x_TD, index.dest_row_TK, index.num_rows)
    return x_RD, index.counts_E, DispatchMeta(index.dest_row_TK, routing.weights_TK)


def combine(y_RD: torch.Tensor, meta: DispatchMeta) -> torch.Tensor:
    """y_TD[t] = sum_k weight[t, k] * y_RD[row of (t, k)]. Returns [T, D]."""
    return ops.unpermute(y_RD, meta.dest_row_TK, meta.weights_TK)
