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
from moe_sys.moe import balance, observe, recompute
from moe_sys.parallel import deepspeed_engine, launch_env
from moe_sys.parallel.experts import shard_and_mark_experts
from moe_sys.parallel.groups import create_expert_groups, init_distributed
from moe_sys.tasks import Task, build_task
from moe_sys.train import checkpoint, reshard, run_dir, signals
from moe_sys.train.distributed import global_mean, global_sum, to_device
from moe_sys.train.metrics import MetricsWriter
from moe_sys.train.progress import Progress

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

    task = build_task(cfg)
    engine = _build_engine(task, cfg, world)
    _prepare_run_dir(cfg, rank, bool(resume), overwrite)  # after the engine: it has set each rank's device
    train_feed, valid_batches = task.build_feeds(rank, world)
    start = 0
    if resume:
        settings = deepspeed_engine.optimizer_settings(engine)
        state = checkpoint.load(engine, cfg.logging.run_dir, resume, cfg.parallel.ep_size)
        deepspeed_engine.reapply_settings(engine, settings, cfg.train.grad_clip)
        start = state["step"]
        train_feed.load_state_dict(state["data"])
        task.load_state_dict(state.get("task", {}))
    writer = MetricsWriter(cfg.logging.run_dir, cfg.logging.tensorboard, start if resume else None) if rank == 0 else None
    progress = Progress(cfg.train.steps, start, enabled=rank == 0 and cfg.logging.progress_bar,
                        throughput=(task.throughput_key, task.throughput_label), eval_keys=task.progress_keys)
    history = []
    last = min(cfg.train.steps, cfg.train.stop_after or cfg.train.steps)
    for step in range(start + 1, last + 1):
        record, measured = train_step(task, engine, train_feed, cfg, step)
        record.update(step=step, **measured)
        evaluated = step % cfg.train.eval_every == 0 or step == cfg.train.steps
        if evaluated:
            record.update(evaluate(task, engine, valid_batches()))
        progress.update(record)
        history.append(record)
        if writer and (step % cfg.logging.log_every == 0 or evaluated or step == start + 1 or measured):
            writer.write(record)
        stop_signal = stop.agreed(engine.device)
        if _checkpoint_due(cfg, step, last) or stop_signal:
            client_state = {"data": train_feed.state_dict(), "task": task.state_dict(),
                            "layout": reshard.layout(engine, cfg.parallel.ep_size)}
            checkpoint.save(engine, cfg.logging.run_dir, step, client_state, cfg.checkpoint.keep)
        if stop_signal:
            if rank == 0:
                signals.after_stop(stop_signal, step, more_steps=step < last)
            break
    stop.restore()
    if cfg.adapters.save and _has_adapters(cfg):  # every rank: sharded adapter experts are gathered
        adapter_io.save_adapters(task.adapter_root(engine.module), os.path.join(cfg.logging.run_dir, "adapters"))
    progress.close()
    if writer:
        writer.close()
    return history


def _build_engine(task: Task, cfg: Config, world: int):
    """Single-device model (+ its starting weights) -> shard and mark experts -> adapters -> DeepSpeed
    engine, once, in this order."""
    model = task.build_model()
    recompute.enable(model, cfg.train.activation_checkpointing)
    groups = create_expert_groups(cfg.parallel.ep_size)
    shard_and_mark_experts(model, groups)
    if _has_adapters(cfg):
        inject(task.adapter_root(model), cfg.adapters, task.domain_names(), groups)
    balance.set_group(model, dist.group.WORLD)  # routers are replicated: every rank is a data-parallel rank
    deepspeed_engine.register_moe_layers(model, groups)
    from moe_sys.train.optim import build_optimizer

    engine, _ = deepspeed_engine.initialize(model, build_optimizer(model, cfg.train, task.lr_mults()), cfg, world)
    return engine


def _has_adapters(cfg: Config) -> bool:
    return bool(cfg.adapters.modules or cfg.adapters.load_from)


def train_step(task: Task, engine, feed, cfg: Config, step: int) -> Tuple[Dict, Dict]:
    """One optimizer step over grad_accum_steps micro-batches; returns (globally averaged metrics, what
    the task's probe measured on the first micro-batch before the update)."""
    start = time.perf_counter()
    sums: Dict[str, torch.Tensor] = {}
    routing_stats = observe.StepStats(len(task.domain_names()))
    units, measured = 0, {}
    for micro in range(cfg.train.grad_accum_steps):
        batch = to_device(next(feed), engine.device)
        if micro == 0:
            measured = task.probe(engine, batch, step)
        out = task.forward(engine, batch)
        loss, parts = task.loss(out, batch)
        route_losses = observe.router_losses(out.routings)  # name -> summed over layers, already weighted
        engine.backward(loss + sum(route_losses.values(), torch.zeros_like(loss)))
        engine.step()
        _accumulate(sums, **parts, **route_losses)
        if out.routings:  # a dense model with non-routing adapters has none
            routing_stats.add(out.routings, batch["domain_ids"])
        units += task.units(batch)
    balance.step(engine.module)  # once per optimizer step: aux-loss-free bias, global-batch counts
    means = global_mean(torch.stack(list(sums.values())) / cfg.train.grad_accum_steps)
    elapsed = time.perf_counter() - start
    record = dict(zip(sums.keys(), means.tolist()))
    part_values = {f"{name}_loss": record.pop(name) for name in parts}
    aux, z = observe.split_losses(record)
    return {
        "loss": sum(part_values.values()) + aux + z, **part_values, "aux_loss": aux, "z_loss": z,
        "router_losses": record, "lr": engine.get_lr()[0],
        task.throughput_key: units * dist.get_world_size() / elapsed, "step_time_s": elapsed,
        **(routing_stats.summary(global_sum) if routing_stats.sums else {}),
    }, measured


def _accumulate(sums: Dict[str, torch.Tensor], **values: torch.Tensor) -> None:
    for key, value in values.items():
        sums[key] = sums.get(key, 0) + value.detach().float()


def evaluate(task: Task, engine, batches) -> Dict:
    """The task's evaluation with the model in eval mode (dropout, stochastic adapters off)."""
    engine.eval()
    try:
        return task.evaluate(engine, batches)
    finally:
        engine.train()


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
