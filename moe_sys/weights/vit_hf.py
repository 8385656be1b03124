"""Hugging Face ``ViTModel`` directories (config.json + model.safetensors, as ``save_pretrained`` writes
them; a ``ViTFor*`` checkpoint's ``vit.`` prefix is stripped) -> moe_sys's ViT (moe_sys/models/vit.py).

config.json must describe the model section (``model_fields``); a mismatch is one line naming both
keys. On disk HF keeps q, k and v apart (``attention.attention.query/key/value``); our Attention has
one fused ``qkv`` whose rows are [q; k; v], each split into heads the same way, so the three matrices
are stacked. Features are ``last_hidden_state[:, 0]``: the pooler (a tanh dense layer on the class
token) and the masked-image-modelling mask token are not part of the encoder and are left out.
"""
from __future__ import annotations

import json
import os
import re
from typing import Any, Dict, List, Tuple

import torch
from safetensors.torch import load_file

CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"
LAYER = r"encoder\.layer\.(\d+)\."
RULES: List[Tuple[str, str]] = [
    (r"embeddings\.cls_token", "embed.cls_token"),
    (r"embeddings\.position_embeddings", "embed.pos_embed"),
    (r"embeddings\.patch_embeddings\.projection\.(weight|bias)", r"embed.proj.\1"),
    (LAYER + r"layernorm_before\.(weight|bias)", r"blocks.\1.norm1.\2"),
    (LAYER + r"attention\.output\.dense\.(weight|bias)", r"blocks.\1.attn.proj.\2"),
    (LAYER + r"layernorm_after\.(weight|bias)", r"blocks.\1.norm2.\2"),
    (LAYER + r"intermediate\.dense\.(weight|bias)", r"blocks.\1.mlp.fc1.\2"),
    (LAYER + r"output\.dense\.(weight|bias)", r"blocks.\1.mlp.fc2.\2"),
    (r"layernorm\.(weight|bias)", r"norm.\1"),
]
QKV = re.compile(LAYER + r"attention\.attention\.(query|key|value)\.(weight|bias)")
LEFT_OUT = re.compile(r"pooler\..*|embeddings\.mask_token|classifier\..*")


def model_fields(hf: Dict[str, Any]) -> Dict[str, Any]:
    """The model-section values a HF ViT config.json stands for (dotted keys)."""
    return {
        "d_model": hf["hidden_size"], "n_layers": hf["num_hidden_layers"], "n_heads": hf["num_attention_heads"],
        "d_ff": hf["intermediate_size"], "norm_eps": hf.get("layer_norm_eps", 1e-12),
        "vit.image_size": hf.get("image_size", 224), "vit.patch_size": hf.get("patch_size", 16),
        "vit.in_channels": hf.get("num_channels", 3), "vit.qkv_bias": hf.get("qkv_bias", True),
    }


def config_problems(directory: str, model_cfg) -> List[str]:
    """One line per way the directory cannot be loaded into the ViT of ``model_cfg`` (ModelConfig): missing
    files, not a plain GELU ViT, a config.json value that differs from the model section's."""
    config_path = os.path.join(directory, CONFIG_FILE)
    for needed in (config_path, os.path.join(directory, WEIGHTS_FILE)):
        if not os.path.isfile(needed):
            return [f"{directory}: no {os.path.basename(needed)}; expected a Hugging Face ViTModel directory"]
    with open(config_path) as f:
        hf = json.load(f)
    if hf.get("model_type") != "vit" or hf.get("hidden_act", "gelu") != "gelu":
        return [f"{config_path}: model_type={hf.get('model_type')!r}, hidden_act={hf.get('hidden_act')!r}; "
                "expected a 'vit' model with 'gelu'"]
    try:
        fields = model_fields(hf)
    except KeyError as e:
        return [f"{config_path}: missing key {e.args[0]!r}"]
    problems = []
    for key, value in fields.items():
        mine = getattr(model_cfg.vit if key.startswith("vit.") else model_cfg, key.split(".")[-1])
        if mine != value:
            problems.append(f"{config_path}: gives model.{key} = {value!r}, but the config has {mine!r}")
    return problems


def read_hf(directory: str, model_cfg) -> Dict[str, torch.Tensor]:
    """Check the directory against ``model_cfg``, read model.safetensors, return our state dict."""
    problems = config_problems(directory, model_cfg)
    if problems:
        raise ValueError(problems[0])
    weights_path = os.path.join(directory, WEIGHTS_FILE)
    return from_hf(load_file(weights_path), weights_path)


def from_hf(state: Dict[str, torch.Tensor], path: str) -> Dict[str, torch.Tensor]:
    """HF keys -> ours, q/k/v stacked into qkv; one line naming the first key with no counterpart."""
    out: Dict[str, torch.Tensor] = {}
    qkv: Dict[Tuple[str, str], Dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        key = key[len("vit."):] if key.startswith("vit.") else key
        if LEFT_OUT.fullmatch(key):
            continue
        match = QKV.fullmatch(key)
        if match:
            qkv.setdefault((match.group(1), match.group(3)), {})[match.group(2)] = value
            continue
        new = next((re.sub(p, r, key) for p, r in RULES if re.fullmatch(p, key)), None)
        if new is None:
            raise ValueError(f"{path}: key {key!r} has no counterpart in moe_sys's ViT")
        out[new] = value
    for (layer, kind), parts in qkv.items():
        if set(parts) != {"query", "key", "value"}:
            raise ValueError(f"{path}: layer {layer} has attention {kind}s for {sorted(parts)} only")
        out[f"blocks.{layer}.attn.qkv.{kind}"] = torch.cat([parts["query"], parts["key"], parts["value"]], 0)
    return out
