"""The adapter contract, how each example picks its adapter, and the registry of adapter types.

An adapter layer wraps one module of the base model (``base_layer``, frozen) and adds a computation
of its own. Most hold a *bank*: N adapters of one type stacked along dim 0 of every parameter
("slots", each with a name). Per batch, every example gets a weight vector over the slots — one-hot
when it is picked by name or by its domain — and the bank's parameters are mixed per example with
one matmul (``mix``) and applied in one batched forward. So a batch that mixes adapters costs one
pass, in training too, never a Python loop over masks; SMEAR is the same computation with soft
weights from a router.

Legend: N slots, B examples, S sequence, I/O input/output features, R rows (tokens sorted by expert),
E experts.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Tuple, Type, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from moe_sys.models.transformer import current_batch
from moe_sys.ops.grouped_mm import grouped_mm


@dataclass(frozen=True)
class Site:
    """Where an adapter is being built: the wrapped module's name in the model, and model facts."""

    path: str
    d_model: int
    num_domains: int  # data domains = the task ids batches carry


@dataclass(frozen=True)
class AdapterType:
    build: Callable  # build(base_layer, spec, site) -> AdapterLayer
    wraps: Union[Type[nn.Module], Tuple[Type[nn.Module], ...]]  # the kind(s) of module its targets must be

    def wraps_names(self) -> str:
        kinds = self.wraps if isinstance(self.wraps, tuple) else (self.wraps,)
        return " or ".join(k.__name__ for k in kinds)


ADAPTERS: Dict[str, AdapterType] = {}


def register_adapter(name: str, wraps: Union[Type[nn.Module], Tuple[Type[nn.Module], ...]]):
    """Decorator for ``build(base_layer, spec, site: Site)``: the adapter becomes ``type: name`` in YAML."""

    def wrap(build):
        ADAPTERS[name] = AdapterType(build, wraps)
        return build

    return wrap


def matches(path: str, patterns: List[str]) -> bool:
    """Does a module name match one of the patterns? ``*`` = one name component, ``**`` = any number."""
    return any(re.fullmatch(_pattern_regex(p), path) for p in patterns)


def _pattern_regex(pattern: str) -> str:
    parts = [".*" if part == "**" else re.escape(part).replace(r"\*", "[^.]*") for part in pattern.split(".")]
    return r"\.".join(parts)


class AdapterLayer(nn.Module):
    """A frozen ``base_layer`` plus an adapter. ``merge()`` folds the adapter into the base weights
    where the method is a change of weights (LoRA, (IA)^3); the others raise."""

    mergeable = False

    def __init__(self, base_layer: nn.Module, name: str):
        super().__init__()
        self.base_layer = base_layer
        self.adapter_name = name
        self.spec = None  # the config spec it was built from (set by inject; saved in manifests)

    def adapter_parameters(self) -> Iterator[Tuple[str, nn.Parameter]]:
        """(name, parameter) of the adapter's own parameters: everything but the base layer."""
        for name, param in self.named_parameters():
            if not name.startswith("base_layer."):
                yield name, param

    def merge(self) -> None:
        self._refuse_merge()

    def unmerge(self) -> None:
        self._refuse_merge()

    def _refuse_merge(self) -> None:
        raise TypeError(f"{type(self).__name__} changes the computation, not the weights: it cannot be merged")


@dataclass(frozen=True)
class Selection:
    """Which slot each example uses: ``fixed`` for all, or ``slot_of_domain[domain id]`` (-1 = none).
    Neither set = the adapter is off."""

    fixed: Optional[int] = None
    slot_of_domain: Optional[Tuple[int, ...]] = None

    def weights(self, num_slots: int, batch: int, device) -> Optional[torch.Tensor]:
        """One-hot [B, N] slot weights for this batch (rows of zeros: no adapter), or None when off."""
        if self.fixed is not None:
            slot_B = torch.full((batch,), self.fixed, device=device)
        elif self.slot_of_domain is not None:
            ctx = current_batch()
            if ctx is None or ctx.domain_B is None:
                raise ValueError("adapter selected per domain, but the forward pass got no domain ids")
            slot_B = torch.tensor(self.slot_of_domain, device=device)[ctx.domain_B.to(device)]
        else:
            return None
        return one_hot_rows(slot_B, num_slots)


def one_hot_rows(slot_B: torch.Tensor, num_slots: int) -> torch.Tensor:
    """[B, N] float one-hot; slot -1 gives a row of zeros."""
    return F.one_hot(slot_B.clamp_min(0), num_slots).float() * (slot_B >= 0).float()[:, None]


class SlotAdapter(AdapterLayer):
    """An adapter layer holding a bank of named slots, selected per example (see ``Selection``).

    Mergeable subclasses implement ``_fold(slot, inverse)``; while merged, the active slot lives in
    the base weights and the adapter branch is skipped.
    """

    def __init__(self, base_layer: nn.Module, name: str, slots: List[str]):
        super().__init__(base_layer, name)
        self.slots = list(slots)
        self.selection = Selection(fixed=0)
        self.merged_slot: Optional[int] = None

    def slot_weights(self, batch: int, device) -> Optional[torch.Tensor]:
        """[B, N] weights of this batch, or None when the branch is skipped (off, or merged)."""
        if self.merged_slot is not None:
            if self.selection.fixed != self.merged_slot:
                raise RuntimeError(f"adapter {self.adapter_name!r} is merged into the base weights: unmerge it "
                                   "before selecting other slots")
            return None
        return self.selection.weights(len(self.slots), batch, device)

    def merge(self) -> None:
        if not self.mergeable:
            self._refuse_merge()
        if self.merged_slot is not None:
            return
        if self.selection.fixed is None:
            raise RuntimeError(f"adapter {self.adapter_name!r}: merging needs one active slot (select: fixed)")
        with torch.no_grad():
            self._fold(self.selection.fixed, inverse=False)
        self.merged_slot = self.selection.fixed

    def unmerge(self) -> None:
        if not self.mergeable:
            self._refuse_merge()
        if self.merged_slot is None:
            return
        with torch.no_grad():
            self._fold(self.merged_slot, inverse=True)
        self.merged_slot = None

    def _fold(self, slot: int, inverse: bool) -> None:
        raise NotImplementedError(f"{type(self).__name__} sets mergeable = True but defines no _fold")


def mix(params_N: Dict[str, torch.Tensor], weights_BN: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Per-example parameters sum_n w[b, n] * P_n, for every stacked parameter P [N, ...] -> [B, ...].

    With one-hot weights this is an exact gather (1*p + 0*q adds exact zeros): in a mixed-adapter
    batch every example runs with exactly its own adapter's parameters.
    """
    return {k: torch.tensordot(weights_BN.to(v.dtype), v, dims=1) for k, v in params_N.items()}


class PerExample:
    """Layout where adapter parameters carry a leading B: x_BSI @ W_BIO for each example."""

    @staticmethod
    def linear(x_BSI: torch.Tensor, w_BIO: torch.Tensor) -> torch.Tensor:
        return torch.bmm(x_BSI, w_BIO)

    @staticmethod
    def bias(h_BSO: torch.Tensor, b_BO: torch.Tensor) -> torch.Tensor:
        return h_BSO + b_BO[:, None, :]


@dataclass(frozen=True)
class Rows:
    """Layout of token-routed experts: rows sorted by expert, ``counts`` rows per (local) expert."""

    counts: List[int]

    def linear(self, x_RI: torch.Tensor, w_EIO: torch.Tensor) -> torch.Tensor:
        return grouped_mm(x_RI, w_EIO, self.counts)

    def bias(self, h_RO: torch.Tensor, b_EO: torch.Tensor) -> torch.Tensor:
        return h_RO + b_EO.repeat_interleave(torch.tensor(self.counts, device=h_RO.device), dim=0)


ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu}
