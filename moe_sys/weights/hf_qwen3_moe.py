"""Qwen3-MoE: per-head QK-norm, no shared expert, optional dense layers, norm_topk_prob."""
from moe_sys.weights.hf_family import (Family, dense_model, hf_dense_fields, hf_routed_fields, hf_sparse_placement,
                                       refuse_if, register, routed, sparse_placement)


def to_moe_sys(hf, path):
    refuse_if(hf, path, "attention_bias", bool, "attention biases (q/k/v and o) are not implemented")
    moe = routed(hf, "num_experts", None, d_expert=hf["moe_intermediate_size"], **sparse_placement(hf))
    return {"model": {**dense_model(hf, path), "qk_norm": "head"}, "moe": moe}


def to_hf(cfg):
    return {**hf_dense_fields(cfg), **hf_routed_fields(cfg), **hf_sparse_placement(cfg),
            "num_experts": cfg.moe.num_experts, "moe_intermediate_size": cfg.moe.d_expert or cfg.model.d_ff,
            "use_sliding_window": False}


QWEN3_MOE = register(Family("qwen3_moe", "Qwen3MoeForCausalLM", to_moe_sys, to_hf))
