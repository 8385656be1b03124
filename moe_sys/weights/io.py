"""Whole single-device model weights in and out, for every reader (``train.init_from``, ``merge``,
``convert``): a .safetensors file, a DeepSpeed checkpoint (run dir, checkpoints/ dir or tag dir), or a
Hugging Face model directory (config.json + safetensors, converted by ``moe_sys.weights.hf``).

Every reader returns one state dict with expert banks stacked [E, ...], as a single-device model has.
"""
from __future__ import annotations

import glob
import os
from typing import Dict

import torch
import torch.nn as nn
from safetensors.torch import save_file

from moe_sys.parallel.deepspeed_engine import stack_expert_keys
from moe_sys.safe_load import load_safetensors, load_torch


def read_model_weights(path: str) -> Dict[str, torch.Tensor]:
    """A single-device state dict from a .safetensors file, a DeepSpeed checkpoint or a Hugging Face dir."""
    if path.endswith(".safetensors"):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no such file")
        return load_safetensors(path)
    if os.path.isfile(os.path.join(path, "config.json")):
        from moe_sys.weights import hf_read

        return hf_read.read_hf_model(path)[1]
    tag_dir = _tag_dir(path)
    state = load_torch(os.path.join(tag_dir, "mp_rank_00_model_states.pt"))["module"]
    for expert_file in sorted(glob.glob(os.path.join(tag_dir, "layer_*_expert_*_mp_rank_00_model_states.pt"))):
        state.update(load_torch(expert_file))
    return stack_expert_keys(state)


def _tag_dir(path: str) -> str:
    for root in (os.path.join(path, "checkpoints"), path):
        latest = os.path.join(root, "latest")
        if os.path.exists(latest):
            with open(latest) as f:
                return os.path.join(root, f.read().strip())
    if os.path.exists(os.path.join(path, "mp_rank_00_model_states.pt")):
        return path
    raise FileNotFoundError(f"{path}: neither a .safetensors file, a DeepSpeed checkpoint (run dir, checkpoints "
                            "dir or tag dir) nor a Hugging Face model dir (config.json)")


def load_model_weights(model: nn.Module, path: str) -> None:
    """Load a whole model's weights (strict: every key must fit, with the same shape)."""
    state = read_model_weights(path)
    own = model.state_dict()
    for key, tensor in state.items():
        if key in own and own[key].shape != tensor.shape:
            raise ValueError(f"{path}: {key} has shape {tuple(tensor.shape)}, the model's is {tuple(own[key].shape)}")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not fit the model: missing {missing[:4]}, unexpected {unexpected[:4]}")


def save_model_weights(state: Dict[str, torch.Tensor], path: str, metadata: Dict[str, str] = None) -> None:
    """safetensors refuses tensors sharing storage (tied embeddings): every entry is saved as its own copy."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file({k: v.detach().cpu().clone().contiguous() for k, v in state.items()}, path, metadata=metadata)
