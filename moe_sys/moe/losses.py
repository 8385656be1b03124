"""Load-balancing and stability losses as pure functions (T tokens, K slots, E experts)."""
from __future__ import annotations

import torch


def switch_aux_loss(probs_TE: torch.Tensor, expert_ids_TK: torch.Tensor) -> torch.Tensor:
    """Switch/GShard balance: E * sum_i f_i * P_i.

    f_i = fraction of the T*K routed slots that chose expert i (before capacity drops; no gradient),
    P_i = mean router probability of expert i. Equals 1 at perfectly uniform routing.
    """
    T, E = probs_TE.shape
    if T == 0:
        return probs_TE.sum()
    counts_E = torch.bincount(expert_ids_TK.reshape(-1), minlength=E).to(probs_TE.dtype)
    f_E = counts_E / expert_ids_TK.numel()
    return E * torch.sum(f_E * probs_TE.mean(0))


def z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss: mean_t (logsumexp_j logits_tj)^2; keeps logits small for fp stability."""
    if logits_TE.shape[0] == 0:
        return logits_TE.sum()
    return torch.logsumexp(logits_TE, dim=-1).pow(2).mean()
