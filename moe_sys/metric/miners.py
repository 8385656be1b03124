"""Triplet miners: which (anchor, positive, negative) triplets of a batch a loss should use.

Shape legend: B embeddings in the batch; a miner returns three index tensors of equal length T.
Definitions as pytorch-metric-learning 2.9 (``BatchHardMiner``, ``TripletMarginMiner``) on a
distance matrix d_BB (Euclidean on L2-normalised embeddings by default).
"""
from __future__ import annotations

from typing import Callable, Dict, Tuple

import torch

from moe_sys.metric.pairs import all_triplets, label_masks

Triplets = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def batch_hard(dist_BB: torch.Tensor, labels_B: torch.Tensor, margin: float = 0.0) -> Triplets:
    """One triplet per anchor: its farthest positive and its nearest negative (Hermans et al. 2017).

    p(a) = argmax_{p: y_p = y_a, p != a} d_ap,   n(a) = argmin_{n: y_n != y_a} d_an.
    Anchors without a positive or without a negative are left out. Ties go to the lower index.
    ``margin`` is unused (one signature for every miner).
    """
    pos_BB, neg_BB = label_masks(labels_B)
    d_BB = dist_BB.detach()
    hardest_pos_B = d_BB.masked_fill(~pos_BB, float("-inf")).argmax(1)
    hardest_neg_B = d_BB.masked_fill(~neg_BB, float("inf")).argmin(1)
    keep_B = pos_BB.any(1) & neg_BB.any(1)
    anchors = torch.nonzero(keep_B, as_tuple=True)[0]
    return anchors, hardest_pos_B[anchors], hardest_neg_B[anchors]


def semi_hard(dist_BB: torch.Tensor, labels_B: torch.Tensor, margin: float = 0.2) -> Triplets:
    """Every triplet whose negative lies beyond the positive but inside the margin (Schroff et al. 2015):

    d_ap < d_an <= d_ap + margin   (pml ``TripletMarginMiner(margin, "semihard")``).
    """
    a, p, n = all_triplets(labels_B)
    d_BB = dist_BB.detach()
    gap_T = d_BB[a, n] - d_BB[a, p]
    keep_T = (gap_T > 0) & (gap_T <= margin)
    return a[keep_T], p[keep_T], n[keep_T]


def all_mined(dist_BB: torch.Tensor, labels_B: torch.Tensor, margin: float = 0.0) -> Triplets:
    """No mining: every valid triplet of the batch."""
    return all_triplets(labels_B)


MINERS: Dict[str, Callable[..., Triplets]] = {"all": all_mined, "batch_hard": batch_hard, "semi_hard": semi_hard}
