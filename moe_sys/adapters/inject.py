"""Putting adapters into a model from the ``adapters`` config, and managing them by name afterwards.

``inject`` is the adapters step of parallelization (after expert sharding, before the DeepSpeed
engine): freeze the base, wrap every target of every spec, load saved adapter weights, shard the
adapter experts over the expert-parallel ranks, log trainable vs total parameters. The other
functions find adapter layers by name in a model (plain or ``engine.module``): switch them, route
them per domain, merge them into the base weights.
"""
from __future__ import annotations

import logging
from typing import Dict, List, Optional, Sequence, Tuple

import torch.nn as nn

# Importing the type modules registers them in ADAPTERS.
from moe_sys.adapters import (adapter_experts, bottleneck, ia3, lora, prefix, prompt_pool, stochastic,  # noqa: F401
                              task_conditioned)
from moe_sys.adapters import io
from moe_sys.adapters.base import ADAPTERS, AdapterLayer, Selection, Site, SlotAdapter, matches
from moe_sys.config.adapters import AdaptersConfig, SlotSpec
from moe_sys.parallel.experts import is_expert_parallel, shard_and_mark

log = logging.getLogger("moe_sys")


def inject(model: nn.Module, cfg: AdaptersConfig, domains: Sequence[str], groups=None) -> List[AdapterLayer]:
    """Freeze ``model`` and add the configured adapters (specs of ``cfg.load_from`` when none are listed).

    Args:
        domains: data domain names in domain-id order (per-domain selection, task routers).
        groups: ExpertGroups to shard adapter experts over, or None for a single-device model.
    Returns:
        the adapter layers added, outermost last.
    """
    specs = list(cfg.modules) or (io.read_manifest(cfg.load_from)["specs"] if cfg.load_from else [])
    for param in model.parameters():
        param.requires_grad_(False)
    layers = [layer for spec in specs for layer in add_adapter(model, spec, domains)]
    if cfg.load_from:
        io.load_adapter_weights(model, cfg.load_from)
    if groups is not None:
        for layer in layers:
            if is_expert_parallel(layer):
                shard_and_mark(layer, groups)
    trainable, total = parameter_counts(model, groups.ep_size if groups is not None else 1)
    log.info("adapters %s: %s trainable of %s parameters (%.2f%%)", [s.name for s in specs], f"{trainable:,}",
             f"{total:,}", 100.0 * trainable / max(total, 1))
    return layers


def add_adapter(model: nn.Module, spec, domains: Sequence[str]) -> List[AdapterLayer]:
    """Wrap every module matching ``spec.targets`` (innermost first, so nested targets compose)."""
    kind = ADAPTERS[spec.type]
    names = [name for name, _ in model.named_modules() if matches(name, spec.targets)]
    for pattern in spec.targets:
        if not any(matches(name, [pattern]) for name in names):
            raise ValueError(f"adapter {spec.name!r}: target {pattern!r} matches no module of the model")
    d_model = model.embed.embedding_dim
    layers = []
    for name in sorted(names, key=lambda n: -n.count(".")):
        base = model.get_submodule(name)
        if not isinstance(base, kind.wraps):
            raise TypeError(f"adapter {spec.name!r}: {name} is a {type(base).__name__}, but {spec.type} adapters "
                            f"wrap {kind.wraps_names()}")
        layer = kind.build(base, spec, Site(name, d_model, len(domains)))
        layer.spec = spec
        _replace(model, name, layer)
        layers.append(layer)
    if isinstance(spec, SlotSpec):
        _set_selection(model, spec.name, _initial_selection(spec, domains))
    return layers


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _initial_selection(spec: SlotSpec, domains: Sequence[str]) -> Selection:
    slots = spec.slot_names()
    if spec.select == "fixed":
        return Selection(fixed=slots.index(spec.active) if spec.active else 0)
    slot_of = spec.domain_slots or {d: d for d in domains if d in slots}
    return Selection(slot_of_domain=tuple(slots.index(slot_of[d]) if d in slot_of else -1 for d in domains))


def adapter_layers(model: nn.Module, name: Optional[str] = None) -> List[AdapterLayer]:
    """The adapter layers of ``model`` (of the adapter ``name`` only, when given)."""
    found = [m for m in model.modules() if isinstance(m, AdapterLayer) and name in (None, m.adapter_name)]
    if name is not None and not found:
        raise KeyError(f"no adapter named {name!r} in the model")
    return found


def set_active(model: nn.Module, name: str, slot: Optional[str]) -> None:
    """Every example uses ``slot`` of adapter ``name``; None switches the adapter off."""
    _set_selection(model, name, Selection(fixed=None if slot is None else _slot_index(model, name, slot)))


def set_per_domain(model: nn.Module, name: str, slot_of_domain: Sequence[Optional[str]]) -> None:
    """Example b uses slot ``slot_of_domain[domain_id[b]]`` (None: no adapter), in one batched pass."""
    slots = tuple(-1 if s is None else _slot_index(model, name, s) for s in slot_of_domain)
    _set_selection(model, name, Selection(slot_of_domain=slots))


def _slot_index(model: nn.Module, name: str, slot: str) -> int:
    slots = _slot_layers(model, name)[0].slots
    if slot not in slots:
        raise KeyError(f"adapter {name!r} has no slot {slot!r} (slots: {slots})")
    return slots.index(slot)


def _slot_layers(model: nn.Module, name: str) -> List[SlotAdapter]:
    layers = adapter_layers(model, name)
    if not all(isinstance(layer, SlotAdapter) for layer in layers):
        raise TypeError(f"adapter {name!r} is routed by its own router; it has no slots to select")
    return layers


def _set_selection(model: nn.Module, name: str, selection: Selection) -> None:
    for layer in _slot_layers(model, name):
        layer.selection = selection


def merge(model: nn.Module, name: Optional[str] = None) -> None:
    """Fold the active slot of each mergeable adapter (all, or ``name``) into the base weights."""
    for layer in adapter_layers(model, name):
        layer.merge()


def unmerge(model: nn.Module, name: Optional[str] = None) -> None:
    for layer in adapter_layers(model, name):
        layer.unmerge()


def parameter_counts(model: nn.Module, ep_size: int = 1) -> Tuple[int, int]:
    """(trainable, total) parameters of the whole model; expert shards count for all ep_size ranks."""
    counts: Dict[bool, int] = {True: 0, False: 0}
    for param in model.parameters():
        shards = ep_size if getattr(param, "allreduce", True) is False else 1
        counts[param.requires_grad] += param.numel() * shards
    return counts[True], counts[True] + counts[False]


def attach(model: nn.Module, directory: str, domains: Sequence[str], groups=None) -> List[AdapterLayer]:
    """Put saved adapters (a ``save_adapters`` directory) onto a base model."""
    return inject(model, AdaptersConfig(load_from=directory), domains, groups)
