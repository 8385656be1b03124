"""A checkpoint saved at one expert-parallel size (and world size) continues at another: the losses
after the switch equal an uninterrupted run at the new size, and every expert's Adam moments land on
the rank and slot that now holds that expert.

EP=2 -> 1 on 2 ranks with ZeRO-1 (resharded by ``--resume``), 1 rank EP=1 -> 2 ranks EP=2 with ZeRO-1
(the world grows; by ``--resume``), and 2 ranks EP=2 -> 1 rank EP=1 with ZeRO-0 (resharded offline by
``moe-sys checkpoint reshard``, its CLI entry called in this process), all against one uninterrupted
EP=1 run on 2 ranks. The balancing losses are only the z-loss (a mean
over tokens) and the aux-free bias (global counts): both are the same whether a global batch is cut
into 1 x 4 or 2 x 2 sequences, so runs at different world sizes can be compared.
"""
import torch

from moe_sys import cli
from tests.distributed.spawn import run_ranks
from tests.e2e.conftest import TINY

SETS = ["model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.d_ff=64", "model.max_seq_len=32",
        "data.seq_len=32", "moe.num_experts=4", "train.steps=4", "train.warmup_steps=1", "train.eval_every=1000",
        "train.eval_batches=1", "logging.progress_bar=false", "logging.tensorboard=false", "logging.log_every=1",
        "checkpoint.every=0", "checkpoint.keep=0",
        "moe.balance.losses=[{type: z, coef: 0.001}]", "moe.balance.bias.enabled=true",
        "moe.balance.bias.update_rate=0.01"]
SWITCH = 2  # the step the first invocation stops and saves at
# EP=1 and EP=2 (and 1 vs 2 ranks) sum the same terms in other orders: fp32 reduction noise, measured
# 4.8e-7 at step 4 (docs/design.md, "Resharding"), is allowed.
LOSS_TOL = 1e-5


def _cfg(tmp, world, run, ep, stage, *more):
    from moe_sys.config import load_config

    micro = 4 // world  # a global batch of 4 sequences at every world size
    return load_config(TINY, SETS + [f"parallel.ep_size={ep}", f"parallel.zero_stage={stage}",
                                     f"train.micro_batch_size={micro}", f"logging.run_dir={tmp}/{run}",
                                     f"data.cache_dir={tmp}/cache", *more], world_size=world)


def _train(cfg, **kwargs):
    from moe_sys.train.trainer import train

    return [r["loss"] for r in train(cfg, **kwargs)]


def _optimizer_states(engine, ep):
    """name -> [fp32 master, exp_avg, exp_avg_sq] (an expert bank whole, [E, ...]) read straight from
    the ZeRO optimizer's flat partitions, and the aux-free bias buffers."""
    import torch.distributed as dist

    from moe_sys.parallel.groups import create_expert_groups

    zero = engine.optimizer
    flat_of = {id(p): i for i, group in enumerate(zero.bit16_groups) for p in group}
    ep_group = create_expert_groups(ep).ep_group
    out = {}
    for name, p in engine.module.named_parameters():
        i = flat_of[id(p)]
        fp32 = zero.single_partition_of_fp32_groups[i]
        flats = [fp32] + [zero.optimizer.state[fp32][k] for k in ("exp_avg", "exp_avg_sq")]
        values = []
        for flat in flats:
            whole = torch.zeros(p.numel())
            if p._hp_mapping is not None:  # this rank's piece; the others' arrive by the all-reduce
                hp, lp = p._hp_mapping.hp_fragment_address, p._hp_mapping.lp_fragment_address
                whole.narrow(0, lp.start, lp.numel).copy_(flat.narrow(0, hp.start, hp.numel))
            dist.all_reduce(whole, group=p._dp_group)
            whole = whole.view(p.shape)
            values.append(_gather_rows(whole, ep_group) if getattr(p, "allreduce", True) is False else whole)
        out[name] = values
    out.update({n: [b.clone()] for n, b in engine.module.named_buffers() if n.endswith("bias_E")})
    return out


def _gather_rows(local, group):
    import torch.distributed as dist

    parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, local.contiguous(), group=group)
    return torch.cat(parts)


def _loaded_states(tmp, world, run, ep, stage, tag):
    """A fresh engine (ZeRO ``stage``) at ``ep`` that loaded checkpoint ``tag`` of ``run``; its optimizer states."""
    from moe_sys.tasks import build_task
    from moe_sys.train import checkpoint
    from moe_sys.train.trainer import _build_engine

    cfg = _cfg(tmp, world, run, ep, stage)
    torch.manual_seed(cfg.train.seed)
    engine = _build_engine(build_task(cfg), cfg, world)
    checkpoint.load(engine, cfg.logging.run_dir, tag, ep)
    return _optimizer_states(engine, ep)


def _two_ranks(rank, world, tmp):
    out = {"straight": _train(_cfg(tmp, world, "straight", 1, 1))}  # uninterrupted, EP=1
    # EP=2 -> EP=1 on the same 2 ranks, ZeRO-1, resharded by --resume
    out["shrink"] = _train(_cfg(tmp, world, "shrink", 2, 1, f"train.stop_after={SWITCH}"))
    out["shrink"] += _train(_cfg(tmp, world, "shrink", 1, 1), resume="auto")
    saved = _loaded_states(tmp, world, "shrink", 2, 1, "step_00000002")  # DeepSpeed's own load, same EP
    resharded = _loaded_states(tmp, world, "shrink", 1, 2, "step_00000002-ep1")  # into ZeRO-2
    out["moments_equal"] = {n: all(torch.equal(a, b) for a, b in zip(saved[n], resharded[n])) for n in saved}
    # the first half of EP=2 on 2 ranks -> EP=1 on 1 rank, ZeRO-0 (continued by _one_rank)
    out["to_one_rank"] = _train(_cfg(tmp, world, "to_one_rank", 2, 0, f"train.stop_after={SWITCH}"))
    # the first half of _grow_from_one_rank's 1-rank EP=1 run, continued on 2 ranks at EP=2
    out["grow"] = _train(_cfg(tmp, world, "grow", 2, 1), resume="auto")
    return out


def _grow_from_one_rank(rank, world, tmp):
    return _train(_cfg(tmp, world, "grow", 1, 1, f"train.stop_after={SWITCH}"))


def _one_rank(rank, world, tmp):
    return _train(_cfg(tmp, world, "to_one_rank", 1, 0), resume="auto")


def test_resharded_continuation_matches_uninterrupted_run(tmp_path, capsys):
    grown = run_ranks(_grow_from_one_rank, 1, str(tmp_path))[0]
    out = run_ranks(_two_ranks, 2, str(tmp_path))[0]
    straight = out["straight"]
    assert len(out["shrink"]) == len(straight) == 4
    _close(out["shrink"], straight)
    assert len(grown) == SWITCH and len(out["grow"]) == 4 - SWITCH
    _close(grown + out["grow"], straight)
    experts = [n for n in out["moments_equal"] if "experts" in n]
    assert len(experts) == 6 and all(out["moments_equal"].values()), out["moments_equal"]
    assert sum("bias_E" in n for n in out["moments_equal"]) == 2

    assert cli.main(["checkpoint", "reshard", str(tmp_path / "to_one_rank"), "--ep-size", "1"]) == 0
    assert capsys.readouterr().out.strip().endswith("step_00000002-ep1")
    continued = run_ranks(_one_rank, 1, str(tmp_path))[0]
    assert len(continued) == 4 - SWITCH
    _close(out["to_one_rank"] + continued, straight)
    kept = tmp_path / "to_one_rank" / "checkpoints" / "step_00000002"
    assert (kept / "expp_rank_1_mp_rank_00_optim_states.pt").exists()  # the original stays


def _close(got, want):
    assert max(abs(a - b) for a, b in zip(got, want)) < LOSS_TOL, list(zip(got, want))


def test_reshard_refuses_bad_input_in_one_line(tmp_path, capsys):
    assert cli.main(["checkpoint", "reshard", str(tmp_path / "absent"), "--ep-size", "2"]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'absent'}: no checkpoints directory (not a run directory?)\n"
