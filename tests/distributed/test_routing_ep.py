"""Every router at EP=2 (two gloo ranks) equals EP=1, and the balancing state that crosses ranks
(global-batch counts, aux-loss-free bias) is summed over them and stays identical on both."""
import copy

import pytest
import torch
import torch.distributed as dist

from tests.distributed.spawn import run_ranks
from tests.tolerance import bound, seed
from tests.tolerance import rel_err as _rel

B, S, D, E = 2, 12, 16, 8


def _specs():
    from moe_sys.moe.balance import BalanceSpec
    from moe_sys.moe.capacity import Capacity
    from moe_sys.moe.routing import RouterSpec
    from moe_sys.moe.scoring import Selection

    losses = BalanceSpec((("switch", 0.01), ("seq", 0.01), ("z", 0.001), ("mi", 0.01)), bias_rate=1e-3)
    return {
        "topk_sigmoid_groups_probs_drop": ("topk", RouterSpec(
            selection=Selection("sigmoid", num_groups=4, group_topk=2), balance=losses,
            capacity=Capacity(0.5, min_capacity=1, drop_policy="probs"))),
        "topk_post_softmax_k3": ("topk", RouterSpec(selection=Selection(pre_softmax=False), balance=losses)),
        "expert_choice": ("expert_choice", RouterSpec(balance=BalanceSpec((("z", 0.001),)))),
        "example": ("example", RouterSpec(balance=losses)),
        "task_embedding": ("task", RouterSpec(balance=losses)),
        "task_table": ("task", RouterSpec(balance=BalanceSpec(()), task_table=((0, 1, 2), (3, 4, 5), (6, 7, 0)))),
    }


def _batch(rank):
    from moe_sys.moe.routing import RoutingContext

    g = torch.Generator().manual_seed(seed(200 + rank))
    mask = torch.ones(B, S)
    mask[1, S - 3 - rank:] = 0  # padding differs per rank
    ctx = RoutingContext((B, S), torch.tensor([rank, 2]), mask)
    return torch.randn(B, S, D, generator=g), torch.randn(B, S, D, generator=g), ctx


# Longest chain of summed terms: the expert FFN (D, then 24), top-3 combine and the shared expert,
# pooled routers over a sequence (S), weight gradients over every rank's tokens (2 x B x S).
REDUCTION = D + 24 + 3 + 24 + S + 2 * B * S


def _compare(rank, world, router, spec):
    from moe_sys.moe.layer import MoELayer
    from moe_sys.parallel.experts import shard_and_mark_experts
    from moe_sys.parallel.groups import create_expert_groups

    torch.manual_seed(seed(0))
    full = MoELayer(D, 24, E, 3, router=router, spec=spec, num_tasks=3, shared_experts=1, shared_gate=True)
    ep = copy.deepcopy(full)
    shard_and_mark_experts(ep, create_expert_groups(world))
    x, g, ctx = _batch(rank)
    x = x.requires_grad_()
    y, routing = ep(x, ctx)
    ((y * g).sum() + sum(routing.losses.values(), torch.zeros(()))).backward()
    ref = {}
    for r in range(world):  # EP=1 reference: every rank's tokens through the full bank
        xr, gr, ctx_r = _batch(r)
        xr = xr.requires_grad_()
        yr, routing_r = full(xr, ctx_r)
        ((yr * gr).sum() + sum(routing_r.losses.values(), torch.zeros(()))).backward()
        if r == rank:
            ref = {"y": yr.detach(), "x_grad": xr.grad}
    errs = {"y": _rel(y.detach(), ref["y"]), "x_grad": _rel(x.grad, ref["x_grad"])}
    replicated = dict(full.named_parameters())
    for name, p in ep.named_parameters():  # replicated params: gradient sums over ranks
        grad = p.grad.clone()
        if name.startswith("experts."):
            local = slice(rank * E // world, (rank + 1) * E // world)
            errs[name] = _rel(grad, replicated[name].grad[local])
        else:
            dist.all_reduce(grad)
            errs[name] = _rel(grad, replicated[name].grad)
    return errs


def _global_loss_and_bias(rank, world):
    """Global-batch counts and bias loads are summed over the group; both ranks end identical."""
    from moe_sys.moe import balance
    from moe_sys.moe.balance import Balancer, BalanceSpec
    from moe_sys.moe.routing import RoutingContext, token_rows

    balancer = Balancer(4, BalanceSpec((("global", 1.0),), bias_rate=0.1)).train()
    balance.set_group(balancer, dist.group.WORLD)
    rows = token_rows(RoutingContext((1, 2)), "cpu")
    chosen = torch.tensor([[0], [0]]) if rank == 0 else torch.tensor([[0], [1]])  # global counts [3, 1, 0, 0]
    probs = torch.full((2, 4), 0.25) if rank == 0 else torch.tensor([[0.7, 0.1, 0.1, 0.1]] * 2)
    loss = balancer.losses(torch.zeros(2, 4), probs, chosen, rows)["global"]
    balancer.observe(chosen, rows)
    balance.step(balancer)
    return float(loss), balancer.bias_E.tolist()


def _all_cases(rank, world):
    results = {name: _compare(rank, world, router, spec) for name, (router, spec) in _specs().items()}
    results["global_and_bias"] = _global_loss_and_bias(rank, world)
    return results


def test_every_router_at_ep2_equals_ep1_and_balancing_state_is_global():
    per_rank = run_ranks(_all_cases, 2)  # one spawn for all cases: process start-up dominates
    for rank, results in enumerate(per_rank):
        for name in _specs():
            errs = results[name]
            assert max(errs.values()) < bound(torch.float32, REDUCTION), (rank, name, errs)
        loss, bias = results["global_and_bias"]
        # f = [3, 1, 0, 0] / 4 on both ranks; P is each rank's own mean probability.
        P = [0.25] * 4 if rank == 0 else [0.7, 0.1, 0.1, 0.1]
        assert abs(loss - 4 * (0.75 * P[0] + 0.25 * P[1])) < 1e-6
        assert bias == per_rank[0]["global_and_bias"][1], "replicated routers must keep identical biases"
        assert bias == pytest.approx([-0.1, 0.0, 0.1, 0.1])  # mean load 1: sign(1 - [3, 1, 0, 0])
