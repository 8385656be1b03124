"""Adapters on disk: safetensors + a small JSON manifest (whole-model weights: ``moe_sys.weights.io``).

Adapter directory:
    adapters.safetensors   every adapter parameter under its name in the model, full size (expert banks
                           that were sharded over expert-parallel ranks are gathered first)
    manifest.json          {"format": 1, "specs": [the adapter config entries], "tensors": count}
A directory loads onto any base model the specs fit (``adapters.load_from``, or ``inject.attach``).
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict

import torch
import torch.distributed as dist
import torch.nn as nn
from pydantic import TypeAdapter
from safetensors.torch import save_file

from moe_sys.adapters.base import AdapterLayer
from moe_sys.config.adapters import AnySpec
from moe_sys.safe_load import load_safetensors

ADAPTER_FILE, MANIFEST_FILE, FORMAT = "adapters.safetensors", "manifest.json", 1


def _sharded(layer: AdapterLayer, param: torch.Tensor) -> bool:
    return getattr(param, "allreduce", True) is False and getattr(layer, "ep_group", None) is not None


def adapter_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """Every adapter parameter by its name in the model, full size. Expert banks sharded over an
    expert-parallel group are all-gathered, so every rank must call this."""
    state = {}
    for path, layer in model.named_modules():
        if not isinstance(layer, AdapterLayer):
            continue
        for name, param in layer.adapter_parameters():
            tensor = param.detach()
            if _sharded(layer, param):
                full = tensor.new_empty((tensor.shape[0] * dist.get_world_size(layer.ep_group), *tensor.shape[1:]))
                dist.all_gather_single(full, tensor.contiguous(), group=layer.ep_group)
                tensor = full
            state[f"{path}.{name}"] = tensor.cpu().contiguous()
    return state


def save_adapters(model: nn.Module, directory: str) -> None:
    """Write the model's adapters (weights + specs) to ``directory``; call on every rank, rank 0 writes."""
    state = adapter_state_dict(model)
    if dist.is_initialized() and dist.get_rank() != 0:
        return
    os.makedirs(directory, exist_ok=True)
    save_file(state, os.path.join(directory, ADAPTER_FILE), metadata={"format": str(FORMAT)})
    specs = [s.model_dump(mode="json") for s in _specs_in_injection_order(model)]
    manifest = {"format": FORMAT, "specs": specs, "tensors": len(state)}
    with open(os.path.join(directory, MANIFEST_FILE), "w") as f:
        json.dump(manifest, f, indent=1)


def _specs_in_injection_order(model: nn.Module) -> list:
    """Specs in an order that rebuilds the model: an adapter that wraps another one's layers was
    injected after it, and its own layers sit inside fewer ``base_layer``s."""
    nesting = {}
    for path, layer in model.named_modules():
        if isinstance(layer, AdapterLayer):
            depth = path.split(".").count("base_layer")
            nesting[id(layer.spec)] = (max(depth, nesting.get(id(layer.spec), (0, None))[0]), layer.spec)
    return [spec for _, spec in sorted(nesting.values(), key=lambda item: -item[0])]


def read_manifest(directory: str) -> Dict[str, Any]:
    """The manifest with its specs parsed back into config objects."""
    path = os.path.join(directory, MANIFEST_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{directory}: no {MANIFEST_FILE}; not an adapter directory")
    with open(path) as f:
        manifest = json.load(f)
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path}: adapter format {manifest.get('format')!r}, expected {FORMAT}")
    parse = TypeAdapter(AnySpec).validate_python
    return {**manifest, "specs": [parse(spec) for spec in manifest["specs"]]}


def base_state(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The base model's weights in the state dict of a model with adapters: every adapter's own
    parameters dropped, ``base_layer`` taken out of the names (an identity for a plain model)."""
    wrapped = {".".join(k.split(".")[:i]) for k in state for i, part in enumerate(k.split(".")) if part == "base_layer"}
    out = {}
    for key, tensor in state.items():
        parts = key.split(".")
        if not any(".".join(parts[:i]) in wrapped and parts[i] != "base_layer" for i in range(1, len(parts))):
            out[".".join(p for p in parts if p != "base_layer")] = tensor
    return out


def load_adapter_weights(model: nn.Module, directory: str) -> None:
    """Copy saved adapter weights into the model's adapters (names and shapes must match; expert
    banks already sharded over EP take their own slice)."""
    state = load_safetensors(os.path.join(directory, ADAPTER_FILE))
    params = {f"{path}.{name}": (layer, p) for path, layer in model.named_modules() if isinstance(layer, AdapterLayer)
              for name, p in layer.adapter_parameters()}
    missing, unexpected = sorted(set(params) - set(state)), sorted(set(state) - set(params))
    if missing or unexpected:
        raise ValueError(f"{directory}: adapter weights do not fit the model's adapters: missing {missing[:4]}, "
                         f"unexpected {unexpected[:4]}")
    with torch.no_grad():
        for key, (layer, param) in params.items():
            tensor = state[key]
            if _sharded(layer, param):
                local = param.shape[0]
                tensor = tensor[layer.ep_rank * local:(layer.ep_rank + 1) * local]
            if tensor.shape != param.shape:
                raise ValueError(f"{directory}: {key} has shape {tuple(tensor.shape)}, the model's is "
                                 f"{tuple(param.shape)}")
            param.copy_(tensor)
