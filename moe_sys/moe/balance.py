"""A router's balancing state: its weighted loss list, the aux-loss-free expert bias, and the
global-batch expert counts. Stepped once per optimizer step by the trainer (``step(model)``).

Legend: N rows, K slots, E experts.

Aux-loss-free balancing (DeepSeek-V3, arXiv 2408.15664): a per-expert bias b is added to the
ranking scores (never to the gate weights). After each optimizer step,
``b_i += u * sign(mean_j c_j - c_i)`` with c the tokens that chose each expert during the step
(padding excluded, before capacity), summed over the data-parallel group so every rank applies the
same update and the replicated routers stay identical. b is a persistent fp32 buffer, so it is saved
in checkpoints (DeepSpeed: in mp_rank_00_model_states.pt) and survives a bf16 model cast.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Dict, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn

from moe_sys.moe import losses, recompute

if TYPE_CHECKING:  # routing.py imports this module
    from moe_sys.moe.routing import Rows


@dataclass(frozen=True)
class BalanceSpec:
    """``moe.balance``: (type, coef) pairs, and the bias update rate u (None = no bias)."""

    losses: Tuple[Tuple[str, float], ...] = (("switch", 1e-2), ("z", 1e-3))
    bias_rate: Optional[float] = None


@dataclass(frozen=True)
class LossInputs:
    """What the loss registry's functions read."""

    logits_NE: torch.Tensor
    probs_NE: torch.Tensor
    chosen_NK: torch.Tensor  # before capacity; -1 for padding rows
    counts_E: torch.Tensor  # this micro-batch's counts of chosen_NK
    global_counts_E: Optional[torch.Tensor]
    rows: "Rows"
    num_tasks: int


LOSSES: Dict[str, Callable[[LossInputs], torch.Tensor]] = {
    "switch": lambda i: losses.switch_aux_loss(i.probs_NE, i.counts_E, i.rows.valid_N),
    "global": lambda i: losses.switch_aux_loss(i.probs_NE, i.global_counts_E, i.rows.valid_N),
    "seq": lambda i: losses.seq_aux_loss(i.probs_NE, i.chosen_NK, i.rows.seq_N, i.rows.num_seqs, i.rows.valid_N),
    "z": lambda i: losses.z_loss(i.logits_NE, i.rows.valid_N),
    "mi": lambda i: losses.mi_loss(i.probs_NE, _tasks(i.rows), i.num_tasks, i.rows.valid_N),
}


def _tasks(rows: "Rows") -> torch.Tensor:
    if rows.task_N is None:
        raise ValueError("the 'mi' balancing loss needs the batch's domain ids (RoutingContext.domain_B)")
    return rows.task_N


class Balancer(nn.Module):
    """Losses and bias of one router. ``group`` (set by set_group in the parallelize step) is the
    data-parallel group the global counts and the bias loads are summed over; None = this process."""

    def __init__(self, num_experts: int, spec: BalanceSpec = BalanceSpec(), num_tasks: int = 1):
        super().__init__()
        self.num_experts, self.num_tasks = num_experts, num_tasks
        self.terms = tuple((name, coef) for name, coef in spec.losses if coef > 0)
        self.rate = spec.bias_rate
        self.group: Optional[dist.ProcessGroup] = None
        self.uses_global = any(name == "global" for name, _ in self.terms)
        if self.rate is not None:
            self.register_buffer("bias_E", torch.zeros(num_experts))
        else:
            self.bias_E = None
        # Per-step accumulators: plain tensors, not state (reset by step(), never checkpointed).
        self.step_counts_E: Optional[torch.Tensor] = None
        self.global_sum_E: Optional[torch.Tensor] = None
        self.micro_batches = 0

    def losses(self, logits_NE: torch.Tensor, probs_NE: torch.Tensor, chosen_NK: torch.Tensor,
               rows: "Rows") -> Dict[str, torch.Tensor]:
        """name -> coef * loss for this micro-batch (call in training only: 'global' accumulates)."""
        counts_E = losses.expert_counts(chosen_NK, self.num_experts, rows.valid_N)
        # Taped: a recomputed (activation-checkpointed) forward must not all-reduce and sum again.
        global_E = recompute.taped(self, "global", lambda: self._global_counts(counts_E)) if self.uses_global else None
        inputs = LossInputs(logits_NE, probs_NE, chosen_NK, counts_E, global_E, rows, self.num_tasks)
        return {name: coef * LOSSES[name](inputs) for name, coef in self.terms}

    def _global_counts(self, counts_E: torch.Tensor) -> torch.Tensor:
        """Counts summed over the data-parallel group and averaged over this step's micro-batches
        (as Megatron's global_aux_loss), so f is the whole global batch's routing fraction."""
        counts_E = counts_E.detach().clone()
        if self.group is not None:
            dist.all_reduce(counts_E, group=self.group)
        self.global_sum_E = counts_E if self.global_sum_E is None else self.global_sum_E + counts_E
        self.micro_batches += 1
        return self.global_sum_E / self.micro_batches

    def observe(self, chosen_NK: torch.Tensor, rows: "Rows") -> None:
        """Count the tokens that chose each expert, for the bias update (training forwards only, so
        evaluation does not move the bias), once: not again when checkpointing recomputes them."""
        if self.bias_E is not None and self.training and torch.is_grad_enabled() and not recompute.replaying():
            counts_E = losses.expert_counts(chosen_NK, self.num_experts, rows.tokens_N)
            self.step_counts_E = counts_E if self.step_counts_E is None else self.step_counts_E + counts_E

    @torch.no_grad()
    def step(self) -> None:
        """Once per optimizer step: update the bias from the step's global loads; reset counters."""
        if self.bias_E is not None:
            counts_E = self.step_counts_E if self.step_counts_E is not None else torch.zeros_like(self.bias_E)
            if self.group is not None:
                dist.all_reduce(counts_E, group=self.group)
            self.bias_E += self.rate * torch.sign(counts_E.mean() - counts_E)
        self.step_counts_E, self.global_sum_E, self.micro_batches = None, None, 0

    def _apply(self, fn, recurse=True):
        """Moves follow the model, casts do not: the bias stays fp32 (updates of 1e-3 vanish in bf16)."""
        bias_E = self.bias_E.data if self.bias_E is not None else None
        super()._apply(fn, recurse)
        if bias_E is not None:
            self.bias_E.data = bias_E.to(self.bias_E.device)
        return self


def set_group(model: nn.Module, group: Optional[dist.ProcessGroup]) -> None:
    """Give every router's balancer the group its counts are summed over (the parallelize step)."""
    for module in model.modules():
        if isinstance(module, Balancer):
            module.group = group


def step(model: nn.Module) -> None:
    """After each optimizer step: bias updates and global-count resets of every router."""
    for module in model.modules():
        if isinstance(module, Balancer):
            module.step()


@contextlib.contextmanager
def untouched(model: nn.Module):
    """Training forwards inside (a measurement, such as the affinity probe's) leave every router's
    per-step counts as they were, so the bias update and the global counts see only the real step."""
    balancers = [m for m in model.modules() if isinstance(m, Balancer)]
    saved = [(b.step_counts_E, b.global_sum_E, b.micro_batches) for b in balancers]
    try:
        yield
    finally:  # the accumulators are replaced, never changed in place: the saved tensors are intact
        for b, (counts_E, global_E, micro) in zip(balancers, saved):
            b.step_counts_E, b.global_sum_E, b.micro_batches = counts_E, global_E, micro
