"""Pre-trained ViT weights into moe_sys's ViT, by what the path holds: a directory is a Hugging Face
ViTModel (vit_hf.py), a file a timm state dict (vit_timm.py). Loading is strict: every weight of the
model must come from the file with its shape, and every tensor of the file must land somewhere (an
MoE block where the file has a dense MLP, a different image size or width: one line naming the key)."""
from __future__ import annotations

import os
from typing import Dict

import torch
import torch.nn as nn
import torch.nn.functional as F

from moe_sys.weights import vit_hf, vit_timm


def read_pretrained(path: str, model_cfg) -> Dict[str, torch.Tensor]:
    """Our state dict from a HF directory or a timm file (checked against ``model_cfg``: ModelConfig)."""
    if os.path.isdir(path):
        return vit_hf.read_hf(path, model_cfg)
    if not os.path.isfile(path):
        raise ValueError(f"model.vit.pretrained: no file or directory at {path!r}")
    raw = vit_timm.read_timm(path)
    if vit_timm.needs_mean_pool(raw) and model_cfg.vit.pool != "mean":
        raise ValueError(f"{path}: these timm weights were trained with average pooling (fc_norm); set "
                         "model.vit.pool: mean")
    return vit_timm.from_timm(raw, path)


def load_pretrained(model: nn.Module, model_cfg, path: str) -> None:
    load_state(model, read_pretrained(path, model_cfg), path)


def load_state(model: nn.Module, state: Dict[str, torch.Tensor], path: str) -> None:
    """Strict load with a one-line error for the first missing, unexpected or misshapen key."""
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not fit the ViT of this config: missing {missing[:3]}, unexpected "
                         f"{unexpected[:3]} (check model.n_layers, moe.enabled)")
    for key, tensor in state.items():
        if tensor.shape != own[key].shape:
            raise ValueError(f"{path}: {key} has shape {tuple(tensor.shape)}, the ViT of this config expects "
                             f"{tuple(own[key].shape)} (check model.d_model, d_ff, vit.image_size, patch_size, "
                             "in_channels)")
    model.load_state_dict(state, strict=True)


def fit_positions(state: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """``state`` with its learned positions resampled to the model's patch grid when the image sizes
    differ (timm's resample_abs_pos_embed: the class token's position kept, the g x g grid bicubic)."""
    pos_1SD, own_1SD = state.get("embed.pos_embed"), model.embed.pos_embed
    if pos_1SD is None or pos_1SD.shape == own_1SD.shape or pos_1SD.shape[-1] != own_1SD.shape[-1]:
        return state
    old, new = (int(round((t.shape[1] - 1) ** 0.5)) for t in (pos_1SD, own_1SD))
    grid_1Dgg = pos_1SD[:, 1:].reshape(1, old, old, -1).permute(0, 3, 1, 2).float()
    grid_1ND = F.interpolate(grid_1Dgg, size=(new, new), mode="bicubic", align_corners=False).flatten(2).transpose(1, 2)
    return {**state, "embed.pos_embed": torch.cat([pos_1SD[:, :1], grid_1ND.to(pos_1SD.dtype)], 1)}
