"""The planner's per-rank memory against the peak measured on CPU: DeepSpeed engine steps of three
configs on 2 gloo ranks (EP=2), peak resident bytes above those held before the model was built.

Usage: python -m bench.plan_memory [--write]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from bench.common import _status_bytes, set_malloc, table, write_section
from tests.distributed.spawn import run_ranks

COMMON = ["parallel.ep_size=2", "parallel.procs=2", "train.grad_clip=1.0"]
DEEPSEEK = ["model.d_model=256", "model.d_ff=1024", "moe.num_experts=16", "moe.top_k=6", "moe.d_expert=128",
            "moe.shared_experts=2", "moe.first_moe_layer=1"]
CONFIGS = {
    "tiny, ZeRO-1": ["parallel.zero_stage=1"],
    "E16 K4 D256, ZeRO-2": ["model.d_model=256", "model.d_ff=512", "moe.num_experts=16", "moe.top_k=4",
                            "data.seq_len=256", "model.max_seq_len=256", "train.micro_batch_size=4",
                            "parallel.zero_stage=2"],
    "deepseek-like shrunk, ZeRO-0": DEEPSEEK + ["parallel.zero_stage=0"],
    "deepseek-like shrunk, bf16, ZeRO-0": DEEPSEEK + ["train.dtype=bf16", "parallel.zero_stage=0"],
}


WARMUP = ["model.d_model=16", "model.n_heads=2", "model.d_ff=16", "model.n_layers=2", "data.seq_len=8",
          "train.micro_batch_size=1"]


def _steps(sets, world, steps):
    from moe_sys.config import load_config
    from moe_sys.models.transformer import lm_loss
    from moe_sys.moe import observe
    from moe_sys.train.trainer import _build_engine

    cfg = load_config("configs/tiny.yaml", COMMON + sets, world_size=world)
    tokens_BS = torch.randint(0, 256, (cfg.train.micro_batch_size, cfg.data.seq_len))
    engine = _build_engine(cfg, world)
    for _ in range(steps):
        out = engine(tokens_BS)
        loss = lm_loss(out.logits_BSV, tokens_BS, torch.ones_like(tokens_BS))
        engine.backward(loss + sum(observe.router_losses(out.routings).values()))
        engine.step()


def _measure(rank, world, sets):
    """Peak above the resident bytes after a negligible model went through the same code path (so
    imports, lazily built ops and communication buffers are not counted as the model's)."""
    set_malloc("exact")
    _steps(sets + WARMUP, world, 1)
    Path("/proc/self/clear_refs").write_text("5")
    base = _status_bytes("VmRSS")
    _steps(sets, world, 3)
    return _status_bytes("VmHWM") - base


def main(argv=None) -> None:
    from moe_sys.config import load_config
    from moe_sys.plan.report import GIB, plan

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args(argv)
    rows = []
    for name, sets in CONFIGS.items():
        measured = max(run_ranks(_measure, 2, sets))
        predicted = plan(load_config("configs/tiny.yaml", COMMON + sets, world_size=2), 2, 1e9, 25.0)["total_gib"] * GIB
        rows.append([name, predicted / 2**20, measured / 2**20, predicted / measured - 1])
        print(rows[-1], flush=True)
    body = table(["config (2 ranks, EP=2, fp32 unless said)", "planned MiB", "measured peak MiB", "error"], rows)
    print(body)
    if args.write:
        write_section("plan_memory", "bench.plan_memory", body)


if __name__ == "__main__":
    main()
