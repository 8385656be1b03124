"""Mixtral: every FFN an MoE block of top-k softmax experts, always renormalised; on disk the block is
``block_sparse_moe`` with experts w1 (gate), w3 (up), w2 (down)."""
from moe_sys.weights.hf_family import (Family, dense_model, hf_dense_fields, hf_routed_fields, refuse_if, register,
                                       routed)


def to_moe_sys(hf, path):
    refuse_if(hf, path, "sliding_window", lambda v: v is not None, "sliding-window attention is not implemented")
    moe = routed(hf, "num_local_experts", normalize=True, first_moe_layer=0, every=1)
    return {"model": dense_model(hf, path), "moe": moe}


def to_hf(cfg):
    return {**hf_dense_fields(cfg), **hf_routed_fields(cfg), "num_local_experts": cfg.moe.num_experts,
            "intermediate_size": cfg.moe.d_expert or cfg.model.d_ff, "sliding_window": None,
            "router_jitter_noise": cfg.moe.router.jitter_eps}


MIXTRAL = register(Family("mixtral", "MixtralForCausalLM", to_moe_sys, to_hf, moe_prefix="block_sparse_moe",
                          expert_names=("w1", "w3", "w2")))
