"""The training loop. Reads top to bottom: setup -> (train step, metrics, eval, checkpoint) * N."""
from __future__ import annotations

import logging
import os
import time
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from moe_sys import ops
from moe_sys.config import Config, dump_config
from moe_sys.adapters import io as adapter_io
from moe_sys.adapters.inject import inject
from moe_sys.models.transformer import TransformerLM, lm_loss, token_losses
from moe_sys.moe import balance, observe, recompute
from moe_sys.parallel import deepspeed_engine, launch_env
from moe_sys.parallel.experts import shard_and_mark_experts
from moe_sys.parallel.groups import create_expert_groups, init_distributed
from moe_sys.train import checkpoint, run_dir, signals
from moe_sys.train.data_feed import build_feeds, save_tokenizer
from moe_sys.train.metrics import MetricsWriter
from moe_sys.train.progress import Progress
from moe_sys.weights import io as weights_io

log = logging.getLogger("moe_sys")


def train(cfg: Config, resume: Optional[str] = None, overwrite: bool = False) -> List[Dict]:
    """Run cfg.train.steps optimizer steps; ``resume`` (a ``checkpoint.choose`` mode or tag) continues
    from a checkpoint; ``overwrite`` moves a used run directory aside (``run_dir.prepare``)."""
    stop = signals.StopSignals()  # SIGTERM/SIGUSR1, even during setup: checkpoint at the next step, then stop
    launch = launch_env.detect()
    os.environ.update(launch_env.torch_env(launch))
    init_distributed(cfg.parallel.backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    if rank == 0:
        log.info("launcher: %s, %d ranks, expert-parallel size %d, backend %s", launch.launcher, world,
                 cfg.parallel.ep_size, dist.get_backend())
    ops.set_impl(cfg.ops.impl)
    torch.manual_seed(cfg.train.seed)

    engine = _build_engine(cfg, world)
    _prepare_run_dir(cfg, rank, bool(resume), overwrite)  # after the engine: it has set each rank's device
    train_feed, valid_batches = build_feeds(cfg, rank, world)
    if rank == 0:
        save_tokenizer(cfg, cfg.logging.run_dir)
    start = 0
    if resume:
        settings = deepspeed_engine.optimizer_settings(engine)
        state = checkpoint.load(engine, cfg.logging.run_dir, resume)
        deepspeed_engine.reapply_settings(engine, settings, cfg.train.grad_clip)
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
            record["val_loss"], record["val_loss_domain"] = evaluate(engine, valid_batches(), cfg.data.domains)
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
    if cfg.adapters.save and _has_adapters(cfg):  # every rank: sharded adapter experts are gathered
        adapter_io.save_adapters(engine.module, os.path.join(cfg.logging.run_dir, "adapters"))
    progress.close()
    if writer:
        writer.close()
    return history


def _build_engine(cfg: Config, world: int):
    """Single-device model (+ its starting weights) -> shard and mark experts -> adapters -> DeepSpeed
    engine, once, in this order."""
    model = TransformerLM(cfg.model, cfg.moe, num_domains=len(cfg.data.domains))
    recompute.enable(model, cfg.train.activation_checkpointing)
    if cfg.train.init_from:
        weights_io.load_model_weights(model, cfg.train.init_from)
    groups = create_expert_groups(cfg.parallel.ep_size)
    shard_and_mark_experts(model, groups)
    if _has_adapters(cfg):
        inject(model, cfg.adapters, [d.name for d in cfg.data.domains], groups)
    balance.set_group(model, dist.group.WORLD)  # routers are replicated: every rank is a data-parallel rank
    deepspeed_engine.register_moe_layers(model, groups)
    from moe_sys.train.optim import build_optimizer

    engine, _ = deepspeed_engine.initialize(model, build_optimizer(model, cfg.train), cfg, world)
    return engine


def _has_adapters(cfg: Config) -> bool:
    return bool(cfg.adapters.modules or cfg.adapters.load_from)


def train_step(engine, feed, cfg: Config) -> Dict:
    """One optimizer step over grad_accum_steps micro-batches; returns globally averaged metrics."""
    start = time.perf_counter()
    sums: Dict[str, torch.Tensor] = {}
    routing_stats = observe.StepStats(len(cfg.data.domains))
    tokens = 0
    for _ in range(cfg.train.grad_accum_steps):
        batch = _to_device(next(feed), engine.device)
        out = engine(batch["tokens"], batch["domain_ids"])
        lm = lm_loss(out.logits_BSV, batch["labels"], batch["loss_mask"])
        route_losses = observe.router_losses(out.routings)  # name -> summed over layers, already weighted
        engine.backward(lm + sum(route_losses.values(), torch.zeros_like(lm)))
        engine.step()
        _accumulate(sums, lm=lm, **route_losses)
        if out.routings:  # a dense model with non-routing adapters has none
            routing_stats.add(out.routings, batch["domain_ids"])
        tokens += batch["tokens"].numel()
    balance.step(engine.module)  # once per optimizer step: aux-loss-free bias, global-batch counts
    means = _global_mean(torch.stack(list(sums.values())) / cfg.train.grad_accum_steps)
    elapsed = time.perf_counter() - start
    record = dict(zip(sums.keys(), means.tolist()))
    lm_value = record.pop("lm")
    aux, z = observe.split_losses(record)
    return {
        "loss": lm_value + aux + z, "lm_loss": lm_value, "aux_loss": aux, "z_loss": z, "router_losses": record,
        "lr": engine.get_lr()[0], "tokens_per_s": tokens * dist.get_world_size() / elapsed, "step_time_s": elapsed,
        **(routing_stats.summary(_global_sum) if routing_stats.sums else {}),
    }


def _accumulate(sums: Dict[str, torch.Tensor], **values: torch.Tensor) -> None:
    for key, value in values.items():
        sums[key] = sums.get(key, 0) + value.detach().float()


def _to_device(batch: Dict[str, torch.Tensor], device) -> Dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _global_mean(t: torch.Tensor) -> torch.Tensor:
    return _global_sum(t) / dist.get_world_size()


def _global_sum(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().clone()
    dist.all_reduce(t)
    return t


@torch.no_grad()
def evaluate(engine, batches, domains) -> Tuple[float, Dict[str, float]]:
    """Mean held-out LM loss over one pass of the validation batches (the same ones every time), and
    each domain's token-weighted loss (NaN for a domain with no validation tokens)."""
    engine.eval()
    total, count = torch.zeros(1, device=engine.device), 0
    sums_A, tokens_A = torch.zeros(len(domains), device=engine.device), torch.zeros(len(domains), device=engine.device)
    for batch in batches:
        batch = _to_device(batch, engine.device)
        out = engine(batch["tokens"], batch["domain_ids"])
        ce_BS = token_losses(out.logits_BSV, batch["labels"]) * batch["loss_mask"]
        total += ce_BS.sum() / batch["loss_mask"].sum().clamp_min(1.0)
        sums_A.index_add_(0, batch["domain_ids"], ce_BS.sum(1))
        tokens_A.index_add_(0, batch["domain_ids"], batch["loss_mask"].sum(1))
        count += 1
    engine.train()
    total, sums_A, tokens_A = _global_sum(torch.cat([total / max(count, 1), sums_A, tokens_A])).split(
        [1, len(domains), len(domains)])
    per_domain = (sums_A / tokens_A).tolist()
    return float(total) / dist.get_world_size(), {d.name: loss for d, loss in zip(domains, per_domain)}


def _checkpoint_due(cfg: Config, step: int, last: int) -> bool:
    """Every N steps, and at the last step of this invocation (so a stopped run can resume)."""
    every = cfg.checkpoint.every
    return (every > 0 and step % every == 0) or (step == last and cfg.checkpoint.save_final)


def _prepare_run_dir(cfg: Config, rank: int, resume: bool, overwrite: bool) -> None:
    """Apply the run-directory rules (rank 0 decides for all), create the directory and save the
    resolved config beside the metrics it produced."""

    def prepare():
        aside = run_dir.prepare(cfg.logging.run_dir, resume, overwrite)
        if aside:
            log.info("moved the previous run in %s to %s", cfg.logging.run_dir, aside)
        os.makedirs(cfg.logging.run_dir, exist_ok=True)
        with open(os.path.join(cfg.logging.run_dir, "config.yaml"), "w") as f:
            f.write(dump_config(cfg))

    checkpoint.decided_on_rank0(prepare)
