"""Per-rank memory of a training step: model states by ZeRO stage and expert parallelism, activations
with and without activation checkpointing.

Model states follow DeepSpeed's ``estimate_zero2_model_states_mem_needs`` (w = bytes of the model
dtype): weights w*P on every rank, gradients w*P (partitioned at ZeRO-2), and 16 bytes per parameter of
fp32 state (master copy, Adam m and v, fp32 gradients) divided over the ranks that share it at ZeRO 1/2. Expert parameters
are P_expert / ep_size per rank and their fp32 state is divided over the expert-data-parallel group
only (world / ep_size ranks), which is why ZeRO saves less for experts (DeepSpeed #7156).

Activations: floats kept per token per layer, counted from what autograd saves in moe_sys's blocks
(attention + norms ~13D; a routed slot 4F + 2D, the experts' rows; router E; a dense SwiGLU 4F) and the
head (V logits + 3D), plus the fp32 logits gradient alive at the start of backward.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from moe_sys.models.transformer import TransformerLM

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
FP32_STATE_BYTES = 16  # master weights, Adam m and v, fp32 gradient partition (DeepSpeed's estimate)


@dataclass(frozen=True)
class ParamCounts:
    dense: int  # replicated on every rank: embeddings, attention, norms, dense FFNs, routers, shared experts
    expert: int  # routed experts of all layers, all E (a rank holds expert / ep_size)


def count_params(cfg) -> ParamCounts:
    """Exact counts from the model built on the meta device (no memory)."""
    with torch.device("meta"):
        model = TransformerLM(cfg.model, cfg.moe, num_domains=len(cfg.data.domains))
    total = sum(p.numel() for p in model.parameters())
    expert = sum(p.numel() for layer in model.moe_layers() for p in layer.experts.parameters())
    return ParamCounts(total - expert, expert)


def model_state_bytes(counts: ParamCounts, cfg, world: int) -> dict:
    """weights, gradients and optimizer state bytes on one rank."""
    w, ep, stage = DTYPE_BYTES[cfg.train.dtype], cfg.parallel.ep_size, cfg.parallel.zero_stage
    dense, expert = counts.dense, counts.expert / ep
    shards = (world, world // ep) if stage >= 1 else (1, 1)
    optimizer = FP32_STATE_BYTES * (dense / shards[0] + expert / shards[1])
    if stage == 0 and w == 4:
        optimizer -= 8 * (dense + expert)  # fp32 without ZeRO: torch Adam's m and v only, no master copy
    grad_shards = shards if stage == 2 else (1, 1)
    gradients = w * (dense / grad_shards[0] + expert / grad_shards[1])
    return {"weights": w * (dense + expert), "gradients": gradients, "optimizer": optimizer}


def _layer_floats(cfg, is_moe: bool) -> float:
    m, moe = cfg.model, cfg.moe
    attention = 13 * m.d_model
    if not is_moe:
        return attention + 4 * m.d_ff
    f = moe.d_expert or m.d_ff
    return attention + moe.top_k * (4 * f + 2 * m.d_model) + moe.num_experts + 4 * moe.shared_experts * f


def activation_bytes(cfg, checkpointing: str) -> float:
    """Bytes kept for backward by one micro-batch (and the logits gradient), for one rank."""
    m, moe, w = cfg.model, cfg.moe, DTYPE_BYTES[cfg.train.dtype]
    tokens = cfg.train.micro_batch_size * cfg.data.seq_len
    layers = [_layer_floats(cfg, moe.is_moe_layer(i)) for i in range(m.n_layers)]
    if checkpointing == "full":  # each block's input, plus one block recomputed at a time
        kept = m.n_layers * m.d_model + max(layers)
    elif checkpointing == "moe":
        kept = sum(layers) - sum(moe.top_k * 4 * (moe.d_expert or m.d_ff)
                                 for i in range(m.n_layers) if moe.is_moe_layer(i))
    else:
        kept = sum(layers)
    head = m.vocab_size + 3 * m.d_model
    return tokens * (w * (kept + head) + 4 * m.vocab_size * (2 if w < 4 else 1))
