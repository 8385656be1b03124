"""OLMoE: QK-norm over the full q and k widths, every FFN MoE with experts of intermediate_size."""
from moe_sys.weights.hf_family import (Family, dense_model, hf_dense_fields, hf_routed_fields, refuse_if, register,
                                       routed)


def to_moe_sys(hf, path):
    refuse_if(hf, path, "attention_bias", bool, "attention biases (q/k/v and o) are not implemented")
    refuse_if(hf, path, "clip_qkv", lambda v: v is not None, "clipping q/k/v is not implemented")
    moe = routed(hf, "num_experts", None, first_moe_layer=0, every=1)
    return {"model": {**dense_model(hf, path), "qk_norm": "full"}, "moe": moe}


def to_hf(cfg):
    return {**hf_dense_fields(cfg), **hf_routed_fields(cfg), "num_experts": cfg.moe.num_experts,
            "intermediate_size": cfg.moe.d_expert or cfg.model.d_ff, "clip_qkv": None}


OLMOE = register(Family("olmoe", "OlmoeForCausalLM", to_moe_sys, to_hf))
