"""Read a Hugging Face model directory (config.json + safetensors, single file or sharded with
model.safetensors.index.json) into a moe_sys Config and a single-device moe_sys state dict.

Every refusal is one line naming the file and the key (HFConversionError).
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, Tuple

import torch
from pydantic import ValidationError
from safetensors import safe_open

from moe_sys.config.schema import Config
from moe_sys.weights import (hf_llama, hf_mixtral, hf_olmoe, hf_qwen2, hf_qwen2_moe, hf_qwen3,  # noqa: F401 register
                             hf_qwen3_moe)
from moe_sys.weights.hf_family import FAMILIES, Family, HFConversionError
from moe_sys.weights.hf_state import Mapper, State, unfuse

INDEX_FILE, SINGLE_FILE = "model.safetensors.index.json", "model.safetensors"
REFUSED = {"deepseek_v3": "needs multi-head latent attention (MLA), which moe_sys does not implement",
           "deepseek_v2": "needs multi-head latent attention (MLA), which moe_sys does not implement"}


def read_json(path: str) -> Dict[str, Any]:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise HFConversionError(f"{path}: no such file") from None
    except json.JSONDecodeError as e:
        raise HFConversionError(f"{path}: not valid JSON ({e})") from None


def family_of(hf_cfg: Dict[str, Any], path: str) -> Family:
    model_type = hf_cfg.get("model_type")
    if model_type in REFUSED:
        raise HFConversionError(f"{path}: model_type={model_type!r} {REFUSED[model_type]}")
    if model_type not in FAMILIES:
        raise HFConversionError(f"{path}: model_type={model_type!r} is not supported (supported: "
                                f"{', '.join(sorted(FAMILIES))})")
    return FAMILIES[model_type]


def config_from_hf(hf_dir: str) -> Tuple[Config, Family]:
    """The moe_sys Config matching a HF config.json (data, train and parallel keep their defaults)."""
    path = os.path.join(hf_dir, "config.json")
    hf_cfg = read_json(path)
    family = family_of(hf_cfg, path)
    try:
        sections = family.to_moe_sys(hf_cfg, path)
        sections["data"] = {"seq_len": min(128, sections["model"]["max_seq_len"])}
        return Config.model_validate(sections), family
    except KeyError as e:
        raise HFConversionError(f"{path}: missing key {e.args[0]!r} (needed by {family.model_type})") from None
    except ValidationError as e:
        err = e.errors()[0]
        raise HFConversionError(f"{path}: gives {'.'.join(map(str, err['loc']))} = {err.get('input')!r}: "
                                f"{err['msg']}") from None


def read_safetensors(hf_dir: str) -> Tuple[State, Dict[str, str]]:
    """All tensors of the checkpoint and the file each came from."""
    index_path = os.path.join(hf_dir, INDEX_FILE)
    if os.path.exists(index_path):
        weight_map = read_json(index_path).get("weight_map")
        if not isinstance(weight_map, dict):
            raise HFConversionError(f"{index_path}: no 'weight_map'")
    elif os.path.exists(os.path.join(hf_dir, SINGLE_FILE)):
        weight_map = None
    else:
        raise HFConversionError(f"{hf_dir}: no {SINGLE_FILE} or {INDEX_FILE} (only safetensors checkpoints are read)")
    files = sorted(set(weight_map.values())) if weight_map else [SINGLE_FILE]
    state, origin = {}, {}
    for name in files:
        path = os.path.join(hf_dir, name)
        if not os.path.exists(path):
            key = next(k for k, v in weight_map.items() if v == name)
            raise HFConversionError(f"{path}: missing shard (listed in {INDEX_FILE} for {key})")
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                state[key], origin[key] = f.get_tensor(key), path
    for key, name in (weight_map or {}).items():
        if key not in state:
            raise HFConversionError(f"{os.path.join(hf_dir, name)}: missing key {key} (listed in {INDEX_FILE})")
    return state, origin


def expected_hf_shapes(cfg: Config, mapper: Mapper) -> Dict[str, torch.Size]:
    """HF key -> shape, from the moe_sys model the config builds (on the meta device: no memory)."""
    from moe_sys.models.transformer import TransformerLM

    with torch.device("meta"):
        model = TransformerLM(cfg.model, cfg.moe, num_domains=len(cfg.data.domains))
    return {k: t.shape for k, t in mapper.to_hf(model.state_dict()).items()}


def check_keys(hf: State, origin: Dict[str, str], expected: Dict[str, torch.Size], hf_dir: str, family: Family) -> None:
    where = os.path.join(hf_dir, INDEX_FILE if os.path.exists(os.path.join(hf_dir, INDEX_FILE)) else SINGLE_FILE)
    for key, shape in expected.items():
        if key not in hf:
            raise HFConversionError(f"{where}: missing key {key}")
        if hf[key].shape != shape:
            raise HFConversionError(f"{origin.get(key, where)}: {key} has shape {tuple(hf[key].shape)}, "
                                    f"config.json implies {tuple(shape)}")
    for key in hf:
        if key not in expected:
            raise HFConversionError(f"{origin.get(key, where)}: unexpected key {key} for a {family.model_type} "
                                    "model with this config.json")


def read_hf_model(hf_dir: str) -> Tuple[Config, State]:
    """(moe_sys Config, moe_sys state dict) of a Hugging Face model directory."""
    cfg, family = config_from_hf(hf_dir)
    raw, origin = read_safetensors(hf_dir)
    hf = {k: v for k, v in unfuse(raw, family, origin).items() if not k.endswith("rotary_emb.inv_freq")}
    if cfg.model.tie_embeddings:
        hf.pop("lm_head.weight", None)
    mapper = Mapper(cfg, family)
    check_keys(hf, origin, expected_hf_shapes(cfg, mapper), hf_dir, family)
    return cfg, mapper.from_hf(hf)
