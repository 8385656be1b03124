"""The contract between the trainer and a task (torchtitan's train spec, in small).

The trainer is one loop that knows no task: it asks the task for the model, the batch streams, the
loss of a model output on a batch and the evaluation, and does the rest itself (parallelism, the
DeepSpeed engine, router losses, metrics, checkpoints). Every batch is a dict of tensors holding at
least ``domain_ids`` [B] (routers and adapters read them); everything else is the task's business.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Iterator, List, Tuple

import torch
import torch.nn as nn


class Task:
    """One kind of training problem. Subclasses fill in every method; class attributes name what the
    trainer logs (``throughput_key``: units per second, shown as ``throughput_label``; ``progress_keys``: record key -> bar label)."""

    throughput_key, throughput_label = "tokens_per_s", "tok/s"
    progress_keys: Dict[str, str] = {}

    def __init__(self, cfg):
        self.cfg = cfg

    @classmethod
    def check_inputs(cls, cfg) -> None:
        """Raise ValueError (one line naming the file or key) for bad data, before any rank starts."""

    def domain_names(self) -> List[str]:
        """Names of the domain ids batches carry, in id order (task routers and adapters use them)."""
        return [d.name for d in self.cfg.data.domains]

    def build_model(self) -> nn.Module:
        """The single-device model with its starting weights; its output has ``.routings``."""
        raise NotImplementedError

    def adapter_root(self, model: nn.Module) -> nn.Module:
        """The part of the model that ``adapters`` targets name modules of (and that gets frozen)."""
        return model

    def lr_mults(self) -> Dict[str, float]:
        """Parameter-name prefix (in ``build_model``'s model) -> learning-rate multiplier."""
        return {}

    def build_feeds(self, rank: int, world: int) -> Tuple[Any, Callable[[], Iterator[Dict[str, torch.Tensor]]]]:
        """(train stream: an iterator with state_dict/load_state_dict, eval: a fresh pass per call)."""
        raise NotImplementedError

    def forward(self, model, batch: Dict[str, torch.Tensor]):
        """model: the DeepSpeed engine (called like the model; ``.device``), in train or eval mode."""
        raise NotImplementedError

    def loss(self, out, batch: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """(loss to back-propagate, named parts logged as ``<name>_loss``; the parts sum to the loss)."""
        raise NotImplementedError

    def units(self, batch: Dict[str, torch.Tensor]) -> int:
        """How much this batch is, in the unit ``throughput_key`` counts (tokens, images)."""
        raise NotImplementedError

    def evaluate(self, model, batches: Iterator[Dict[str, torch.Tensor]]) -> Dict[str, Any]:
        """Record entries of one evaluation, identical on every rank (all ranks call it)."""
        raise NotImplementedError

    def probe(self, engine, batch: Dict[str, torch.Tensor], step: int) -> Dict[str, Any]:
        """Extra record entries measured on the step's first micro-batch before its update (all ranks call
        it; it must leave parameters, optimizer state and RNG as it found them); default: none."""
        return {}

    def state_dict(self) -> Dict[str, Any]:
        """What the task keeps outside the model that a resumed run needs (saved in checkpoints)."""
        return {}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore ``state_dict()``'s state."""
