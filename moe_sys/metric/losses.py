"""Pair-based metric-learning losses as pure functions of (embeddings, labels).

Shape legend: B embeddings in the (global) batch, D embedding width, T mined triplets.
Notation: x_i = a_i / |a_i| (every loss L2-normalises its input first), d_ij = |x_i - x_j|_2,
s_ij = <x_i, x_j>, P(i) = {j != i: y_j = y_i}, N(i) = {j: y_j != y_i}.
Definitions and default hyper-parameters are pytorch-metric-learning 2.9's (the library users
compare with); ``docs/metric.md`` lists where and why ours differ. A batch with nothing to compare
(no positive pair, no negative) gives a zero loss that still carries a gradient path.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from moe_sys.metric.miners import MINERS
from moe_sys.metric.pairs import cosine_BB, euclidean_BB, label_masks, masked_logsumexp


def _mean_nonzero(loss_X: torch.Tensor) -> torch.Tensor:
    """pml's AvgNonZeroReducer: the mean over entries > 0 (0 when there are none)."""
    nonzero = loss_X > 0
    return (loss_X * nonzero).sum() / nonzero.sum().clamp_min(1)


def _zero(emb_BD: torch.Tensor) -> torch.Tensor:
    return emb_BD.sum() * 0.0


def contrastive_loss(emb_BD: torch.Tensor, labels_B: torch.Tensor, pos_margin: float = 0.0,
                     neg_margin: float = 1.0) -> torch.Tensor:
    """Contrastive (Hadsell et al. 2006):

    L = mean_{nonzero} [d_ij - m_pos]_+ over positive pairs + mean_{nonzero} [m_neg - d_ij]_+ over
    negative pairs (ordered pairs i != j; each mean taken over its non-zero terms only).
    """
    d_BB = euclidean_BB(emb_BD)
    pos_BB, neg_BB = label_masks(labels_B)
    pos = _mean_nonzero(F.relu(d_BB[pos_BB] - pos_margin))
    neg = _mean_nonzero(F.relu(neg_margin - d_BB[neg_BB]))
    return pos + neg + _zero(emb_BD)


def triplet_loss(emb_BD: torch.Tensor, labels_B: torch.Tensor, margin: float = 0.05, mining: str = "all",
                 miner_margin: float = 0.2) -> torch.Tensor:
    """Triplet margin (Weinberger & Saul 2009; Schroff et al. 2015):

    L = mean_{nonzero} [d_ap - d_an + margin]_+ over the triplets the miner picks: ``all`` valid
    triplets, ``batch_hard`` (farthest positive, nearest negative per anchor) or ``semi_hard``
    (d_ap < d_an <= d_ap + miner_margin); see ``moe_sys.metric.miners``.
    """
    d_BB = euclidean_BB(emb_BD)
    a, p, n = MINERS[mining](d_BB, labels_B, miner_margin)
    if len(a) == 0:
        return _zero(emb_BD)
    return _mean_nonzero(F.relu(d_BB[a, p] - d_BB[a, n] + margin))


def npair_loss(emb_BD: torch.Tensor, labels_B: torch.Tensor) -> torch.Tensor:
    """N-pair-mc (Sohn 2016), as pml: one (anchor, positive) pair per label present at least twice,
    the anchor its first occurrence and the positive its second; with cosines (pml's
    DotProductSimilarity normalises first) and no temperature,

    L = mean_k CE(softmax_j s(a_k, p_j), target k): the other labels' positives are the negatives.
    """
    order_B = torch.argsort(labels_B, stable=True)  # same labels together, in index order
    sorted_B = labels_B[order_B]
    first_B = torch.ones_like(sorted_B, dtype=torch.bool)
    first_B[1:] = sorted_B[1:] != sorted_B[:-1]
    second_B = torch.zeros_like(first_B)
    second_B[1:] = first_B[:-1] & ~first_B[1:]
    at = torch.nonzero(second_B, as_tuple=True)[0]
    if len(at) == 0:
        return _zero(emb_BD)
    anchors, positives = order_B[at - 1], order_B[at]
    x_BD = F.normalize(emb_BD, dim=1)
    logits_KK = x_BD[anchors] @ x_BD[positives].T
    return F.cross_entropy(logits_KK, torch.arange(len(at), device=emb_BD.device))


def ntxent_loss(emb_BD: torch.Tensor, labels_B: torch.Tensor, temperature: float = 0.07) -> torch.Tensor:
    """NT-Xent / InfoNCE (Oord et al. 2018; Chen et al. 2020) with labels, per positive pair (i, p):

    L = mean_{(i,p)} -log( e^{s_ip/t} / (e^{s_ip/t} + sum_{n in N(i)} e^{s_in/t}) ).
    For SimCLR give the two views of an image the same label.
    """
    s_BB = cosine_BB(emb_BD) / temperature
    pos_BB, neg_BB = label_masks(labels_B)
    i, p = torch.nonzero(pos_BB, as_tuple=True)
    if len(i) == 0 or not neg_BB.any():
        return _zero(emb_BD)
    neg_lse_B = masked_logsumexp(s_BB, neg_BB, dim=1, add_one=False)
    s_P = s_BB[i, p]
    return (torch.logaddexp(s_P, neg_lse_B[i]) - s_P).mean()


def supcon_loss(emb_BD: torch.Tensor, labels_B: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Supervised contrastive (Khosla et al. 2020, L_out), per anchor i with positives:

    L_i = -1/|P(i)| sum_{p in P(i)} log( e^{s_ip/t} / sum_{a != i} e^{s_ia/t} ),
    L = mean of the non-zero L_i (pml's reducer).
    """
    s_BB = cosine_BB(emb_BD) / temperature
    pos_BB, neg_BB = label_masks(labels_B)
    if not pos_BB.any() or not neg_BB.any():
        return _zero(emb_BD)
    log_prob_BB = s_BB - masked_logsumexp(s_BB, pos_BB | neg_BB, dim=1, add_one=False)[:, None]
    loss_B = -(log_prob_BB * pos_BB).sum(1) / pos_BB.sum(1).clamp_min(1)
    return _mean_nonzero(loss_B)


def multi_similarity_loss(emb_BD: torch.Tensor, labels_B: torch.Tensor, alpha: float = 2.0, beta: float = 50.0,
                          base: float = 0.5) -> torch.Tensor:
    """Multi-similarity (Wang et al. 2019), without its mining step (pml's default):

    L = mean_i [ 1/alpha log(1 + sum_{p in P(i)} e^{-alpha (s_ip - base)})
               + 1/beta  log(1 + sum_{n in N(i)} e^{ beta (s_in - base)}) ].
    """
    s_BB = cosine_BB(emb_BD)
    pos_BB, neg_BB = label_masks(labels_B)
    pos_B = masked_logsumexp(-alpha * (s_BB - base), pos_BB, dim=1, add_one=True) / alpha
    neg_B = masked_logsumexp(beta * (s_BB - base), neg_BB, dim=1, add_one=True) / beta
    return (pos_B + neg_B).mean()
