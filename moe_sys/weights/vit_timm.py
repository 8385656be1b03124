"""timm ViT state dicts (``vit_*_patch*``: VisionTransformer with a class token and absolute positions)
-> moe_sys's ViT (moe_sys/models/vit.py), from a .safetensors file or a .pth/.pt/.bin file read with
``weights_only=True`` (no code in a checkpoint runs).

Our ViT uses timm's module names, except the embedding (patch_embed.proj, cls_token, pos_embed live
under ``embed.``). timm's ``fc_norm`` (the norm after average pooling, global_pool 'avg', where its
``norm`` is an Identity) is our final norm with ``pool: mean``. The classifier ``head`` is not part of
the encoder and is left out. Layer scale, register/distillation tokens, qk-norm and attention pooling
have no counterpart: their keys are refused by name.
"""
from __future__ import annotations

import re
from typing import Dict, List, Optional, Tuple

import torch
from safetensors.torch import load_file

RULES: List[Tuple[str, str]] = [
    (r"patch_embed\.proj\.(weight|bias)", r"embed.proj.\1"),
    (r"cls_token", "embed.cls_token"),
    (r"pos_embed", "embed.pos_embed"),
    (r"blocks\.(\d+)\.(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.(weight|bias)", r"blocks.\1.\2.\3"),
    (r"(?:fc_)?norm\.(weight|bias)", r"norm.\1"),
]
LEFT_OUT = re.compile(r"head\..*")
TORCH_SUFFIXES = (".pth", ".pt", ".bin")


def read_timm(path: str) -> Dict[str, torch.Tensor]:
    """The state dict in a timm checkpoint file (a bare state dict, or one under 'state_dict' / 'model')."""
    if path.endswith(".safetensors"):
        return load_file(path)
    if not path.endswith(TORCH_SUFFIXES):
        raise ValueError(f"{path}: expected a timm state dict as .safetensors or {'/'.join(TORCH_SUFFIXES)}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    return state


def rename(key: str) -> Optional[str]:
    for pattern, replacement in RULES:
        if re.fullmatch(pattern, key):
            return re.sub(pattern, replacement, key)
    return None


def from_timm(state: Dict[str, torch.Tensor], path: str) -> Dict[str, torch.Tensor]:
    """timm keys -> ours; one line naming the first key that has no counterpart."""
    out: Dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if LEFT_OUT.fullmatch(key):
            continue
        new = rename(key)
        if new is None:
            raise ValueError(f"{path}: timm key {key!r} has no counterpart in moe_sys's ViT (layer scale, register "
                             "or distillation tokens, qk-norm and attention pooling are not supported)")
        if new in out:
            raise ValueError(f"{path}: has both norm and fc_norm weights; moe_sys's ViT has one final norm")
        out[new] = value
    return out


def needs_mean_pool(state: Dict[str, torch.Tensor]) -> bool:
    """Were these weights trained with average pooling (their final norm is fc_norm, after the pool)?"""
    return "fc_norm.weight" in state
