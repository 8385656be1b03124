"""Load-balancing, stability and specialisation losses as pure functions.

Legend: N rows (tokens, or examples for example-level routers), K slots, E experts, S sequences,
A tasks/domains. ``valid_N`` is 1 for real rows and 0 for padding (None: all real); padding
never counts. Coefficients are applied by the caller (moe_sys.moe.balance).
"""
from __future__ import annotations

from typing import Optional

import torch


def _valid(rows_like: torch.Tensor, valid_N: Optional[torch.Tensor]) -> torch.Tensor:
    n = rows_like.shape[0]
    return torch.ones(n, device=rows_like.device) if valid_N is None else valid_N.float()


def expert_counts(expert_ids_NK: torch.Tensor, num_experts: int, valid_N: Optional[torch.Tensor] = None) -> torch.Tensor:
    """c_i = number of (valid row, slot) pairs that chose expert i (slots marked -1 ignored). fp32 [E]."""
    w_NK = _valid(expert_ids_NK, valid_N)[:, None].expand_as(expert_ids_NK) * (expert_ids_NK >= 0)
    return torch.zeros(num_experts, device=expert_ids_NK.device).index_add_(
        0, expert_ids_NK.clamp(min=0).reshape(-1), w_NK.reshape(-1).float())


def switch_aux_loss(probs_NE: torch.Tensor, counts_E: torch.Tensor, valid_N: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Switch/GShard balance: L = E * sum_i f_i * P_i.

    f_i = c_i / sum_j c_j, the fraction of routed slots that chose expert i (no gradient: counts),
    P_i = mean over valid rows of p_ni. Equals 1 at perfectly uniform routing. With counts from the
    micro-batch this is the Switch loss; with counts summed over the data-parallel group (and the
    micro-batches of the step) it is the global-batch loss (arXiv 2501.11873).
    """
    E = probs_NE.shape[1]
    v_N = _valid(probs_NE, valid_N)
    P_E = (probs_NE * v_N[:, None]).sum(0) / v_N.sum().clamp_min(1.0)
    f_E = counts_E / counts_E.sum().clamp_min(1.0)
    return E * torch.sum(f_E.detach() * P_E)


def seq_aux_loss(probs_NE: torch.Tensor, expert_ids_NK: torch.Tensor, seq_N: torch.Tensor, num_seqs: int,
                 valid_N: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Sequence-level balance: L = mean_s E * sum_i f_si * P_si, the Switch loss inside each sequence.

    f_si = fraction of sequence s's routed slots on expert i, P_si = mean of p_ni over the valid
    rows of s (DeepSeek-V3's sequence-wise loss; Megatron's seq_aux_loss). Sequences without a
    valid row are left out of the mean.
    """
    N, E = probs_NE.shape
    v_N = _valid(probs_NE, valid_N)
    rows_S = torch.zeros(num_seqs, device=probs_NE.device).index_add_(0, seq_N, v_N)
    P_SE = torch.zeros(num_seqs, E, device=probs_NE.device).index_add_(0, seq_N, probs_NE * v_N[:, None])
    P_SE = P_SE / rows_S.clamp_min(1.0)[:, None]
    K = expert_ids_NK.shape[1]
    w_NK = v_N[:, None] * (expert_ids_NK >= 0)
    flat = seq_N[:, None].expand(N, K) * E + expert_ids_NK.clamp(min=0)
    c_SE = torch.zeros(num_seqs * E, device=probs_NE.device).index_add_(0, flat.reshape(-1), w_NK.reshape(-1))
    c_SE = c_SE.view(num_seqs, E)
    f_SE = c_SE / c_SE.sum(1, keepdim=True).clamp_min(1.0)
    present_S = rows_S > 0
    per_seq_S = E * (f_SE * P_SE).sum(1)
    return (per_seq_S * present_S).sum() / present_S.sum().clamp_min(1)


def z_loss(logits_NE: torch.Tensor, valid_N: Optional[torch.Tensor] = None) -> torch.Tensor:
    """ST-MoE router z-loss: L = mean over valid rows of (log sum_j exp(logit_nj))^2.

    Keeps logits small so the fp32 softmax stays well-conditioned and near-ties stay stable.
    """
    v_N = _valid(logits_NE, valid_N)
    return (torch.logsumexp(logits_NE.float(), dim=-1).pow(2) * v_N).sum() / v_N.sum().clamp_min(1.0)


def mi_loss(probs_NE: torch.Tensor, task_N: torch.Tensor, num_tasks: int,
            valid_N: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mutual information between task and expert, negated: L = -(H(e) - H(e | a)).

    p(e | a) = mean of p_ne over the rows of task a, p(a) = share of rows from task a,
    p(e) = sum_a p(a) p(e | a). Minimising L spreads the experts over the batch (high H(e): balance)
    while making each task's choice sharp (low H(e | a): specialisation). Ranges over
    [-log min(E, A), 0]. (Mod-Squad, Chen et al. 2023; Modular Deep Learning survey, sec. 4.)
    """
    E = probs_NE.shape[1]
    v_N = _valid(probs_NE, valid_N)
    rows_A = torch.zeros(num_tasks, device=probs_NE.device).index_add_(0, task_N, v_N)
    mass_AE = torch.zeros(num_tasks, E, device=probs_NE.device).index_add_(0, task_N, probs_NE * v_N[:, None])
    p_a = rows_A / rows_A.sum().clamp_min(1.0)
    p_e_given_a = mass_AE / rows_A.clamp_min(1.0)[:, None]
    p_e = (p_a[:, None] * p_e_given_a).sum(0)
    return -(_entropy(p_e) - (p_a * _entropy(p_e_given_a)).sum())


def _entropy(p: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) over the last dim; 0 log 0 = 0."""
    return -(p * torch.log(p.clamp_min(1e-30))).sum(-1)


def row_entropy(probs_NE: torch.Tensor, valid_N: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean router entropy per row, in nats (log E = undecided, 0 = one expert)."""
    v_N = _valid(probs_NE, valid_N)
    return (_entropy(probs_NE) * v_N).sum() / v_N.sum().clamp_min(1.0)

