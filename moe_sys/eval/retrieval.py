"""Retrieval metrics with exact k-nearest neighbours in torch: Recall@K, R-precision, MAP@R.

Shape legend: N embeddings (every rank's, gathered), D width, Q queries of a chunk, K neighbours.

Protocol (PUMA's, and pytorch-metric-learning's ``AccuracyCalculator`` with the query set as its
own gallery): every embedding is a query against all the others, ranked by cosine similarity; the
query itself is never a neighbour. Two images match when they have the same label *and* domain
(label ids may repeat across domains). R = number of other images that match the query; queries
with R = 0 ("lone") are left out of every mean, as pml does.
  Recall@k  = 1 if any of the k nearest matches (DML's R@k; R@1 = pml's precision_at_1),
  R-prec    = (#matches among the R nearest) / R,
  MAP@R     = (1/R) sum_{i<=R} P@i [neighbour i matches], P@i = (#matches among the i nearest) / i.
Ties: neighbours with equal similarity are ranked by gallery index, lower first, also at the k-th
place (pml leaves the order to faiss/topk, so ties may rank differently there).
Scopes: ``unified`` (all domains pooled: a query may retrieve another domain's image), each domain
alone (queries and gallery of that domain), and ``hmean``, the harmonic mean over domains.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

from moe_sys.metric.distributed import all_gather_rows

KS = (1, 2, 4, 8)


def _neighbour_chunks(emb_ND: torch.Tensor, k: int, chunk: int):
    """(start, idx_QK) per chunk of queries: each row's k most similar other rows (cosine)."""
    x_ND = F.normalize(emb_ND.float(), dim=1)
    for start in range(0, len(x_ND), chunk):
        sims_QN = x_ND[start:start + chunk] @ x_ND.T
        rows = torch.arange(len(sims_QN), device=x_ND.device)
        sims_QN[rows, rows + start] = float("-inf")  # never retrieve yourself
        yield start, _topk_lowest_index(sims_QN, k)


def nearest(emb_ND: torch.Tensor, k: int, chunk: int = 512) -> torch.Tensor:
    """[N, k] indices of each row's k most similar other rows (cosine), ties to the lower index."""
    return torch.cat([idx_QK for _, idx_QK in _neighbour_chunks(emb_ND, k, chunk)])


def _topk_lowest_index(sims_QN: torch.Tensor, k: int) -> torch.Tensor:
    """topk whose ties (including those straddling the k-th place) go to the lower column."""
    vals_QK, idx_QK = sims_QN.topk(k, dim=1)
    kth_Q1 = vals_QK[:, -1:]
    straddle_Q = torch.count_nonzero(sims_QN >= kth_Q1, dim=1) > k  # more candidates at the k-th value than places left
    if straddle_Q.any():
        rows = torch.nonzero(straddle_Q, as_tuple=True)[0]
        idx_QK[rows] = _lowest_columns_at_kth(sims_QN[rows], kth_Q1[rows], k)
    idx_QK = idx_QK.sort(dim=1).values  # ascending columns, then a stable sort by similarity
    order_QK = sims_QN.gather(1, idx_QK).sort(dim=1, descending=True, stable=True).indices
    return idx_QK.gather(1, order_QK)


def _lowest_columns_at_kth(sims_QN: torch.Tensor, kth_Q1: torch.Tensor, k: int) -> torch.Tensor:
    """Everything above the k-th value plus the lowest columns equal to it, k per row."""
    above_QN = sims_QN > kth_Q1
    at_QN = sims_QN == kth_Q1
    room_Q1 = k - above_QN.sum(1, keepdim=True)
    take_QN = above_QN | (at_QN & (at_QN.cumsum(1) <= room_Q1))
    return take_QN.nonzero()[:, 1].view(len(sims_QN), k)


def _class_ids(labels_N: torch.Tensor, domains_N: Optional[torch.Tensor]) -> torch.Tensor:
    if domains_N is None:
        return labels_N
    return torch.unique(torch.stack([domains_N, labels_N], 1), dim=0, return_inverse=True)[1]


def scope_metrics(emb_ND: torch.Tensor, cls_N: torch.Tensor, ks: Sequence[int] = KS,
                  chunk: int = 512) -> Dict[str, float]:
    """{R@k..., RP, MAP@R} of one scope (see the module docstring); zeros when no query has a match.

    Memory stays at a [chunk, N] block: per-query scores are summed chunk by chunk.
    """
    _, inverse_N, counts = torch.unique(cls_N, return_inverse=True, return_counts=True)
    R_N = counts[inverse_N] - 1
    valid = int((R_N > 0).sum())
    names = [f"R@{k}" for k in ks] + ["RP", "MAP@R"]
    if len(cls_N) < 2 or valid == 0:
        return dict.fromkeys(names, 0.0)
    K = min(len(cls_N) - 1, max(max(ks), int(R_N.max())))
    totals = torch.zeros(len(names), dtype=torch.float64)
    for start, idx_QK in _neighbour_chunks(emb_ND, K, chunk):
        totals += _query_scores(cls_N[idx_QK] == cls_N[start:start + len(idx_QK), None],
                                R_N[start:start + len(idx_QK)], ks).sum(0).cpu()
    return {name: float(total / valid) for name, total in zip(names, totals)}


def _query_scores(match_QK: torch.Tensor, R_Q: torch.Tensor, ks: Sequence[int]) -> torch.Tensor:
    """[Q, len(ks) + 2] float64: R@k for each k, R-precision, MAP@R per query; lone queries give 0."""
    match_QK = match_QK.double() * (R_Q > 0)[:, None]
    K = match_QK.shape[1]
    ranks_K = torch.arange(1, K + 1, device=match_QK.device)
    in_R_QK = ranks_K[None, :] <= R_Q[:, None]
    R_Q = R_Q.clamp_min(1)
    recall = [match_QK[:, :min(k, K)].amax(1) for k in ks]
    rp_Q = (match_QK * in_R_QK).sum(1) / R_Q
    map_Q = (match_QK.cumsum(1) / ranks_K * match_QK * in_R_QK).sum(1) / R_Q
    return torch.stack([*recall, rp_Q, map_Q], 1)


def retrieval_metrics(emb_ND: torch.Tensor, labels_N: torch.Tensor, domains_N: Optional[torch.Tensor] = None,
                      domain_names: Sequence[str] = (), ks: Sequence[int] = KS, chunk: int = 512,
                      group: Optional[dist.ProcessGroup] = None) -> Dict[str, float]:
    """Flat {"unified/R@1": ..., "domain/<name>/MAP@R": ..., "hmean/R@1": ...} over every rank's rows.

    Args:
        emb_ND, labels_N, domains_N: this rank's evaluation embeddings, class and domain ids (rows
            of all ranks are gathered first, over ``group``; every rank returns the same dict).
        domain_names: name of domain id d at position d (default: the id).
    """
    emb_ND, labels_N = all_gather_rows(emb_ND, group), all_gather_rows(labels_N, group)
    if domains_N is not None:
        domains_N = all_gather_rows(domains_N, group)
    unified = scope_metrics(emb_ND, _class_ids(labels_N, domains_N), ks, chunk)
    out = {f"unified/{k}": v for k, v in unified.items()}
    if domains_N is None:
        return out
    per_domain = {}
    for d in torch.unique(domains_N).tolist():
        name = domain_names[d] if d < len(domain_names) else str(d)
        keep = domains_N == d
        per_domain[name] = scope_metrics(emb_ND[keep], labels_N[keep], ks, chunk)
        out.update({f"domain/{name}/{k}": v for k, v in per_domain[name].items()})
    for key in next(iter(per_domain.values())):
        values = [m[key] for m in per_domain.values()]
        out[f"hmean/{key}"] = 0.0 if min(values) == 0 else len(values) / sum(1 / v for v in values)
    return out
