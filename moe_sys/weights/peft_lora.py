"""LoRA adapters in PEFT's format (adapter_config.json + adapter_model.safetensors) for the Hugging Face
family a base model exports to, and back.

Legend: I input features, O output features, R rank, N slots.

moe_sys's LoRA on the fused ``qkv`` becomes three PEFT LoRAs (q/k/v_proj) sharing A (lora_A = A^T) with
B split by output rows (q and k rows permuted to HF's rotary order, as the base weights are). Imported
back, q/k/v LoRAs of rank R each fuse exactly into one of rank 3R: A = [A_q | A_k | A_v], B block
diagonal; every other target is zero-padded to the same rank (one spec has one rank) and alpha keeps
the scale. Only a single-slot LoRA on dense-layer linears (attention, dense FFN) is expressible.
"""
from __future__ import annotations

import json
import os
import re
from typing import Dict, List, Tuple

import torch
from safetensors.torch import load_file

from moe_sys.adapters.io import ADAPTER_FILE, MANIFEST_FILE, read_manifest
from moe_sys.adapters.lora import lora_scale
from moe_sys.weights.hf_family import HFConversionError
from moe_sys.weights.hf_state import Mapper, permute_heads
from moe_sys.weights.io import save_model_weights

PEFT_CONFIG, PEFT_WEIGHTS, PREFIX = "adapter_config.json", "adapter_model.safetensors", "base_model.model."
LINEARS = {"attn.proj": "self_attn.o_proj", "ffn.gate": "mlp.gate_proj", "ffn.up": "mlp.up_proj",
           "ffn.down": "mlp.down_proj"}
_SITE = re.compile(r"^layers\.(\d+)\.(attn\.qkv|attn\.proj|ffn\.gate|ffn\.up|ffn\.down)\.bank\.(A_NIR|B_NRO)$")


def _single_lora(adapter_dir: str):
    specs = read_manifest(adapter_dir)["specs"]
    if len(specs) != 1 or specs[0].type != "lora" or len(specs[0].slot_names()) != 1:
        raise HFConversionError(f"{adapter_dir}/{MANIFEST_FILE}: PEFT holds one single-slot LoRA; got "
                                f"{[(s.type, s.slot_names()) for s in specs]}")
    return specs[0]


def export_lora(adapter_dir: str, cfg, family, out: str) -> List[str]:
    """Write ``out``/adapter_config.json + adapter_model.safetensors; returns the PEFT target names."""
    spec = _single_lora(adapter_dir)
    state, mapper, peft = load_file(os.path.join(adapter_dir, ADAPTER_FILE)), Mapper(cfg, family), {}
    for key in sorted(state):
        match = _SITE.match(key)
        if match is None:
            raise HFConversionError(f"{adapter_dir}/{ADAPTER_FILE}: {key} has no PEFT target in {family.model_type}")
        layer, site, which = match.groups()
        if which == "B_NRO":
            continue
        A_IR, B_RO = state[key][0], state[key[:-len("A_NIR")] + "B_NRO"][0]
        for module, B_part in _hf_parts(mapper, site, B_RO):
            base = f"{PREFIX}model.layers.{layer}.{module}"
            peft[base + ".lora_A.weight"], peft[base + ".lora_B.weight"] = A_IR.t().contiguous(), B_part
    targets = sorted({k.split(".")[-3] for k in peft})
    os.makedirs(out, exist_ok=True)
    save_model_weights(peft, os.path.join(out, PEFT_WEIGHTS), metadata={"format": "pt"})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": spec.rank, "lora_alpha": spec.alpha,
              "lora_dropout": spec.dropout, "use_rslora": spec.rslora, "target_modules": targets, "bias": "none",
              "fan_in_fan_out": False, "base_model_name_or_path": None, "modules_to_save": None}
    with open(os.path.join(out, PEFT_CONFIG), "w") as f:
        json.dump(config, f, indent=2)
    return targets


def _hf_parts(mapper: Mapper, site: str, B_RO: torch.Tensor) -> List[Tuple[str, torch.Tensor]]:
    """(HF module, lora_B [O_part, R]) pieces of one moe_sys LoRA's B."""
    if site != "attn.qkv":
        return [(LINEARS[site], B_RO.t().contiguous())]
    q, k, v = B_RO.t().split(mapper.widths)
    q, k = (permute_heads(t, mapper.d, mapper.to_hf_index) for t in (q, k))
    return [(f"self_attn.{n}_proj", t.contiguous()) for n, t in zip("qkv", (q, k, v))]


def import_lora(peft_dir: str, cfg, family, out: str) -> None:
    """A PEFT LoRA dir -> a moe_sys adapter dir (manifest.json + adapters.safetensors)."""
    from moe_sys.config.adapters import LoRASpec

    with open(os.path.join(peft_dir, PEFT_CONFIG)) as f:
        pc = json.load(f)
    peft = load_file(os.path.join(peft_dir, PEFT_WEIGHTS))
    mapper, r = Mapper(cfg, family), pc["r"]
    sites: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = {}
    for layer in range(cfg.model.n_layers):
        sites.update(_fuse_layer(peft, mapper, layer, r))
    if not sites:
        raise HFConversionError(f"{peft_dir}/{PEFT_WEIGHTS}: no LoRA weights on attention or dense FFN linears")
    rank = max(A.shape[1] for A, _ in sites.values())
    state = {}
    for site, (A_IR, B_RO) in sites.items():  # zero-pad to one rank: exact
        state[site + ".bank.A_NIR"] = torch.nn.functional.pad(A_IR, (0, rank - A_IR.shape[1]))[None]
        state[site + ".bank.B_NRO"] = torch.nn.functional.pad(B_RO, (0, 0, 0, rank - B_RO.shape[0]))[None]
    scale = lora_scale(pc["lora_alpha"], r, pc.get("use_rslora", False))
    alpha = scale * (rank ** 0.5 if pc.get("use_rslora", False) else rank)
    targets = sorted({re.sub(r"^layers\.\d+\.", "layers.*.", s) for s in sites})
    spec = LoRASpec(name="peft", targets=targets, rank=rank, alpha=alpha, rslora=pc.get("use_rslora", False))
    os.makedirs(out, exist_ok=True)
    save_model_weights(state, os.path.join(out, ADAPTER_FILE), metadata={"format": "1"})
    with open(os.path.join(out, MANIFEST_FILE), "w") as f:
        json.dump({"format": 1, "specs": [spec.model_dump(mode="json")], "tensors": len(state)}, f, indent=1)


def _fuse_layer(peft, mapper: Mapper, layer: int, r: int) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
    base = f"{PREFIX}model.layers.{layer}."
    get = lambda m, ab: peft.get(f"{base}{m}.lora_{ab}.weight")  # noqa: E731
    sites = {}
    for ours, module in LINEARS.items():
        if get(module, "A") is not None:
            sites[f"layers.{layer}.{ours}"] = (get(module, "A").t(), get(module, "B").t())
    parts = [(get(f"self_attn.{n}_proj", "A"), get(f"self_attn.{n}_proj", "B")) for n in "qkv"]
    if any(A is not None for A, _ in parts):
        d_in = next(A for A, _ in parts if A is not None).shape[1]
        A_IR = torch.cat([A.t() if A is not None else torch.zeros(d_in, r) for A, _ in parts], dim=1)
        B_RO = torch.zeros(3 * r, sum(mapper.widths))
        col = 0
        for n, ((A, B), width) in enumerate(zip(parts, mapper.widths)):
            if B is not None:
                rows = permute_heads(B, mapper.d, mapper.to_ours) if n < 2 else B
                B_RO[n * r:(n + 1) * r, col:col + width] = rows.t()
            col += width
        sites[f"layers.{layer}.attn.qkv"] = (A_IR, B_RO)
    return sites
