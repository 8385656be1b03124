"""Llama (dense): GQA, no biases, untied or tied embeddings."""
from moe_sys.weights.hf_family import Family, dense_model, hf_dense_fields, refuse_if, register


def to_moe_sys(hf, path):
    refuse_if(hf, path, "attention_bias", bool, "attention biases (q/k/v and o) are not implemented")
    refuse_if(hf, path, "pretraining_tp", lambda v: v != 1, "tensor-parallel slicing is not supported")
    return {"model": dense_model(hf, path), "moe": {"enabled": False}}


def to_hf(cfg):
    return {**hf_dense_fields(cfg), "mlp_bias": False}


LLAMA = register(Family("llama", "LlamaForCausalLM", to_moe_sys, to_hf))
