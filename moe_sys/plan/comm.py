"""All-to-all volume of a step, and what a measured expert load costs at a larger EP size.

Per MoE layer and micro-batch each rank sends its T*K routed rows of D values out (dispatch) and gets
them back (combine), and the backward pass repeats both with gradients; a share (P-1)/P of the rows
leaves the rank when loads are even. With uneven loads the busiest rank receives the most rows, and the
step waits for it: ``imbalance`` = its rows / the mean rows (1 = balanced) multiplies both its
all-to-all volume and its expert compute.
"""
from __future__ import annotations

import json
import os
from typing import Dict, List

import torch

from moe_sys.plan.memory import DTYPE_BYTES


def a2a_bytes_per_step(cfg, ep_size: int, imbalance: float = 1.0) -> float:
    """Bytes one rank (the busiest, when imbalance > 1) sends + receives in all-to-alls per optimizer step."""
    m, moe = cfg.model, cfg.moe
    if ep_size == 1:
        return 0.0
    moe_layers = sum(moe.is_moe_layer(i) for i in range(m.n_layers))
    rows = cfg.train.micro_batch_size * cfg.data.seq_len * moe.top_k
    per_exchange = rows * m.d_model * DTYPE_BYTES[cfg.train.dtype] * (ep_size - 1) / ep_size
    # dispatch: sends its own rows (x1), receives imbalance x; combine the reverse; forward and backward
    return 4 * moe_layers * cfg.train.grad_accum_steps * per_exchange * (1 + imbalance)


def measured_load(run_dir: str, last: int = 20) -> torch.Tensor:
    """Mean expert_load [L, E] over the last ``last`` records of RUN_DIR/metrics.jsonl."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no metrics.jsonl (is {run_dir!r} a run directory?)")
    with open(path) as f:
        loads = [json.loads(line)["expert_load"] for line in f if '"expert_load"' in line]
    if not loads:
        raise ValueError(f"{path}: no record has expert_load")
    return torch.tensor(loads[-last:], dtype=torch.float64).mean(0)


def imbalance_at(load_LE: torch.Tensor, ep_size: int) -> List[float]:
    """Per layer: busiest rank's share of the rows times ep_size, experts placed contiguously
    (rank r holds experts [r*E/P, (r+1)*E/P), as moe_sys shards them)."""
    L, E = load_LE.shape
    per_rank_LP = load_LE.view(L, ep_size, E // ep_size).sum(-1)
    return (per_rank_LP.max(-1).values / per_rank_LP.sum(-1) * ep_size).tolist()


def simulate(cfg, load_LE: torch.Tensor, ep_sizes: List[int], link_gbps: float) -> List[Dict]:
    """For each EP size: the worst layer's imbalance, the busiest rank's all-to-all bytes and time per step."""
    E = load_LE.shape[1]
    rows = []
    for ep in ep_sizes:
        if E % ep:
            rows.append({"ep_size": ep, "problem": f"{E} experts do not split over {ep} ranks"})
            continue
        layers = imbalance_at(load_LE, ep)
        mean_imb = sum(layers) / len(layers)
        volume = a2a_bytes_per_step(cfg, ep, mean_imb)
        rows.append({"ep_size": ep, "imbalance_max": max(layers), "imbalance_mean": mean_imb,
                     "a2a_bytes": volume, "a2a_s": volume / (link_gbps * 1e9),
                     "balanced_a2a_s": a2a_bytes_per_step(cfg, ep) / (link_gbps * 1e9)})
    return rows
