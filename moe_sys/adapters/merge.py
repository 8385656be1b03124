"""Model merging (``moe-sys merge``) and sparse upcycling.

Every method works per tensor on task vectors tau_i = theta_i - theta_0 (theta_0: the base model;
zeros for adapters, whose parameters already are deltas) and returns theta_0 + lambda * merged:
  average          sum_i w_i tau_i / sum_i w_i, lambda = 1: the weighted average of the models
  task_arithmetic  sum_i w_i tau_i (Ilharco et al. 2023)
  magnitude_prune  trim each tau_i to its int(density * n) largest magnitudes, then task arithmetic
  ties             trim, elect each entry's sign, mean of the weighted entries that agree (Yadav et al. 2023)
  dare_linear      drop each entry of tau_i with probability 1 - density and rescale the rest
                   (Yu et al. 2024), then task arithmetic
  dare_ties        DARE's drop and rescale, then TIES' sign election and disjoint mean
as PEFT computes them by default, or as mergekit does (``convention``); the differences, and the
per-slot / per-expert trimming, are in moe_sys.adapters.merge_methods.

LoRA adapters merge on their full deltas A_i B_i per slot, never on A and B apart (an average of
products is not the product of averages); the merged delta is factored back to rank ``rank`` by SVD
(exact for average and task arithmetic at the default rank, the sum of the inputs' ranks).

Legend: M merged models, N slots, I/O input/output features, R rank.
"""
from __future__ import annotations

import json
import math
import os
from typing import Dict, List, Optional, Sequence

import torch
from safetensors.torch import load_file, save_file

from moe_sys.adapters.io import ADAPTER_FILE, MANIFEST_FILE, read_model_weights, save_model_weights
from moe_sys.adapters.lora import lora_scale
from moe_sys.adapters.merge_methods import METHODS, MergeOptions, check_options, merge_tensor
from moe_sys.models.transformer import TransformerLM
from moe_sys.moe.layer import MoELayer


def merge_states(states: List[Dict[str, torch.Tensor]], opts: MergeOptions,
                 base: Optional[Dict[str, torch.Tensor]] = None) -> Dict[str, torch.Tensor]:
    """theta_0 + lambda * merged(tau) for every tensor (base None = zeros). Math in fp32."""
    check_options(opts, len(states))
    w_M = torch.tensor(opts.weights if opts.weights is not None else [1.0] * len(states), dtype=torch.float32)
    generator = torch.Generator().manual_seed(opts.seed)
    lam = 1.0 if opts.method == "average" else opts.lam
    out = {}
    for key, first in states[0].items():
        _check_same(key, states, base)
        theta0 = base[key].float() if base is not None else torch.zeros_like(first, dtype=torch.float32)
        tau_M = torch.stack([s[key].float() - theta0 for s in states])
        out[key] = (theta0 + lam * merge_tensor(key, tau_M, w_M, opts, generator)).to(first.dtype)
    return out


def _check_same(key: str, states, base) -> None:
    shapes = {tuple(s[key].shape) if key in s else None for s in states + ([base] if base is not None else [])}
    if len(shapes) != 1 or None in shapes:
        raise ValueError(f"cannot merge {key}: missing or of different shapes across inputs ({shapes})")


def merge_checkpoints(inputs: Sequence[str], out: str, opts: MergeOptions, base: Optional[str] = None) -> None:
    """Whole models (run dirs, DeepSpeed checkpoints or .safetensors) -> one .safetensors file."""
    merged = merge_states([read_model_weights(p) for p in inputs], opts, read_model_weights(base) if base else None)
    save_model_weights(merged, out, metadata={"merge": json.dumps({"method": opts.method, "convention": opts.convention,
                                                                 "inputs": list(inputs)})})


def merge_adapters(inputs: Sequence[str], out: str, opts: MergeOptions, rank: Optional[int] = None) -> float:
    """Adapter directories with the same specs -> one adapter directory.

    Returns the smallest share of a merged LoRA delta's energy (squared Frobenius norm) the rank-R
    factors keep (1.0 = exact).
    """
    manifests = [_read_json(os.path.join(d, MANIFEST_FILE)) for d in inputs]
    if any(m["specs"] != manifests[0]["specs"] for m in manifests):
        raise ValueError("adapters merge only when their specs (types, targets, sizes) are the same")
    states = [load_file(os.path.join(d, ADAPTER_FILE)) for d in inputs]
    lora_keys = {k[:-len("A_NIR")] for k in states[0] if k.endswith("A_NIR")}
    products = [{p + "AB_NIO": s[p + "A_NIR"] @ s[p + "B_NRO"] for p in lora_keys} for s in states]
    rest = [{k: v for k, v in s.items() if k[:-len("A_NIR")] not in lora_keys} for s in states]
    merged = merge_states(rest, opts)
    kept = 1.0
    for key, delta_NIO in merge_states(products, opts).items():
        prefix = key[:-len("AB_NIO")]
        r = rank or len(states) * states[0][prefix + "A_NIR"].shape[-1]
        merged[prefix + "A_NIR"], merged[prefix + "B_NRO"], share = _factor(delta_NIO, r)
        kept = min(kept, share)
    os.makedirs(out, exist_ok=True)
    save_file(merged, os.path.join(out, ADAPTER_FILE), metadata={"format": str(manifests[0]["format"])})
    specs = [_with_rank(spec, rank or len(states) * _lora_rank(spec)) for spec in manifests[0]["specs"]]
    manifest = {**manifests[0], "specs": specs, "merge": opts.method, "convention": opts.convention}
    with open(os.path.join(out, MANIFEST_FILE), "w") as f:
        json.dump(manifest, f, indent=1)
    return kept


def _factor(delta_NIO: torch.Tensor, rank: int):
    """delta ~= A B with A [N, I, R], B [N, R, O] (balanced: sqrt of the singular values on each side)."""
    U, S, Vh = torch.linalg.svd(delta_NIO.float(), full_matrices=False)
    r = min(rank, S.shape[-1])
    root = S[:, :r].sqrt()
    A = torch.zeros(*delta_NIO.shape[:2], rank)
    B = torch.zeros(delta_NIO.shape[0], rank, delta_NIO.shape[2])
    A[..., :r], B[:, :r] = U[..., :r] * root[:, None, :], root[..., None] * Vh[:, :r]
    energy = S.pow(2).sum(-1)
    share = float((S[:, :r].pow(2).sum(-1) / energy.clamp_min(1e-30)).min()) if energy.max() > 0 else 1.0
    return A.to(delta_NIO.dtype).contiguous(), B.to(delta_NIO.dtype).contiguous(), share


def _lora_holder(spec: dict) -> Optional[dict]:
    """The part of a spec that holds LoRA sizes (the spec, or a mixture's expert), or None."""
    if spec["type"] == "lora":
        return spec
    expert = spec.get("expert")
    return expert if expert is not None and expert["kind"] == "lora" else None


def _lora_rank(spec: dict) -> int:
    holder = _lora_holder(spec)
    return holder["rank"] if holder is not None else 0


def _with_rank(spec: dict, rank: int) -> dict:
    """The spec of a LoRA whose factors were re-cut to ``rank``: alpha changes so the scale stays.

    The merged delta was formed from unscaled products A B, and every input shares one scale s, so
    the output keeps s: alpha' = s * rank (s * sqrt(rank) under rsLoRA).
    """
    holder = _lora_holder(spec)
    if holder is None:
        return spec
    s = lora_scale(holder["alpha"], holder["rank"], holder["rslora"])
    new = {**holder, "rank": rank, "alpha": s * (math.sqrt(rank) if holder["rslora"] else rank)}
    return new if holder is spec else {**spec, "expert": new}


def _read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def upcycle(dense: Dict[str, torch.Tensor], cfg, noise_std: float = 0.01, seed: int = 0) -> Dict[str, torch.Tensor]:
    """Sparse upcycling (Komatsuzaki et al. 2023): the MoE model ``cfg`` describes, with every non-FFN
    weight from ``dense``, each MoE layer's experts copies of that layer's dense FFN (plus Gaussian
    noise of ``noise_std`` times the weight's std), and fresh routers.

    With noise 0 every expert computes the dense FFN, so the MoE model's output equals the dense
    model's wherever the router's weights per token sum to 1 (top-k renormalised, dropless).
    """
    if cfg.moe.activation != "swiglu" or (cfg.moe.d_expert or cfg.model.d_ff) != cfg.model.d_ff:
        raise ValueError("upcycling copies the dense SwiGLU FFN: moe.activation must be swiglu and d_expert = d_ff")
    if getattr(cfg.moe, "shared_experts", 0):
        raise ValueError("upcycling fills routed experts only; moe.shared_experts would add a fresh FFN")
    torch.manual_seed(seed)
    model = TransformerLM(cfg.model, cfg.moe, num_domains=len(cfg.data.domains))
    state = model.state_dict()
    generator = torch.Generator().manual_seed(seed)
    missing = [k for k in state if k not in dense and ".ffn." not in k]
    if missing:
        raise ValueError(f"the dense weights do not fit the model of this config: missing {missing[:4]}")
    state.update({k: dense[k] for k in state if k in dense})
    moe_layers = [i for i, layer in enumerate(model.layers) if isinstance(layer.ffn, MoELayer)]
    not_dense = [i for i in moe_layers if f"layers.{i}.ffn.gate.weight" not in dense]
    if not_dense:
        raise ValueError(f"the base holds no dense FFN at layers.{not_dense[0]}.ffn (is it an MoE model?); "
                         "upcycling starts from a dense model (moe.enabled: false)")
    for i, layer in enumerate(model.layers):
        if isinstance(layer.ffn, MoELayer):
            for bank_key, dense_key in (("w_gate_EDF", "gate"), ("w_up_EDF", "up"), ("w_down_EFD", "down")):
                weight = dense[f"layers.{i}.ffn.{dense_key}.weight"].t()  # nn.Linear [out, in] -> [in, out]
                copies = weight.expand(layer.ffn.num_experts, *weight.shape).clone()
                if noise_std > 0:
                    copies += torch.randn(copies.shape, generator=generator) * noise_std * weight.float().std()
                state[f"layers.{i}.ffn.experts.{bank_key}"] = copies
    return state


def upcycle_checkpoint(base: str, cfg, out: str, noise_std: float = 0.01, seed: int = 0) -> None:
    save_model_weights(upcycle(read_model_weights(base), cfg, noise_std, seed), out,
                       metadata={"upcycled_from": base, "noise_std": str(noise_std)})


def run(method: str, inputs: Sequence[str], out: str, opts: MergeOptions, base: Optional[str] = None,
        rank: Optional[int] = None, cfg=None, noise_std: float = 0.0) -> str:
    """``moe-sys merge``: upcycle, merge adapter directories, or merge whole models; returns a report line."""
    problem = _argument_problem(method, inputs, opts, rank)
    if problem:
        raise ValueError(problem)
    if method == "upcycle":
        if base is None or cfg is None:
            raise ValueError("upcycle needs --base (the dense model) and a config of the MoE model")
        upcycle_checkpoint(base, cfg, out, noise_std, opts.seed)
        return f"wrote {out}: {base} upcycled to {cfg.moe.num_experts} experts per MoE layer"
    if len(inputs) < 1:
        raise ValueError("nothing to merge: give the models or adapter directories")
    if all(os.path.exists(os.path.join(p, MANIFEST_FILE)) for p in inputs):
        kept = merge_adapters(inputs, out, opts, rank)
        return f"wrote {out}: {len(inputs)} adapters merged ({method}); LoRA factors keep {kept:.2%} of the delta"
    merge_checkpoints(inputs, out, opts, base)
    return f"wrote {out}: {len(inputs)} models merged ({method})"


def _argument_problem(method: str, inputs: Sequence[str], opts: MergeOptions, rank: Optional[int]) -> Optional[str]:
    """What is wrong with the command line, before any file is read."""
    if method not in (*METHODS, "upcycle"):
        return f"unknown merge method {method!r}; choose from {', '.join((*METHODS, 'upcycle'))}"
    numbers = [opts.lam, opts.density, *(opts.weights or [])]
    if not all(math.isfinite(x) for x in numbers):
        return f"--lam/--density/--weights must be finite numbers, got {numbers}"
    if method != "upcycle":
        try:
            check_options(opts, len(inputs))
        except ValueError as e:
            return str(e)
    if method == "average" and opts.weights is not None and sum(opts.weights) == 0:
        return "--weights: an average needs weights that do not sum to 0"
    if rank is not None and rank < 1:
        return f"--rank: {rank} must be at least 1"
    return None
