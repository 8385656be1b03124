"""Qwen3 (dense): GQA, RMSNorm on each query and key head, head_dim independent of hidden_size."""
from moe_sys.weights.hf_family import Family, dense_model, hf_dense_fields, refuse_if, register


def to_moe_sys(hf, path):
    refuse_if(hf, path, "attention_bias", bool, "attention biases (q/k/v and o) are not implemented")
    return {"model": {**dense_model(hf, path), "qk_norm": "head"}, "moe": {"enabled": False}}


def to_hf(cfg):
    return {**hf_dense_fields(cfg), "use_sliding_window": False}


QWEN3 = register(Family("qwen3", "Qwen3ForCausalLM", to_moe_sys, to_hf))
