"""Adapter experts (in the LM and, task-routed, in the ViT), SMEAR and adapter saving at EP=2 (two real gloo
ranks) against EP=1; DeepSpeed ZeRO 1/2.

One spawn runs every case: process start-up dominates.
"""
import copy
import os

import torch
import torch.distributed as dist

from tests.distributed.spawn import run_ranks
from tests.tolerance import bound, seed
from tests.tolerance import rel_err as _rel

D, E, B, S = 16, 4, 3, 8
LAYER_CASES = {
    "mixture-lora-topk": {"type": "mixture", "name": "m", "top_k": 2, "expert": {"kind": "lora", "rank": 3}},
    "mixture-bottleneck-task": {"type": "mixture", "name": "m", "top_k": 2, "router": {"type": "task"},
                                "expert": {"kind": "bottleneck", "rank": 5}},
    "mixture-lora-example-params": {"type": "mixture", "name": "m", "top_k": 2, "aggregation": "params",
                                    "router": {"type": "example", "allow_noncausal": True}},
    "smear-lora": {"type": "smear", "name": "m", "segments": 2},
    "smear-bottleneck": {"type": "smear", "name": "m", "segments": 2, "expert": {"kind": "bottleneck"}},
    "ensemble-lora": {"type": "smear", "name": "m", "segments": 2, "aggregation": "outputs"},
}


# Longest chain of summed terms into one compared value. Layers: the base SwiGLU (D, then 24), the
# adapter experts (D, their rank, E), segment pooling (S) and gradients over every rank's examples
# (2 x B x S). Models (tests.unit.test_adapters.tiny_lm): per layer attention over 16 positions,
# d_model 32 (twice) and d_ff 64, then the 256-way output.
LAYER_REDUCTION = D + 24 + D + 8 + E + S + 2 * B * S
MODEL_REDUCTION = 2 * (16 + 32 + 32 + 64) + 32 + 256
FLOOR = ":fp32 floor"  # results key of a layer case's float64-measured floors (tests/tolerance.py)


def _inputs(rank):
    g = torch.Generator().manual_seed(seed(100 + rank))
    return torch.randn(B, S, D, generator=g), torch.randn(B, S, D, generator=g), torch.tensor([0, 1, 2]).roll(rank)


def _layer(spec):
    from moe_sys.adapters.base import ADAPTERS, Site
    from moe_sys.config.adapters import AdaptersConfig
    from moe_sys.models.transformer import SwiGLU
    from tests.unit.test_adapters import randomize

    spec = AdaptersConfig.model_validate({"modules": [spec]}).modules[0]
    torch.manual_seed(seed(0))
    layer = ADAPTERS[spec.type].build(SwiGLU(D, 24), spec, Site("ffn", D, 3))
    randomize(layer, std=0.3, seed=seed(3))
    return layer


def _compare_layer(rank, world, spec):
    """EP=2 forward and gradients of one adapter-expert layer equal EP=1 on the same weights and inputs."""
    from moe_sys.moe.routing import RoutingContext
    from moe_sys.parallel.experts import shard_and_mark
    from moe_sys.parallel.groups import create_expert_groups

    full = _layer(spec)
    ep, full64 = copy.deepcopy(full), copy.deepcopy(full).double()
    shard_and_mark(ep, create_expert_groups(world))
    x, g, dom = _inputs(rank)
    x = x.requires_grad_()
    y, _ = ep(x, RoutingContext((B, S), dom))
    (y * g).sum().backward()
    for r in range(world):  # EP=1: every rank's examples through the full bank
        xr, gr, dr = _inputs(r)
        xr = xr.requires_grad_()
        yr, _ = full(xr, RoutingContext((B, S), dr))
        (yr * gr).sum().backward()
        if r == rank:
            ref_y, ref_xgrad = yr.detach(), xr.grad
    x64 = x.detach().double().requires_grad_()
    y64, _ = full64(x64, RoutingContext((B, S), dom))
    (y64 * g.double()).sum().backward()
    floors = {"y": _rel(ref_y, y64), "x_grad": _rel(ref_xgrad, x64.grad)}  # the fp32 reference's own error
    errs = {"y": _rel(y.detach(), ref_y), "x_grad": _rel(x.grad, ref_xgrad)}
    for name, p in ep.router.named_parameters():  # replicated: gradients sum over ranks
        grad = p.grad.clone()
        dist.all_reduce(grad)
        errs["router." + name] = _rel(grad, dict(full.router.named_parameters())[name].grad)
    local = slice(rank * E // world, (rank + 1) * E // world)
    for name, p in ep.experts.named_parameters():
        errs[name] = _rel(p.grad, dict(full.experts.named_parameters())[name].grad[local])
        assert p.allreduce is False and p.shape[0] == E // world
    return errs, floors


MODEL_SPECS = [{"type": "lora", "name": "dom", "targets": ["layers.*.attn.qkv"], "select": "domain",
                "slots": ["code", "prose"]},
               {"type": "mixture", "name": "tasks", "targets": ["layers.0.ffn"], "top_k": 2,
                "router": {"type": "task", "task_table": [[0, 1], [2, 3], [1, 3]]}, "balance": {"losses": []}},
               {"type": "smear", "name": "sm", "targets": ["layers.1.ffn"], "segments": 4}]


def _model_cases(rank, world, tmp):
    """Mixed-domain batches with task-routed experts under EP equal each example alone; adapters saved
    from EP ranks load onto a single-device model."""
    from moe_sys.adapters import inject, io
    from moe_sys.config.adapters import AdaptersConfig
    from moe_sys.parallel.experts import is_expert_parallel, shard_and_mark
    from moe_sys.parallel.groups import create_expert_groups
    from tests.unit.test_adapters import DOMAINS, batch, randomize, tiny_lm

    cfg = AdaptersConfig.model_validate({"modules": MODEL_SPECS})
    model = tiny_lm(seed(0))
    inject.inject(model, cfg, DOMAINS)
    randomize(model, seed=seed(3))  # the same on every rank: same seed, before sharding
    full = copy.deepcopy(model)
    for layer in inject.adapter_layers(model):
        if is_expert_parallel(layer):
            shard_and_mark(layer, create_expert_groups(world))
    model.eval()
    tokens, domains = batch(B=3, seed=seed(10 + rank))
    mixed = model(tokens, domains).logits_BSV
    errs = {"ep_vs_full": _rel(mixed, full.eval()(tokens, domains).logits_BSV)}
    for b in range(3):  # every rank runs its b-th example alone, in lockstep (the all-to-all needs both)
        inject.set_active(model, "dom", DOMAINS[int(domains[b])] if domains[b] < 2 else None)
        alone = model(tokens[b:b + 1], domains[b:b + 1]).logits_BSV
        errs[f"alone_{b}"] = _rel(mixed[b:b + 1], alone)
    inject.set_per_domain(model, "dom", ["code", "prose", None])
    io.save_adapters(model, tmp)  # gathers the sharded experts
    dist.barrier()
    fresh = tiny_lm(seed(0))
    inject.attach(fresh, tmp, DOMAINS)
    errs["reloaded"] = _rel(fresh.eval()(tokens, domains).logits_BSV, mixed)
    return errs


def _zero_cases(rank, world, tmp, stage):
    """A DeepSpeed engine at ZeRO `stage` with EP=2 adapter experts: one step trains only adapters; the
    adapters saved from it and its DeepSpeed checkpoint reload; merging LoRA keeps the output."""
    from moe_sys.adapters import inject, io
    from moe_sys.config import load_config
    from moe_sys.models.transformer import lm_loss
    from moe_sys.parallel import deepspeed_engine
    from moe_sys.parallel.groups import create_expert_groups
    from moe_sys.train import checkpoint
    from moe_sys.train.optim import build_optimizer
    from moe_sys.weights.io import read_model_weights
    from tests.unit.test_adapters import DOMAINS, batch, tiny_lm

    cfg = load_config(None, ["model.n_layers=2", "model.d_model=32", "model.n_heads=2", "model.d_ff=64",
                             "model.max_seq_len=16", "data.seq_len=16", "moe.enabled=false",
                             f"parallel.zero_stage={stage}", "train.micro_batch_size=3", "train.lr=0.01",
                             "train.warmup_steps=1"])
    cfg.adapters = cfg.adapters.model_validate({"modules": MODEL_SPECS})
    model, groups = tiny_lm(seed(0)), create_expert_groups(world)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    inject.inject(model, cfg.adapters, DOMAINS, groups)
    deepspeed_engine.register_moe_layers(model, groups)
    engine, _ = deepspeed_engine.initialize(model, build_optimizer(model, cfg.train), cfg, world)
    before = {k: v.clone() for k, v in io.adapter_state_dict(engine.module).items()}  # it aliases live params
    tokens, domains = batch(B=3, seed=seed(20 + rank))
    for _ in range(3):  # DeepSpeed's warm-up gives the first two steps learning rate 0
        out = engine(tokens, domains)
        engine.backward(lm_loss(out.logits_BSV, torch.roll(tokens, -1, 1), torch.ones(tokens.shape)))
        engine.step()
    after = io.adapter_state_dict(engine.module)
    errs = {"adapters_moved": min(float((after[k] - before[k]).abs().max()) for k in after if "B_NRO" in k)}
    errs["base_still"] = max(float((p - base[n.replace("base_layer.", "")]).abs().max())
                             for n, p in engine.module.named_parameters() if n.replace("base_layer.", "") in base)
    engine.eval()
    expected = engine(tokens, domains).logits_BSV
    io.save_adapters(engine.module, os.path.join(tmp, "adapters"))
    checkpoint.save(engine, tmp, 1, {}, keep=0)
    inject.set_active(engine.module, "dom", "code")
    unmerged = engine(tokens, domains).logits_BSV
    inject.merge(engine.module, "dom")
    errs["merged"] = _rel(engine(tokens, domains).logits_BSV, unmerged)
    inject.unmerge(engine.module, "dom")
    fresh = tiny_lm(seed(0))
    inject.attach(fresh, os.path.join(tmp, "adapters"), DOMAINS)
    errs["reloaded"] = _rel(fresh.eval()(tokens, domains).logits_BSV, expected)
    from_ckpt = read_model_weights(tmp)
    errs["checkpoint"] = max(_rel(from_ckpt[k], v) for k, v in after.items())
    return errs, _resume_cases(engine, cfg, tmp, rank)


def _resume_cases(engine, cfg, tmp, rank):
    """A resumed run uses its own config's optimizer settings, where DeepSpeed alone restores the saved
    ones; DeepSpeed's own loads of model, expert and optimizer files refuse a pickle that runs code
    (called directly: ``--resume`` would refuse the changed files at the manifest check already)."""
    from moe_sys.parallel import deepspeed_engine
    from moe_sys.safe_load import UnsafeFileError
    from moe_sys.train import checkpoint
    from tests.unit.test_safe_load import write_marker_pickle

    groups = engine.optimizer.param_groups
    settings, lrs = deepspeed_engine.optimizer_settings(engine), [g["lr"] for g in groups]
    for g in groups:  # the run that saved had other settings
        g.update(betas=(0.5, 0.6), weight_decay=0.25)
    engine.optimizer.clip_grad = 7.0
    checkpoint.save(engine, tmp, 2, {}, keep=0)
    for g in groups:
        g.update(lr=123.0)
    engine.optimizer.clip_grad = cfg.train.grad_clip
    checkpoint.load(engine, tmp, "strict")
    groups = engine.optimizer.param_groups  # loading the optimizer state replaced the group dicts
    out = {"deepspeed_restores_saved": groups[0]["betas"] == (0.5, 0.6) and engine.optimizer.clip_grad == 7.0}
    deepspeed_engine.reapply_settings(engine, settings, cfg.train.grad_clip)
    out["config_wins"] = (all(g["betas"] == tuple(cfg.train.betas) for g in groups)
                          and [g["weight_decay"] for g in groups] == [s["weight_decay"] for s in settings]
                          and engine.optimizer.clip_grad == cfg.train.grad_clip)
    out["lr_from_schedule"] = [g["lr"] for g in groups] == lrs
    tag_dir = os.path.join(checkpoint.checkpoint_dir(tmp), "step_00000002")
    marker = os.path.join(tmp, f"marker{rank}")
    experts = sorted(n for n in os.listdir(tag_dir) if n.startswith("layer_0_expert_"))
    own_expert = experts[rank * len(experts) // dist.get_world_size()]  # every rank fails at the same load
    for name, shared in (("mp_rank_00_model_states.pt", True), (own_expert, False),
                         (f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt", False)):
        path = os.path.join(tag_dir, name)
        with open(path, "rb") as f:
            saved = f.read()
        dist.barrier()
        if rank == 0 or not shared:
            write_marker_pickle(path, marker)
        dist.barrier()
        try:
            engine.load_checkpoint(checkpoint.checkpoint_dir(tmp), tag="step_00000002")
            out[f"refused {name}"] = False
        except UnsafeFileError as e:
            out[f"refused {name}"] = name in str(e)
        dist.barrier()
        if rank == 0 or not shared:
            with open(path, "wb") as f:
                f.write(saved)
    out["no_marker"] = not os.path.exists(marker)
    return out


VIT_SPEC = {"type": "mixture", "name": "tx", "targets": ["blocks.1.mlp"], "num_experts": E, "top_k": 2,
            "router": {"type": "task"}, "expert": {"kind": "bottleneck", "rank": 5},
            "balance": {"losses": [{"type": "mi", "coef": 0.5}, {"type": "switch", "coef": 0.5}]}}
# ViT of D 16, two blocks over 17 tokens (16 patches + class token), MLP 24, bottleneck 5, over both ranks' 3 images.
VIT_REDUCTION = D + 24 + 5 + E + 2 * 3 * 17


def _vit_task_experts(rank, world):
    """Task-routed bottleneck experts beside a ViT block's MLP at EP=2 equal EP=1, each image routed by its
    task id (the multitask task's domain_ids): features, the MI and switch losses, every gradient."""
    from moe_sys.adapters import inject
    from moe_sys.config.adapters import AdaptersConfig
    from moe_sys.config.schema import Config
    from moe_sys.models.vit import ViT
    from moe_sys.parallel.experts import is_expert_parallel, shard_and_mark
    from moe_sys.parallel.groups import create_expert_groups
    from tests.unit.test_adapters import randomize

    cfg = Config.model_validate({"model": {"arch": "vit", "d_model": D, "n_layers": 2, "n_heads": 2, "d_ff": 24,
                                           "vit": {"image_size": 16, "patch_size": 4, "in_channels": 1}},
                                 "moe": {"enabled": False}})
    torch.manual_seed(seed(0))
    full = ViT(cfg.model, cfg.moe, num_domains=3)
    inject.inject(full, AdaptersConfig.model_validate({"modules": [VIT_SPEC]}), ["S", "D", "N"])
    randomize(full, std=0.3, seed=seed(3))
    ep = copy.deepcopy(full)
    for layer in inject.adapter_layers(ep):
        if is_expert_parallel(layer):
            shard_and_mark(layer, create_expert_groups(world))

    def run(model, r):
        g = torch.Generator().manual_seed(seed(200 + r))
        x, w = torch.randn(3, 1, 16, 16, generator=g).requires_grad_(), torch.randn(3, D, generator=g)
        out = model(x, torch.tensor([0, 1, 1]).roll(r))
        aux = sum(v for o in out.routings for v in o.losses.values())
        ((out.features_BD * w).sum() + aux).backward()
        return out.features_BD.detach(), aux.detach(), x.grad

    got = run(ep, rank)
    ref = [run(full, r) for r in range(world)][rank]  # EP=1: every rank's images through the full bank
    errs = {"features": _rel(got[0], ref[0]), "aux_losses": _rel(got[1], ref[1]), "image_grad": _rel(got[2], ref[2])}
    full_params = dict(full.named_parameters())
    local = slice(rank * E // world, (rank + 1) * E // world)
    for name, p in ep.named_parameters():
        if p.grad is None:
            continue
        if getattr(p, "allreduce", True) is False:
            errs[name] = _rel(p.grad, full_params[name].grad[local])
        else:  # replicated (the task embedding and gate): gradients sum over ranks
            grad = p.grad.clone()
            dist.all_reduce(grad)
            errs[name] = _rel(grad, full_params[name].grad)
    assert any(getattr(p, "allreduce", True) is False for p in ep.parameters())
    return errs


def _all_cases(rank, world, tmp):
    out = {}
    for name, spec in LAYER_CASES.items():
        out[name], out[name + FLOOR] = _compare_layer(rank, world, spec)
    out["model"] = _model_cases(rank, world, os.path.join(tmp, "model"))
    out["vit-task-experts"] = _vit_task_experts(rank, world)
    for stage in (1, 2):
        out[f"zero{stage}"], out[f"resume_zero{stage}"] = _zero_cases(rank, world, os.path.join(tmp, f"zero{stage}"), stage)
    return out


def test_adapter_experts_smear_and_saving_at_ep2(tmp_path):
    for rank_results in run_ranks(_all_cases, 2, str(tmp_path)):
        for case in [c for c in rank_results if c.startswith("resume_")]:
            checks = rank_results.pop(case)
            assert all(checks.values()), (case, checks)
        for case, errs in rank_results.items():
            if case.endswith(FLOOR):
                continue
            moved = errs.pop("adapters_moved", 1.0)
            assert moved > 0, f"{case}: the optimizer step left the adapters unchanged"
            reduction = LAYER_REDUCTION if case in LAYER_CASES else VIT_REDUCTION if case == "vit-task-experts" else MODEL_REDUCTION
            floors = rank_results.get(case + FLOOR, {})
            for key, err in errs.items():
                assert err < bound(torch.float32, reduction, floors.get(key, 0.0)), (case, key, errs, floors)
