"""The affinity probe of a multitask run: every ``affinity.every`` steps, TAG's lookahead and the gradient
cosine (moe_sys/analysis/affinity.py) on the step's first micro-batch, before its update, and their
running means: the ``affinity`` entry of that step's metrics.jsonl record (docs/multitask.md).

Under the DeepSpeed engine: forwards run on ``engine.module``, because the engine's forward hooks
scale (1 / grad_accum_steps) and, at ZeRO stage 0, refuse any backward that is not engine.backward.
The lookahead takes ``engine.optimizer``'s own step when that is a torch.optim.Optimizer (ZeRO stage 0
in fp32: train/optim.py's AdamW, with its moments and step count), else a plain SGD step (ZeRO 1-3 and
bf16/fp16 wrap it in optimizers over flat partitions); the record names which. Data parallelism:
the losses and gradients are averaged over all ranks (the global batch's), so every rank measures,
records and averages the same matrices.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Callable, Dict, List

import torch
import torch.nn as nn

from moe_sys.analysis.affinity import AffinityAverage, measure_affinity
from moe_sys.moe import balance
from moe_sys.train.distributed import global_mean

log = logging.getLogger("moe_sys")

LossesFn = Callable[[nn.Module, Dict[str, torch.Tensor]], Dict[str, torch.Tensor]]  # model, batch -> task -> loss


class AffinityProbe:
    """Measures and averages the affinity of ``tasks``; ``losses_fn`` gives the unweighted per-task losses of
    a batch through a model, ``shared_fn`` names the model's parameters every task shares."""

    def __init__(self, spec, tasks: List[str], losses_fn: LossesFn, shared_fn: Callable[[nn.Module], List[str]]):
        self.spec, self.tasks = spec, list(tasks)
        self.losses_fn, self.shared_fn = losses_fn, shared_fn
        self.average = AffinityAverage(self.tasks)

    def due(self, step: int) -> bool:
        return self.spec.every > 0 and step % self.spec.every == 0

    def __call__(self, engine, batch: Dict[str, torch.Tensor], step: int) -> Dict[str, Any]:
        """{"affinity": {...}} at a measured step, else {} (every rank calls it: it all-reduces)."""
        if not self.due(step):
            return {}
        start, model = time.perf_counter(), engine.module
        optimizer = engine.optimizer if isinstance(engine.optimizer, torch.optim.Optimizer) else None
        lr = self.spec.lr or engine.optimizer.param_groups[0]["lr"]  # what this step's update will use

        def losses_N(b):
            losses = self.losses_fn(model, b)
            return torch.stack([losses[t] for t in self.tasks])

        with balance.untouched(model):  # router counts see the real step only
            m = measure_affinity(model, self.shared(model), losses_N, batch, lr or None, optimizer, global_mean)
        absent = [t for t, loss in zip(self.tasks, m.pop("losses").tolist()) if loss == 0]
        if absent:  # mode mixed: no sample of the task in the global batch (zero loss, zero gradient)
            log.info("step %d: affinity not measured, the batch holds no sample of %s", step, ", ".join(absent))
            return {}
        self.average.update(m)
        entry: Dict[str, Any] = {"tasks": self.tasks, "lr": lr, "seconds": time.perf_counter() - start,
                                 "lookahead_step": type(optimizer).__name__ if optimizer is not None else "sgd"}
        entry.update({name: value.tolist() for name, value in m.items()})
        entry.update({f"{name}_mean": self.average.mean(name).tolist() for name in self.average.counts})
        entry["measurements"] = dict(self.average.counts)  # how many the means are over
        return {"affinity": entry}

    def shared(self, model: nn.Module) -> List[str]:
        """The shared trainable parameters, less expert-parallel ones (each EP rank holds other experts)."""
        params = dict(model.named_parameters())
        names = [n for n in self.shared_fn(model) if params[n].requires_grad and getattr(params[n], "allreduce", True)]
        if not names:
            raise ValueError("task.multitask.affinity: the model has no trainable parameter shared by every task "
                             "outside expert banks")
        return names

    def state_dict(self) -> Dict[str, Any]:
        return self.average.state_dict()

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.average.load_state_dict(state)
