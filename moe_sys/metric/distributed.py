"""Gathering embeddings across data-parallel ranks, for losses (with gradients) and for evaluation.

Shape legend: B rows per rank, W data-parallel world size, D embedding width, N rows of all ranks.

Gradient convention. A gathered loss is computed on the whole global batch on every rank, so every
rank holds the same value L. ``all_gather_with_grad`` sums the incoming gradient over ranks in its
backward (each rank's L depends on every rank's rows), so rank r's rows receive W * dL/dx_r and a
parameter that only sees rank r's rows gets W * (rank r's part of dL/dtheta). DeepSpeed (like DDP)
averages gradients over the W ranks, which gives exactly the one-rank gradient of L on the
concatenated batch: (1/W) * sum_r W * g_r = sum_r g_r. Parameters of the loss itself (proxies,
class weights) see the whole batch on every rank, get dL/dP on each, and the average is dL/dP too.
No ``x world_size`` on the loss is needed (pytorch-metric-learning's wrapper multiplies the loss by
W because its gather keeps only the local rows' gradient; that also multiplies the proxies'
gradient by W, which this convention avoids).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn


def gather_world(group: Optional[dist.ProcessGroup] = None) -> int:
    """W for ``group`` (the default group when None), 1 when torch.distributed is not initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def all_gather_with_grad(x_BD: torch.Tensor, group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """[W*B, ...] rows of every rank in rank order, differentiable: torch's own autograd all-gather,
    whose backward sums the gradient over ranks (reduce-scatter; all-to-all + sum on gloo) and hands
    each rank its rows' part (see the module docstring for the scaling).

    Every rank must pass the same B (the metric samplers hand out equal per-rank batches).
    """
    return torch.cat(dist_nn.all_gather(x_BD.contiguous(), group=group or dist.group.WORLD))


def gather_batch(emb_BD: torch.Tensor, labels_B: torch.Tensor,
                 group: Optional[dist.ProcessGroup] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """The global batch: embeddings with gradients, labels without; identity on one rank."""
    if gather_world(group) == 1:
        return emb_BD, labels_B
    labels_N = [torch.empty_like(labels_B) for _ in range(dist.get_world_size(group))]
    dist.all_gather(labels_N, labels_B.contiguous(), group=group)
    return all_gather_with_grad(emb_BD, group), torch.cat(labels_N)


def all_gather_rows(x_BX: torch.Tensor, group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """Concatenate every rank's rows in rank order, no gradient; ranks may hold different B.

    Evaluation shards are uneven, so rows are padded to the largest B for the collective and the
    padding is cut off again.
    """
    if gather_world(group) == 1:
        return x_BX
    world = dist.get_world_size(group)
    count = torch.tensor([x_BX.shape[0]], device=x_BX.device)
    counts = [torch.empty_like(count) for _ in range(world)]
    dist.all_gather(counts, count, group=group)
    most = int(max(c.item() for c in counts))
    padded = x_BX.new_zeros((most, *x_BX.shape[1:]))
    padded[:x_BX.shape[0]] = x_BX.detach()
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([p[:int(c.item())] for p, c in zip(parts, counts)])
