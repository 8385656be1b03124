"""EP=2 (two gloo ranks, half the experts each) must equal EP=1 on the same weights and inputs."""
import copy

import torch
import torch.distributed as dist

from tests.distributed.spawn import run_ranks
from tests.tolerance import bound, seed
from tests.tolerance import rel_err as _rel


# Longest chain of summed terms into one compared value: the expert FFN (D, then F), top-k combine,
# and weight gradients summed over every rank's tokens (2 x 24).
REDUCTION = 16 + 32 + 2 + 2 * 24


def _inputs(rank, T=24, D=16):
    g = torch.Generator().manual_seed(seed(100 + rank))
    return torch.randn(1, T, D, generator=g), torch.randn(1, T, D, generator=g)


def _compare(rank, world, top_k, capacity_factor):
    from moe_sys.moe.capacity import Capacity
    from moe_sys.moe.layer import MoELayer
    from moe_sys.moe.routing import RouterSpec
    from moe_sys.parallel.experts import shard_and_mark_experts
    from moe_sys.parallel.groups import create_expert_groups

    torch.manual_seed(seed(0))
    full = MoELayer(16, 32, num_experts=8, top_k=top_k,
                    spec=RouterSpec(capacity=Capacity(factor=capacity_factor, min_capacity=1)))
    ep = copy.deepcopy(full)
    groups = create_expert_groups(world)
    shard_and_mark_experts(ep, groups)
    assert ep.experts.w_up_EDF.shape[0] == 8 // world

    x, g = _inputs(rank)
    x = x.requires_grad_()
    y, routing = ep(x)
    (y * g).sum().backward()
    dropped = float(routing.stats["dropped_fraction"])

    ref_y = ref_xgrad = None
    for r in range(world):  # EP=1 reference: every rank's tokens through the full bank
        xr, gr = _inputs(r)
        xr = xr.requires_grad_()
        yr, _ = full(xr)
        (yr * gr).sum().backward()
        if r == rank:
            ref_y, ref_xgrad = yr.detach(), xr.grad
    router_grad = ep.router.gate.weight.grad.clone()
    dist.all_reduce(router_grad)  # the router is replicated: its gradient sums over ranks
    local = slice(rank * 8 // world, (rank + 1) * 8 // world)
    errs = {"y": _rel(y.detach(), ref_y), "x_grad": _rel(x.grad, ref_xgrad),
            "router_grad": _rel(router_grad, full.router.gate.weight.grad)}
    for name, p in ep.experts.named_parameters():
        errs[name] = _rel(p.grad, getattr(full.experts, name).grad[local])
    return errs, dropped


CASES = [(k, cf) for k in (1, 2) for cf in (None, 0.5)]


def _compare_all(rank, world):
    return [_compare(rank, world, k, cf) for k, cf in CASES]


def test_ep2_equals_ep1_top1_top2_with_and_without_dropping():
    per_rank = run_ranks(_compare_all, 2)  # one spawn for all cases: process start-up dominates
    for rank_results in per_rank:
        for (top_k, cf), (errs, dropped) in zip(CASES, rank_results):
            assert max(errs.values()) < bound(torch.float32, REDUCTION), (top_k, cf, errs)
            if cf is not None:
                assert dropped > 0, "capacity 0.5 should drop tokens, else the case proves nothing"
