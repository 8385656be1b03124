"""Qwen2 (dense): GQA with a bias on q, k and v (none on o)."""
from moe_sys.weights.hf_family import Family, dense_model, hf_dense_fields, register


def to_moe_sys(hf, path):
    return {"model": {**dense_model(hf, path), "qkv_bias": True}, "moe": {"enabled": False}}


def to_hf(cfg):
    fields = hf_dense_fields(cfg)
    del fields["attention_bias"]  # Qwen2 always has q/k/v biases
    return {**fields, "use_sliding_window": False}


QWEN2 = register(Family("qwen2", "Qwen2ForCausalLM", to_moe_sys, to_hf))
