"""Whole training steps (forward, backward, optimizer) of one small MoE LM at EP=2 over 2 gloo ranks:
moe_sys's MoE FFN vs DeepSpeed's ``deepspeed.moe.layer.MoE`` in the same slots.

Run from the repository root: ``python -m bench.train_step [--reps N] [--top-k 1 2] [--no-write] [--profile]``.

Both models are one TransformerLM built from one seed: the DeepSpeed twin is a copy whose MoE blocks
are replaced by ``MoE(expert=SwiGLU(D, F), ep_size=2)`` holding the same router and expert weights
(each rank its half of the experts), so step 1 computes the same function. Both go through the same
engine config (``deepspeed_engine.initialize`` with ``build_optimizer``: AdamW, warm-up/cosine schedule,
gradient clipping) and pay the same loss: next-token cross-entropy + 0.01 x the Switch aux loss
(DeepSpeed's ``l_aux``; our z-loss is off to match). Capacity: the same C = max(ceil(T/E * cf*K), 4) per
rank and slot-major position drops (DeepSpeed top-1 with ``use_rts=False``, top-2 with
``top2_2nd_expert_sampling=False``); "dropless" is ours without capacity vs DeepSpeed's
``drop_tokens=False`` (every expert padded to the busiest one's count, max over the EP group).
A sample is one step; the contenders alternate step by step (bench.common.time_interleaved) after warm-up.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
from pathlib import Path
from typing import Dict, List, Optional

if __package__ in (None, ""):  # `python bench/train_step.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.distributed as dist
import torch.nn as nn

from bench import common
from bench.moe_layer import deepspeed_moe
from moe_sys.parallel.local_launch import threads_per_rank

WORLD, EP = 2, 2


def model_sets(experts: int, width: int) -> List[str]:
    """The benchmarked model: 8 experts of width 512 by default; many narrow (fine-grained) experts by flag."""
    return ["model.d_model=256", "model.n_layers=4", "model.n_heads=4", f"model.d_ff={width}",
            "model.max_seq_len=256", "data.seq_len=256", "train.micro_batch_size=8", f"moe.num_experts={experts}",
            f"parallel.ep_size={EP}", "moe.balance.losses=[{type: switch, coef: 0.01}]"]


OURS, DEEPSPEED = "moe_sys", "deepspeed MoE"


class DeepSpeedFFN(nn.Module):
    """DeepSpeed's MoE in a Block's FFN slot: returns the output only (Block adds it to the residual);
    the loss reads the gate's aux loss where DeepSpeed keeps it, ``moe.deepspeed_moe.l_aux``."""

    def __init__(self, moe: nn.Module):
        super().__init__()
        self.moe = moe

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        return self.moe(x_BSD)[0]


def deepspeed_twin(layer, top_k: int, capacity_factor: Optional[float], min_capacity: int, ep_rank: int) -> DeepSpeedFFN:
    """DeepSpeed's MoE holding ``layer``'s router and this rank's experts (global experts
    [ep_rank*El, (ep_rank+1)*El), DeepSpeed's placement too) as SwiGLU modules."""
    from moe_sys.models.transformer import SwiGLU

    bank = layer.experts
    E, D, F_ = bank.w_up_EDF.shape
    moe = deepspeed_moe(D, SwiGLU(D, F_), E, top_k, EP, capacity_factor, min_capacity, use_rts=False,
                        top2_2nd_expert_sampling=False)
    local = E // EP
    with torch.no_grad():
        moe.deepspeed_moe.gate.wg.weight.copy_(layer.router.gate.weight)
        for i, expert in enumerate(moe.deepspeed_moe.experts.deepspeed_experts):
            e = ep_rank * local + i
            expert.gate.weight.copy_(bank.w_gate_EDF[e].t())
            expert.up.weight.copy_(bank.w_up_EDF[e].t())
            expert.down.weight.copy_(bank.w_down_EFD[e].t())
    return DeepSpeedFFN(moe)


def engines(cfg, ep_rank: int):
    """(ours, deepspeed) engines over models equal at step 0."""
    from moe_sys.models.transformer import TransformerLM
    from moe_sys.moe import balance
    from moe_sys.parallel import deepspeed_engine
    from moe_sys.parallel.experts import shard_and_mark_experts
    from moe_sys.parallel.groups import create_expert_groups
    from moe_sys.train.optim import build_optimizer

    torch.manual_seed(0)
    ours = TransformerLM(cfg.model, cfg.moe)
    twin = copy.deepcopy(ours)
    for block, own in zip(twin.layers, ours.layers):
        block.ffn = deepspeed_twin(own.ffn, cfg.moe.top_k, cfg.moe.capacity_factor, cfg.moe.min_capacity, ep_rank)
    # The trainer's order (moe_sys.train.trainer._build_engine), adapters aside.
    groups = create_expert_groups(EP)
    shard_and_mark_experts(ours, groups)
    balance.set_group(ours, dist.group.WORLD)
    deepspeed_engine.register_moe_layers(ours, groups)
    return {name: deepspeed_engine.initialize(model, build_optimizer(model, cfg.train), cfg, WORLD)[0]
            for name, model in ((OURS, ours), (DEEPSPEED, twin))}


def step_loss(name: str, engine, tokens_BS: torch.Tensor, aux_coef: float) -> torch.Tensor:
    from moe_sys.models.transformer import lm_loss
    from moe_sys.moe import observe

    out = engine(tokens_BS)
    loss = lm_loss(out.logits_BSV, torch.roll(tokens_BS, -1, 1), torch.ones_like(tokens_BS))
    if name == OURS:
        return loss + sum(observe.router_losses(out.routings).values())
    return loss + aux_coef * sum(m.moe.deepspeed_moe.l_aux for m in engine.module.modules() if isinstance(m, DeepSpeedFFN))


def train_step(name: str, engine, tokens_BS: torch.Tensor, aux_coef: float):
    """One optimizer step as the trainer takes it: engine forward, engine.backward, engine.step."""
    def run():
        loss = step_loss(name, engine, tokens_BS, aux_coef)
        engine.backward(loss)
        engine.step()
        return loss.detach()
    return run


def rank_main(rank: int, world: int, sets: List[str], top_k: int, capacity_factor: Optional[float], reps: int,
              warmup: int, profile: bool) -> Dict:
    """Per rank: both engines, the step-1 losses, then interleaved timed steps (and a profile)."""
    from moe_sys import ops
    from moe_sys.config import load_config

    torch.set_num_threads(threads_per_rank(WORLD))  # one share of the cores per rank
    common.set_malloc("warm")
    ops.set_impl("kernel")
    cf = "null" if capacity_factor is None else capacity_factor
    cfg = load_config(None, sets + [f"moe.top_k={top_k}", f"moe.capacity_factor={cf}"], world_size=world)
    built = engines(cfg, rank)
    tokens_BS = torch.randint(0, cfg.model.vocab_size, (cfg.train.micro_batch_size, cfg.data.seq_len),
                              generator=torch.Generator().manual_seed(100 + rank))
    coef = cfg.moe.balance.losses[0].coef
    steps = {name: train_step(name, engine, tokens_BS, coef) for name, engine in built.items()}
    first = {name: float(run()) for name, run in steps.items()}  # equal weights: same function
    samples = common.time_interleaved(steps, reps, warmup)
    result = {"samples": samples, "first_loss": first, "tokens": world * tokens_BS.numel()}
    if profile and rank == 0:
        result["profile"] = {name: profile_table(run) for name, run in steps.items()}
    elif profile:
        for run in steps.values():  # the collectives need rank 1 to step alongside
            profile_table(run)
    return result


def profile_table(run, steps: int = 3) -> str:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            run()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)


def measure(sets: List[str], top_k: int, capacity_factor: Optional[float], reps: int, warmup: int, profile: bool
            ) -> Dict:
    from tests.distributed.spawn import run_ranks  # real gloo ranks, as the distributed tests spawn them

    return run_ranks(rank_main, WORLD, sets, top_k, capacity_factor, reps, warmup, profile)[0]


def row(top_k: int, capacity_factor: Optional[float], result: Dict) -> List:
    ours, theirs = result["samples"][OURS], result["samples"][DEEPSPEED]
    per_round = [b / a for a, b in zip(ours, theirs)]
    q = statistics.quantiles(per_round, n=4) if len(per_round) > 1 else per_round * 3
    tokens = result["tokens"]
    return [top_k, "dropless" if capacity_factor is None else capacity_factor,
            tokens / common.median(ours), tokens / common.median(theirs), common.median(per_round),
            f"{q[0]:.2f}-{q[2]:.2f}", f"{min(per_round):.2f}-{max(per_round):.2f}",
            f"{result['first_loss'][OURS]:.4f} / {result['first_loss'][DEEPSPEED]:.4f}"]


HEADERS = ["K", "capacity factor", f"{OURS} tokens/s", f"{DEEPSPEED} tokens/s", "speedup (median)",
           "speedup IQR", "speedup min-max", "step-1 loss ours / DeepSpeed"]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=12, help="timed steps per contender, interleaved")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per contender first")
    parser.add_argument("--top-k", type=int, nargs="+", default=[1, 2], choices=[1, 2])
    parser.add_argument("--capacity", nargs="+", default=["1.25", "none"],
                        help="capacity factors; 'none' = dropless (default: 1.25 none)")
    parser.add_argument("--experts", type=int, default=8, help="experts per MoE layer (even: EP=2)")
    parser.add_argument("--expert-width", type=int, default=512, help="each expert's SwiGLU hidden width")
    parser.add_argument("--profile", action="store_true", help="print rank 0's top ops of 3 steps per contender")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = parser.parse_args(argv)
    capacities = [None if c == "none" else float(c) for c in args.capacity]
    sets = model_sets(args.experts, args.expert_width)
    load_start = os.getloadavg()[0]
    rows = []
    for top_k in args.top_k:
        for cf in capacities:
            result = measure(sets, top_k, cf, args.reps, args.warmup, args.profile)
            rows.append(row(top_k, cf, result))
            print(common.table(HEADERS, rows[-1:]).splitlines()[-1], flush=True)
            for name, text in result.get("profile", {}).items():
                print(f"--- {name}, K={top_k}, capacity {cf}\n{text}", flush=True)
    body = (f"Load average {load_start:.1f} at the start. Model: {' '.join(sets)}; "
            f"{WORLD} ranks x {threads_per_rank(WORLD)} thread(s); "
            f"{args.reps} timed steps per contender after {args.warmup} warm-up steps.\n\n"
            + common.table(HEADERS, rows))
    print(body)
    if not args.no_write:
        default = (args.experts, args.expert_width) == (8, 512)
        common.write_section("train-step" if default else f"train-step-e{args.experts}", "bench.train_step", body)


if __name__ == "__main__":
    main()
