"""The training loop. Reads top to bottom: setup -> (train step, metrics, eval, checkpoint) * N."""
from __future__ import annotations

import logging
import os
import time
from typing import Dict, List

import torch
import torch.distributed as dist

from moe_sys import ops
from moe_sys.config import Config, dump_config
from moe_sys.models.transformer import TransformerLM, lm_loss
from moe_sys.moe.routing import RouterOutput
from moe_sys.parallel import deepspeed_engine, launch_env
from moe_sys.parallel.experts import shard_and_mark_experts
from moe_sys.parallel.groups import create_expert_groups, init_distributed
from moe_sys.train import checkpoint, signals
from moe_sys.train.data_feed import build_feeds
from moe_sys.train.metrics import MetricsWriter
from moe_sys.train.progress import Progress

log = logging.getLogger("moe_sys")


def train(cfg: Config, resume: bool = False) -> List[Dict]:
    """Run cfg.train.steps optimizer steps (continuing from the latest checkpoint if resume)."""
    stop = signals.StopSignals()  # SIGTERM/SIGUSR1, even during setup: checkpoint at the next step, then stop
    launch = launch_env.detect()
    os.environ.update(launch_env.torch_env(launch))
    init_distributed(cfg.parallel.backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    if rank == 0:
        log.info("launcher: %s, %d ranks, expert-parallel size %d, backend %s", launch.launcher, world,
                 cfg.parallel.ep_size, dist.get_backend())
    ops.set_impl(cfg.ops.impl)
    _prepare_run_dir(cfg, rank)
    torch.manual_seed(cfg.train.seed)

    engine = _build_engine(cfg, world)
    train_feed, valid_batches = build_feeds(cfg, rank, world)
    start = 0
    if resume:
        state = checkpoint.load(engine, cfg.logging.run_dir)
        start = state["step"]
        train_feed.load_state_dict(state["data"])
    writer = MetricsWriter(cfg.logging.run_dir, cfg.logging.tensorboard, start if resume else None) if rank == 0 else None
    progress = Progress(cfg.train.steps, start, enabled=rank == 0 and cfg.logging.progress_bar)
    history = []
    last = min(cfg.train.steps, cfg.train.stop_after or cfg.train.steps)
    for step in range(start + 1, last + 1):
        record = train_step(engine, train_feed, cfg)
        record["step"] = step
        if step % cfg.train.eval_every == 0 or step == cfg.train.steps:
            record["val_loss"] = evaluate(engine, valid_batches())
        progress.update(record)
        history.append(record)
        if writer and (step % cfg.logging.log_every == 0 or "val_loss" in record or step == start + 1):
            writer.write(record)
        stop_signal = stop.agreed(engine.device)
        if _checkpoint_due(cfg, step, last) or stop_signal:
            checkpoint.save(engine, cfg.logging.run_dir, step, {"data": train_feed.state_dict()}, cfg.checkpoint.keep)
        if stop_signal:
            if rank == 0:
                signals.after_stop(stop_signal, step, more_steps=step < last)
            break
    stop.restore()
    progress.close()
    if writer:
        writer.close()
    return history


def _build_engine(cfg: Config, world: int):
    """Single-device model -> shard and mark experts -> DeepSpeed engine, once, in this order."""
    model = TransformerLM(cfg.model, cfg.moe)
    groups = create_expert_groups(cfg.parallel.ep_size)
    shard_and_mark_experts(model, groups)
    deepspeed_engine.register_moe_layers(model, groups)
    from moe_sys.train.optim import build_optimizer

    engine, _ = deepspeed_engine.initialize(model, build_optimizer(model, cfg.train), cfg, world)
    return engine


def train_step(engine, feed, cfg: Config) -> Dict:
    """One optimizer step over grad_accum_steps micro-batches; returns globally averaged metrics."""
    start = time.perf_counter()
    sums: Dict[str, torch.Tensor] = {}
    loads: List[torch.Tensor] = []
    tokens = 0
    for _ in range(cfg.train.grad_accum_steps):
        batch = _to_device(next(feed), engine.device)
        out = engine(batch["tokens"], batch["domain_ids"])
        lm = lm_loss(out.logits_BSV, batch["labels"], batch["loss_mask"])
        aux, z = _router_losses(out.routings)
        engine.backward(lm + aux + z)
        engine.step()
        _accumulate(sums, lm=lm, aux_loss=aux, z_loss=z, dropped=_dropped(out.routings))
        loads.append(torch.stack([r.stats["load_E"] for r in out.routings]))
        tokens += batch["tokens"].numel()
    means = _global_mean(torch.stack(list(sums.values())) / cfg.train.grad_accum_steps)
    load_LE = _global_mean(torch.stack(loads).mean(0))
    elapsed = time.perf_counter() - start
    record = dict(zip(sums.keys(), means.tolist()))
    return {
        "loss": record["lm"] + record["aux_loss"] + record["z_loss"],
        "lm_loss": record["lm"], "aux_loss": record["aux_loss"], "z_loss": record["z_loss"],
        "lr": engine.get_lr()[0], "tokens_per_s": tokens * dist.get_world_size() / elapsed,
        "dropped_fraction": record["dropped"], "expert_load": load_LE.tolist(),
    }


def _router_losses(routings: List[RouterOutput]):
    zero = torch.zeros((), device=routings[0].logits_TE.device) if routings else torch.zeros(())
    aux = sum((r.losses["aux_loss"] for r in routings if "aux_loss" in r.losses), zero)
    z = sum((r.losses["z_loss"] for r in routings if "z_loss" in r.losses), zero)
    return aux, z


def _dropped(routings: List[RouterOutput]) -> torch.Tensor:
    return torch.stack([r.stats["dropped_fraction"] for r in routings]).mean() if routings else torch.zeros(())


def _accumulate(sums: Dict[str, torch.Tensor], **values: torch.Tensor) -> None:
    for key, value in values.items():
        sums[key] = sums.get(key, 0) + value.detach().float()


def _to_device(batch: Dict[str, torch.Tensor], device) -> Dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _global_mean(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().clone()
    dist.all_reduce(t)
    return t / dist.get_world_size()


@torch.no_grad()
def evaluate(engine, batches) -> float:
    """Mean held-out LM loss over one pass of the validation batches (the same ones every time)."""
    engine.eval()
    total, count = torch.zeros((), device=engine.device), 0
    for batch in batches:
        batch = _to_device(batch, engine.device)
        out = engine(batch["tokens"], batch["domain_ids"])
        total += lm_loss(out.logits_BSV, batch["labels"], batch["loss_mask"]).float()
        count += 1
    engine.train()
    return float(_global_mean(total / max(count, 1)))


def _checkpoint_due(cfg: Config, step: int, last: int) -> bool:
    """Every N steps, and at the last step of this invocation (so a stopped run can resume)."""
    every = cfg.checkpoint.every
    return (every > 0 and step % every == 0) or (step == last and cfg.checkpoint.save_final)


def _prepare_run_dir(cfg: Config, rank: int) -> None:
    """Create the run directory and save the resolved config beside the metrics it produced."""
    if rank == 0:
        os.makedirs(cfg.logging.run_dir, exist_ok=True)
        with open(os.path.join(cfg.logging.run_dir, "config.yaml"), "w") as f:
            f.write(dump_config(cfg))
    dist.barrier()
