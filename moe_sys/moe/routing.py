"""What every router returns and reads, and the registry that picks a router by name.

Legend: T tokens, K slots per token, E experts (global), B examples, S sequence length, N rows
(the unit a router decides for: tokens, or examples for example/task-level routers).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Tuple

import torch

from moe_sys.moe import losses
from moe_sys.moe.balance import BalanceSpec
from moe_sys.moe.capacity import Capacity
from moe_sys.moe.gate import Noise
from moe_sys.moe.scoring import Selection


@dataclass(frozen=True)
class RoutingContext:
    """Per-batch facts a router may use beyond the hidden states.

    batch_shape: (B, S), so token t belongs to example t // S.
    domain_B: int64 domain/task id of each example (from the data pipeline), or None.
    mask_BS: 1 for real tokens, 0 for padding, or None when nothing is padded.
    carry: state layers pass along the depth of this one forward pass, by name (the conditional
        bottleneck adapters carry their output from block to block); empty at the start.
    """

    batch_shape: Tuple[int, int]
    domain_B: Optional[torch.Tensor] = None
    mask_BS: Optional[torch.Tensor] = None
    carry: Dict[str, torch.Tensor] = field(default_factory=dict, compare=False, repr=False)


@dataclass(frozen=True)
class RouterOutput:
    """One routing decision for a batch of tokens.

    weights_TK: fp32 gate weights (0 for dropped slots).
    expert_ids_TK: int64 global expert ids; -1 marks a slot that is not computed (dropped by
        capacity, not picked by any expert, or a padding token).
    logits_TE: fp32 router logits per token (example/task routers: their example's logits).
    losses: name -> scalar, already multiplied by its coefficient; the trainer adds them all to the LM
        loss. Names are the ``moe.balance.losses`` types: switch, seq, global, mi (balancing) and z.
    stats: name -> detached tensor for metrics: load_E (fraction of chosen slots per expert, before
        capacity), dropped_fraction, entropy (mean router entropy per decision, nats).
    """

    weights_TK: torch.Tensor
    expert_ids_TK: torch.Tensor
    logits_TE: torch.Tensor
    losses: Dict[str, torch.Tensor] = field(default_factory=dict)
    stats: Dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class RouterSpec:
    """Everything a router is configured with besides its sizes (built from ``moe.router`` and
    ``moe.balance`` by moe_sys.moe.layer.spec_from_config). Each router reads the parts it uses."""

    selection: Selection = Selection()
    capacity: Capacity = Capacity()
    noise: Noise = Noise()
    balance: BalanceSpec = BalanceSpec()
    task_table: Optional[Tuple[Tuple[int, ...], ...]] = None  # task router: experts of each task


@dataclass(frozen=True)
class Rows:
    """The rows a router decides for, as the losses and the bias need them.

    valid_N: 1 real / 0 padding (None: all real). tokens_N: tokens each row stands for (what the
    aux-loss-free bias balances). seq_N: sequence of each row. task_N: domain/task of each row.
    """

    valid_N: Optional[torch.Tensor]
    tokens_N: torch.Tensor
    seq_N: torch.Tensor
    num_seqs: int
    task_N: Optional[torch.Tensor]


def token_rows(ctx: RoutingContext, device) -> Rows:
    """One row per token (token-choice and expert-choice routers)."""
    B, S = ctx.batch_shape
    valid_T = ctx.mask_BS.reshape(-1).float() if ctx.mask_BS is not None else None
    tokens_T = valid_T if valid_T is not None else torch.ones(B * S, device=device)
    seq_T = torch.arange(B, device=device).repeat_interleave(S)
    task_T = ctx.domain_B.repeat_interleave(S) if ctx.domain_B is not None else None
    return Rows(valid_T, tokens_T, seq_T, B, task_T)


def example_rows(ctx: RoutingContext, device) -> Rows:
    """One row per example (example- and task-level routers)."""
    B, S = ctx.batch_shape
    tokens_B = ctx.mask_BS.float().sum(1) if ctx.mask_BS is not None else torch.full((B,), float(S), device=device)
    valid_B = (tokens_B > 0).float() if ctx.mask_BS is not None else None
    return Rows(valid_B, tokens_B, torch.arange(B, device=device), B, ctx.domain_B)


def route_stats(load_ids_TK: torch.Tensor, dropped_fraction: torch.Tensor, probs_NE: torch.Tensor,
                valid_N: Optional[torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The stats every router reports; load_ids_TK are the chosen experts per token (-1: none)."""
    counts_E = losses.expert_counts(load_ids_TK, probs_NE.shape[1])
    return {"load_E": counts_E / counts_E.sum().clamp_min(1.0), "dropped_fraction": dropped_fraction.detach(),
            "entropy": losses.row_entropy(probs_NE.detach(), valid_N)}


def slot_drop_fraction(chosen_TK: torch.Tensor, kept_TK: torch.Tensor) -> torch.Tensor:
    """Share of chosen slots that capacity dropped."""
    chosen = (chosen_TK >= 0).sum()
    return 1.0 - (kept_TK >= 0).sum() / chosen.clamp_min(1)


ROUTERS: Dict[str, Callable[..., torch.nn.Module]] = {}


def register_router(name: str):
    """Class decorator: make a router selectable by ``type: name`` in YAML."""

    def wrap(cls):
        ROUTERS[name] = cls
        return cls

    return wrap
