"""What a Hugging Face family is to the converter: its config.json <-> moe_sys config rules and the
names its checkpoint uses. One file per family (hf_llama.py, hf_mixtral.py, ...) registers one.

The attention, norm and embedding keys are the same in every supported family; the families differ in
config fields, in the MoE block's prefix and expert names, and in what they can express.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple


class HFConversionError(ValueError):
    """A conversion refused: the message is one line naming the file and the key."""


@dataclass(frozen=True)
class Family:
    model_type: str
    architecture: str  # the transformers class config.json names
    to_moe_sys: Callable[[Dict[str, Any], str], Dict[str, Any]]  # (config.json, its path) -> {"model":..., "moe":...}
    to_hf: Callable[[Any], Dict[str, Any]]  # moe_sys Config -> config.json fields beyond the shared ones
    moe_prefix: str = "mlp"  # where the MoE block lives on disk (Mixtral: block_sparse_moe)
    expert_names: Tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")  # gate, up, down


FAMILIES: Dict[str, Family] = {}


def register(family: Family) -> Family:
    FAMILIES[family.model_type] = family
    return family


def refuse_if(hf: Dict[str, Any], path: str, key: str, bad: Callable[[Any], bool], why: str) -> None:
    if key in hf and bad(hf[key]):
        raise HFConversionError(f"{path}: {key}={hf[key]!r}: {why}")


def rope_theta(hf: Dict[str, Any], path: str) -> float:
    """rope_parameters (transformers 5) or the legacy rope_theta/rope_scaling; only the default type."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    rope_type = params.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
    if rope_type != "default":
        key = "rope_parameters" if params else "rope_scaling"
        raise HFConversionError(f"{path}: {key}.rope_type={rope_type!r}: only the default rotary is implemented")
    return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def dense_model(hf: Dict[str, Any], path: str) -> Dict[str, Any]:
    """The model section every family shares."""
    refuse_if(hf, path, "hidden_act", lambda v: v != "silu", "only SwiGLU (silu) FFNs are implemented")
    refuse_if(hf, path, "mlp_bias", bool, "FFN biases are not implemented")
    refuse_if(hf, path, "use_sliding_window", bool, "sliding-window attention is not implemented")
    refuse_if(hf, path, "layer_types", lambda v: any(t != "full_attention" for t in v),
              "sliding-window attention is not implemented")
    heads = hf["num_attention_heads"]
    return {
        "vocab_size": hf["vocab_size"], "d_model": hf["hidden_size"], "n_layers": hf["num_hidden_layers"],
        "n_heads": heads, "n_kv_heads": hf.get("num_key_value_heads") or heads,
        "head_dim": hf.get("head_dim") or hf["hidden_size"] // heads, "d_ff": hf["intermediate_size"],
        "max_seq_len": hf.get("max_position_embeddings", 2048), "rope_theta": rope_theta(hf, path),
        "norm_eps": hf.get("rms_norm_eps", 1e-6), "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
    }


def hf_dense_fields(cfg) -> Dict[str, Any]:
    """The config.json fields every family shares, from a moe_sys Config."""
    m = cfg.model
    return {
        "vocab_size": m.vocab_size, "hidden_size": m.d_model, "num_hidden_layers": m.n_layers,
        "num_attention_heads": m.n_heads, "num_key_value_heads": m.n_kv_heads or m.n_heads,
        "head_dim": m.head_dim or m.d_model // m.n_heads, "intermediate_size": m.d_ff,
        "max_position_embeddings": m.max_seq_len, "rms_norm_eps": m.norm_eps, "hidden_act": "silu",
        "tie_word_embeddings": m.tie_embeddings, "rope_theta": m.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_theta}, "attention_bias": False,
    }


def routed(hf: Dict[str, Any], num_experts_key: str, normalize: Optional[bool], **moe: Any) -> Dict[str, Any]:
    """The moe section of a top-k softmax family (normalize None: the config's norm_topk_prob)."""
    norm = bool(hf.get("norm_topk_prob", False)) if normalize is None else normalize
    coef = float(hf.get("router_aux_loss_coef", 0.001))
    names = [k for k in (num_experts_key, "num_local_experts", "num_experts") if k in hf]  # transformers aliases them
    if not names:
        raise KeyError(num_experts_key)
    router = {"type": "topk", "score": "softmax", "pre_softmax": True, "normalize": norm,
              "jitter_eps": float(hf.get("router_jitter_noise", 0.0))}
    return {"enabled": True, "num_experts": hf[names[0]], "top_k": hf["num_experts_per_tok"],
            "capacity_factor": None, "router": router,
            "balance": {"losses": [{"type": "switch", "coef": coef}]}, **moe}


def sparse_placement(hf: Dict[str, Any]) -> Dict[str, Any]:
    """Qwen-MoE's layer placement: layer i is MoE when (i+1) % decoder_sparse_step == 0 and i is not in
    mlp_only_layers."""
    step = hf.get("decoder_sparse_step", 1)
    return {"first_moe_layer": step - 1, "every": step, "dense_layers": list(hf.get("mlp_only_layers") or [])}


def hf_routed_fields(cfg) -> Dict[str, Any]:
    moe = cfg.moe
    return {"num_experts_per_tok": moe.top_k, "norm_topk_prob": bool(moe.router.normalize),
            "router_aux_loss_coef": next((t.coef for t in moe.balance.losses if t.type == "switch"), 0.0),
            "output_router_logits": False}


def hf_sparse_placement(cfg) -> Dict[str, Any]:
    """Every dense layer listed explicitly: any first_moe_layer/every/dense_layers placement fits."""
    dense = [i for i in range(cfg.model.n_layers) if not cfg.moe.is_moe_layer(i)]
    return {"decoder_sparse_step": 1, "mlp_only_layers": dense}
