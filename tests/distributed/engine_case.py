"""One DeepSpeed training step of a tiny MoE LM at EP=ep_size over `world` real ranks, against the
same step at EP=1 computed in-process from every rank's batch (shared by the 4- and 8-rank tests).

SGD with a constant lr and no clipping, so the parameter change is exactly -lr * the reduced gradient (lr
is large so that the change of a weight near 1, as RMSNorm's, is not lost to fp32 rounding): dense
gradients must be the mean over all ranks, and expert gradients (reduced over the expert-data-parallel
group only) must equal the EP=1 gradient of the same experts.
"""
import copy

import torch
import torch.distributed as dist

LR = 1000.0
SETS = ["model.n_layers=2", "model.d_model=32", "model.n_heads=2", "model.d_ff=64", "model.max_seq_len=16",
        "data.seq_len=16", "moe.num_experts=8", "moe.top_k=2", "train.grad_clip=0", "train.micro_batch_size=2"]


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def _batch(rank):
    return torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(50 + rank))


def _loss(model, tokens_BS):
    from moe_sys.models.transformer import lm_loss
    from moe_sys.moe import observe

    out = model(tokens_BS)
    loss = lm_loss(out.logits_BSV, torch.roll(tokens_BS, -1, 1), torch.ones_like(tokens_BS))
    return loss + sum(observe.router_losses(out.routings).values())


def _engine(model, cfg, world):
    import deepspeed
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    from moe_sys.parallel.deepspeed_engine import build_ds_config

    groups = split_params_into_different_moe_groups_for_optimizer([{"params": list(model.parameters()), "name": "p"}])
    ds = build_ds_config(cfg, world)
    ds.pop("scheduler")  # a constant lr: the first warm-up step would have lr 0
    ds["zero_allow_untested_optimizer"] = True
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(groups, lr=LR), config=ds)
    return engine


def step_errors(rank, world, ep_size, zero_stage):
    """Relative errors of this rank's loss, dense and expert updates against EP=1; and the size of the
    group each expert parameter's gradient was reduced over."""
    from moe_sys.config import load_config
    from moe_sys.models.transformer import TransformerLM
    from moe_sys.moe import balance
    from moe_sys.parallel.deepspeed_engine import register_moe_layers
    from moe_sys.parallel.experts import shard_and_mark_experts
    from moe_sys.parallel.groups import create_expert_groups

    cfg = load_config(None, SETS + [f"parallel.ep_size={ep_size}", f"parallel.zero_stage={zero_stage}"],
                      world_size=world)
    torch.manual_seed(0)
    model = TransformerLM(cfg.model, cfg.moe)
    ref = copy.deepcopy(model)
    groups = create_expert_groups(ep_size)
    shard_and_mark_experts(model, groups)
    balance.set_group(model, dist.group.WORLD)
    register_moe_layers(model, groups)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    engine = _engine(model, cfg, world)
    loss = _loss(engine, _batch(rank))
    engine.backward(loss)
    engine.step()

    ref_losses = [_loss(ref, _batch(r)) for r in range(world)]
    (sum(ref_losses) / world).backward()  # DeepSpeed averages over data-parallel ranks
    local = slice(groups.ep_rank * 8 // ep_size, (groups.ep_rank + 1) * 8 // ep_size)
    errs = {"loss": _rel(loss.detach(), ref_losses[rank].detach())}
    ref_params = dict(ref.named_parameters())
    for name, p in engine.module.named_parameters():
        expected = -LR * ref_params[name].grad
        if getattr(p, "allreduce", True) is False:
            expected = expected[local]
        errs[name] = _rel(p.detach() - before[name], expected)
    edp = {dist.get_world_size(groups.edp_group)}
    return errs, edp
