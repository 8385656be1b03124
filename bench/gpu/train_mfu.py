"""One training run of a Mixtral-shaped model on one device: tokens/s and the model FLOPs per token.

The run is our trainer itself (moe_sys.train.trainer.train), started in this process as rank 0 of a
world of 1 through plain env:// variables: the trainer treats RANK/WORLD_SIZE set by anyone as a
launched rank (launch_env "env"), so neither the deepspeed launcher nor torchrun is needed for one GPU.

Model FLOPs per token (training, forward + backward) = 6 * N_active + 12 * n_layers * d_model * seq_len:
N_active counts every weight a token multiplies (attention, router, the top_k of num_experts experts
of each MoE layer, the LM head; not the input embedding lookup), and the second term is attention's
scores and weighted sum, counted over the full sequence (PaLM's convention, causal masking not halved).
MFU = tokens/s * FLOPs per token / the device's measured bf16 matrix rate (bench/gpu/probe.py).

Run from the repository root: ``python -m bench.gpu.train_mfu --json FILE --run-dir DIR [--dry-run]``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Dict, List

if __package__ in (None, ""):  # `python bench/gpu/train_mfu.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch

# Mixtral's shape (8 SwiGLU experts, top-2, expert width 3.5 d_model, head dim 128) at 1.1B parameters
# (0.31B active per token), so that it trains on one GPU with EP=1.
GPU_RUN = ["configs/mixtral_like.yaml", "model.d_model=1024", "model.n_layers=12", "model.n_heads=8",
           "model.d_ff=3584", "model.max_seq_len=2048", "data.seq_len=2048", "train.micro_batch_size=8",
           "train.grad_accum_steps=1", "train.steps=30", "train.warmup_steps=3"]
DRY_RUN = ["configs/tiny.yaml", "model.d_model=64", "model.n_layers=2", "model.n_heads=2", "model.d_ff=128",
           "model.max_seq_len=64", "data.seq_len=64", "train.micro_batch_size=2", "train.steps=4",
           "train.warmup_steps=1", "train.dtype=bf16"]
COMMON = ["parallel.procs=1", "parallel.ep_size=1", "train.eval_every=1000", "train.eval_batches=1",
          "checkpoint.every=0", "checkpoint.save_final=false", "logging.log_every=1",
          "logging.tensorboard=false", "logging.progress_bar=false"]
WARMUP_STEPS = 5  # left out of tokens/s: the first steps pay for allocator growth and kernel selection


def flops_per_token(cfg) -> Dict[str, float]:
    """Parameter counts of the configured model (built on the meta device: no memory) and its FLOPs/token."""
    from moe_sys.models.transformer import TransformerLM

    with torch.device("meta"):
        model = TransformerLM(cfg.model, cfg.moe, num_domains=len(cfg.data.domains))
    total = sum(p.numel() for p in model.parameters())
    lookup_only = 0 if model.head.weight is model.embed.weight else model.embed.weight.numel()
    experts = sum(p.numel() for layer in model.moe_layers() for p in layer.experts.parameters())
    inactive = experts * (1 - cfg.moe.top_k / cfg.moe.num_experts) if cfg.moe.enabled else 0
    active = total - lookup_only - inactive
    attention = 12 * cfg.model.n_layers * cfg.model.d_model * cfg.data.seq_len
    return {"params_total": total, "params_active": active, "flops_per_token": 6 * active + attention,
            "flops_formula": "6 * params_active + 12 * n_layers * d_model * seq_len"}


def run(config: str, overrides: List[str]) -> List[Dict]:
    """The trainer's per-step records, as rank 0 of a one-process world."""
    from moe_sys.config import load_config
    from moe_sys.parallel.local_launch import free_port
    from moe_sys.train.trainer import train

    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(free_port()))
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    return train(load_config(config, overrides, world_size=1))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", required=True, help="write the result here")
    parser.add_argument("--run-dir", required=True, help="the run directory (metrics.jsonl, config.yaml)")
    parser.add_argument("--dry-run", action="store_true", help="a tiny model for a few steps on the CPU")
    args = parser.parse_args(argv)
    from moe_sys.cli import _setup_logging
    from moe_sys.config import load_config

    _setup_logging()  # the log lines `moe-sys train` prints (launcher, ops choice), its noise filtered

    config, *sets = DRY_RUN if args.dry_run else GPU_RUN
    overrides = [*sets, *COMMON, f"logging.run_dir={args.run_dir}"]
    cfg = load_config(config, overrides, world_size=1)
    result = {"config": config, "overrides": overrides, "dtype": cfg.train.dtype,
              "tokens_per_step": cfg.train.micro_batch_size * cfg.data.seq_len * cfg.train.grad_accum_steps,
              **flops_per_token(cfg)}
    history = run(config, overrides)
    timed = history[WARMUP_STEPS:] if len(history) > WARMUP_STEPS else history[-1:]
    result.update(steps=len(history), tokens_per_s=statistics.median(r["tokens_per_s"] for r in timed),
                  step_time_s=statistics.median(r["step_time_s"] for r in timed),
                  loss_first=history[0]["loss"], loss_last=history[-1]["loss"],
                  max_memory_GiB=torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None)
    result["model_TFLOPs"] = result["tokens_per_s"] * result["flops_per_token"] / 1e12
    print(json.dumps(result, indent=1))
    Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
