"""What every router returns, and the registry that picks a router by name.

Legend: T tokens, K slots per token, E experts (global).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Tuple

import torch


@dataclass(frozen=True)
class RoutingContext:
    """Per-batch facts a router may use beyond the hidden states.

    batch_shape: (B, S), so token t belongs to example t // S.
    domain_B: int64 domain/task id of each example (from the data pipeline), or None.
    mask_BS: 1 for real tokens, 0 for padding, or None when nothing is padded.
    """

    batch_shape: Tuple[int, int]
    domain_B: Optional[torch.Tensor] = None
    mask_BS: Optional[torch.Tensor] = None


@dataclass(frozen=True)
class RouterOutput:
    """One routing decision for a batch of tokens.

    weights_TK: fp32 gate weights (0 for dropped slots).
    expert_ids_TK: int64 global expert ids; -1 marks a slot dropped by capacity.
    logits_TE: fp32 router logits (kept for losses and diagnostics).
    losses: name -> scalar, already multiplied by its coefficient; the trainer adds them to the LM loss.
    stats: name -> detached tensor for metrics (e.g. load_E, dropped_fraction).
    """

    weights_TK: torch.Tensor
    expert_ids_TK: torch.Tensor
    logits_TE: torch.Tensor
    losses: Dict[str, torch.Tensor] = field(default_factory=dict)
    stats: Dict[str, torch.Tensor] = field(default_factory=dict)


ROUTERS: Dict[str, Callable[..., torch.nn.Module]] = {}


def register_router(name: str):
    """Class decorator: make a router selectable by ``type: name`` in YAML."""

    def wrap(cls):
        ROUTERS[name] = cls
        return cls

    return wrap
