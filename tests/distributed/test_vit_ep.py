"""The MoE ViT at EP=2 (two gloo ranks, half the experts each, made DeepSpeed MoE layers) equals EP=1."""
import copy

import torch
import torch.distributed as dist

from tests.distributed.spawn import run_ranks


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def _inputs(rank):
    g = torch.Generator().manual_seed(100 + rank)
    return torch.randn(2, 1, 16, 16, generator=g), torch.randn(2, 32, generator=g)


def _compare(rank, world, top_k, capacity_factor, drop_policy):
    from moe_sys.config.schema import Config
    from moe_sys.models.vit import ViT
    from moe_sys.parallel.deepspeed_engine import DS_EXPERT_PREFIX, register_moe_layers
    from moe_sys.parallel.experts import shard_and_mark_experts
    from moe_sys.parallel.groups import create_expert_groups

    cfg = Config.model_validate({
        "model": {"arch": "vit", "d_model": 32, "n_layers": 4, "n_heads": 4, "d_ff": 48,
                  "vit": {"image_size": 16, "patch_size": 4, "in_channels": 1}},
        "moe": {"num_experts": 4, "top_k": top_k, "every": 2, "first_moe_layer": 1, "activation": "gelu",
                "capacity_factor": capacity_factor, "min_capacity": 1, "router": {"drop_policy": drop_policy}}})
    torch.manual_seed(0)
    full = ViT(cfg.model, cfg.moe)
    ep = copy.deepcopy(full)
    groups = create_expert_groups(world)
    shard_and_mark_experts(ep, groups)
    register_moe_layers(ep, groups)
    assert any(DS_EXPERT_PREFIX in key for key in ep.state_dict())
    assert ep.blocks[1].mlp.experts.w_up_EDF.shape[0] == 4 // world

    x, g = _inputs(rank)
    out = ep(x.requires_grad_())
    (out.features_BD * g).sum().backward()
    dropped = max(float(r.stats["dropped_fraction"]) for r in out.routings)

    ref = None
    for r in range(world):  # EP=1 reference: every rank's images through the full banks
        xr, gr = _inputs(r)
        xr = xr.requires_grad_()
        out_r = full(xr)
        (out_r.features_BD * gr).sum().backward()
        if r == rank:
            ref = (out_r.features_BD.detach(), xr.grad, [float(v) for o in out_r.routings for v in o.losses.values()])
    errs = {"features": _rel(out.features_BD.detach(), ref[0]), "image_grad": _rel(x.grad, ref[1]),
            "router_losses": max(abs(a - b) for a, b in zip(
                [float(v) for o in out.routings for v in o.losses.values()], ref[2]))}
    local = slice(rank * 4 // world, (rank + 1) * 4 // world)
    full_params = dict(full.named_parameters())
    for name, p in ep.named_parameters():
        grad = p.grad.clone()
        if ".experts." in name:
            errs[name] = _rel(grad, full_params[name].grad[local])
        else:  # replicated (attention, dense MLPs, routers, embedding): gradients sum over ranks
            dist.all_reduce(grad)
            errs[name] = _rel(grad, full_params[name].grad)
    return errs, dropped


CASES = [(1, None, "position"), (2, None, "position"), (1, 0.5, "priority"), (2, 0.5, "priority")]


def _compare_all(rank, world):
    return [_compare(rank, world, *case) for case in CASES]


def test_moe_vit_ep2_equals_ep1():
    per_rank = run_ranks(_compare_all, 2)  # one process group for every case
    for rank_results in per_rank:
        for case, (errs, dropped) in zip(CASES, rank_results):
            assert max(errs.values()) < 1e-5, (case, {k: v for k, v in errs.items() if v >= 1e-5})
            if case[1] is not None:
                assert dropped > 0, "capacity 0.5 should drop tokens, else the case proves nothing"
