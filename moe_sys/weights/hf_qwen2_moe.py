"""Qwen2-MoE: q/k/v biases, a shared expert scaled by sigmoid(shared_expert_gate(x)), optional dense
layers (mlp_only_layers, decoder_sparse_step), renormalisation by norm_topk_prob."""
from moe_sys.weights.hf_family import (Family, dense_model, hf_dense_fields, hf_routed_fields, hf_sparse_placement,
                                       register, routed, sparse_placement)


def to_moe_sys(hf, path):
    shared = {"shared_experts": 1, "d_shared": hf["shared_expert_intermediate_size"], "shared_gate": True}
    moe = routed(hf, "num_experts", None, d_expert=hf["moe_intermediate_size"], **shared, **sparse_placement(hf))
    return {"model": {**dense_model(hf, path), "qkv_bias": bool(hf.get("qkv_bias", True))}, "moe": moe}


def to_hf(cfg):
    moe = cfg.moe
    fields = hf_dense_fields(cfg)
    del fields["attention_bias"]
    return {**fields, **hf_routed_fields(cfg), **hf_sparse_placement(cfg), "num_experts": moe.num_experts,
            "moe_intermediate_size": moe.d_expert or cfg.model.d_ff, "use_sliding_window": False,
            "qkv_bias": cfg.model.qkv_bias,
            "shared_expert_intermediate_size": moe.d_shared or moe.shared_experts * (moe.d_expert or cfg.model.d_ff)}


QWEN2_MOE = register(Family("qwen2_moe", "Qwen2MoeForCausalLM", to_moe_sys, to_hf))
