"""Activation checkpointing (``train.activation_checkpointing``) that is safe around routing.

``full`` recomputes whole transformer blocks in the backward pass, ``moe`` only the expert
computation (the rows times F activations, the largest holder at large K and E). Both go through
torch.utils.checkpoint, non-reentrant, with the RNG state restored (jitter, noisy gating, sampled
second choices and random drop priorities draw the same numbers again).

A recomputed block re-runs its router and its all-to-all. Two things must not happen twice:

- side effects of a forward: the aux-loss-free bias counts (``Balancer.observe``) and the
  global-batch counts (an all-reduce plus a running sum) would be counted again;
- a different routing decision: one flipped near-tie would make the recomputed dispatch exchange
  other rows than the forward did (other shapes, wrong gradients).

So the forward of a checkpointed region records what it decided (``taped``): the recompute replays
the global counts and the expert ids instead of computing them, and skips the bias counts. The
record lives with the region's closure (freed with the autograd graph), so an early-stopped
recompute leaves nothing stale behind. Outputs of a recompute are discarded by torch, so the router
losses it computes are not added again.
"""
from __future__ import annotations

from contextvars import ContextVar
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

MODES: Dict[str, Tuple[str, ...]] = {"none": (), "full": ("block",), "moe": ("experts",)}


class _Region:
    """What one checkpointed forward recorded, and how far its recompute has replayed it."""

    def __init__(self):
        self.values: Dict[Tuple[int, str], List] = {}
        self.cursor: Dict[Tuple[int, str], int] = {}
        self.replaying = False


_REGION: ContextVar[Optional[_Region]] = ContextVar("checkpoint_region", default=None)


def replaying() -> bool:
    """True while a checkpointed region is being recomputed in the backward pass."""
    region = _REGION.get()
    return region is not None and region.replaying


def taped(owner: object, name: str, compute: Callable[[], object]):
    """compute() outside checkpointing; inside a checkpointed forward, compute and record it; in the
    recompute, return what the forward recorded (in call order per owner and name)."""
    region = _REGION.get()
    if region is None:
        return compute()
    key = (id(owner), name)
    if region.replaying:
        index = region.cursor.get(key, 0)
        region.cursor[key] = index + 1
        return region.values[key][index]
    value = compute()
    region.values.setdefault(key, []).append(value)
    return value


def run(fn: Callable, *args):
    """fn(*args), its activations freed after the forward and recomputed in the backward. Without
    gradients (evaluation) it simply runs."""
    if not torch.is_grad_enabled():
        return fn(*args)
    region = _Region()
    calls = [0]

    def region_fn(*inner):
        region.replaying = calls[0] > 0
        region.cursor.clear()
        calls[0] += 1
        token = _REGION.set(region)
        try:
            return fn(*inner)
        finally:
            _REGION.reset(token)

    return checkpoint(region_fn, *args, use_reentrant=False, preserve_rng_state=True)


def enable(model: nn.Module, mode: str) -> int:
    """Turn checkpointing on for the units ``mode`` names (modules declare theirs with a
    ``checkpoint_unit`` class attribute); returns how many modules were set."""
    units = MODES[mode]
    count = 0
    for module in model.modules():
        if getattr(module, "checkpoint_unit", None) in units:
            module.checkpointed = True
            count += 1
    return count
