"""From router logits to chosen experts and gate weights: the top-k path every learned router shares.

Legend: N rows being routed (tokens, or examples for example/task-level routing), E experts,
K experts chosen per row, G expert groups.

  affinity  softmax over the E experts, or an independent sigmoid per expert (always fp32)
  ranking   what top-k compares: softmax probabilities (pre_softmax), raw logits (post: top-k first,
            softmax over the K chosen afterwards), or sigmoid affinities; plus the aux-loss-free
            bias, which changes which experts are chosen but never the weights
  groups    optional device/node limit: keep the top-M groups by the sum of their best K/M rankings,
            then take the top-k inside them (DeepSeek-V2/V3, Megatron's group_limited_topk)
  weights   affinities of the chosen experts (post: softmax over the K chosen logits); renormalised
            over the slots that survive capacity, then multiplied by ``scale``
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch


@dataclass(frozen=True)
class Selection:
    """How scores turn into a choice (one field per ``moe.router`` key of the same name)."""

    score: str = "softmax"  # "softmax" | "sigmoid"
    pre_softmax: bool = True
    normalize: Optional[bool] = None  # None: renormalise when K > 1
    scale: float = 1.0
    num_groups: Optional[int] = None
    group_topk: Optional[int] = None

    def renormalizes(self, top_k: int) -> bool:
        return self.normalize if self.normalize is not None else top_k > 1


def affinity(logits_NE: torch.Tensor, score: str) -> torch.Tensor:
    """Per-expert affinity in fp32: softmax over experts, or sigmoid per expert (DeepSeek-V3)."""
    logits_NE = logits_NE.float()
    return torch.softmax(logits_NE, dim=-1) if score == "softmax" else torch.sigmoid(logits_NE)


def loss_probs(affinity_NE: torch.Tensor, score: str) -> torch.Tensor:
    """The distribution losses and entropy read: softmax as is, sigmoid normalised to sum 1 (as Megatron)."""
    if score == "softmax":
        return affinity_NE
    return affinity_NE / (affinity_NE.sum(-1, keepdim=True) + 1e-20)


def choose(logits_NE: torch.Tensor, top_k: int, sel: Selection, bias_E: Optional[torch.Tensor] = None,
           gumbel_NE: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k experts per row.

    Args:
        logits_NE: router logits.
        bias_E: aux-loss-free bias added to the ranking only.
        gumbel_NE: when given, slots 2..K are sampled: top-(K-1) of logits + Gumbel noise among the
            experts other than the first choice (DeepSpeed's top2_2nd_expert_sampling, for any K).
    Returns:
        weights_NK (before capacity and renormalisation), expert_ids_NK (column 0 = first choice),
        affinity_NE.
    """
    logits_NE = logits_NE.float()
    aff_NE = affinity(logits_NE, sel.score)
    post_softmax = sel.score == "softmax" and not sel.pre_softmax
    rank_NE = logits_NE if post_softmax else aff_NE
    if bias_E is not None:
        rank_NE = rank_NE + bias_E
    if sel.num_groups:
        rank_NE = limit_to_groups(rank_NE, top_k, sel.num_groups, sel.group_topk)
    ids_NK = _top_ids(rank_NE, top_k, logits_NE, gumbel_NE)
    if post_softmax:
        return torch.softmax(logits_NE.gather(1, ids_NK), dim=-1), ids_NK, aff_NE
    return aff_NE.gather(1, ids_NK), ids_NK, aff_NE


def _top_ids(rank_NE: torch.Tensor, top_k: int, logits_NE: torch.Tensor, gumbel_NE: Optional[torch.Tensor]):
    if gumbel_NE is None:
        return torch.topk(rank_NE, top_k, dim=-1).indices
    first_N1 = rank_NE.argmax(-1, keepdim=True)
    # Gumbel-max on logits samples from the softmax; experts outside the allowed groups stay out.
    noisy_NE = (logits_NE + gumbel_NE).masked_fill(rank_NE == float("-inf"), float("-inf"))
    noisy_NE = noisy_NE.scatter(1, first_N1, float("-inf"))
    return torch.cat([first_N1, torch.topk(noisy_NE, top_k - 1, dim=-1).indices], dim=1)


def limit_to_groups(rank_NE: torch.Tensor, top_k: int, num_groups: int, group_topk: int) -> torch.Tensor:
    """rank_NE with experts outside each row's top ``group_topk`` groups set to -inf.

    A group's score is the sum of its best top_k // group_topk rankings (Megatron; DeepSeek-V3 uses
    the best 2 of 8 with K=8, M=4, which is the same number).
    """
    N, E = rank_NE.shape
    group_NG = rank_NE.view(N, num_groups, E // num_groups).topk(top_k // group_topk, dim=-1).values.sum(-1)
    keep_NG = torch.zeros_like(group_NG, dtype=torch.bool).scatter(1, group_NG.topk(group_topk, dim=-1).indices, True)
    return rank_NE.masked_fill(~keep_NG.repeat_interleave(E // num_groups, dim=1), float("-inf"))


def finish_weights(weights_NK: torch.Tensor, kept_NK: torch.Tensor, top_k: int, sel: Selection) -> torch.Tensor:
    """Zero the dropped slots, renormalise over the kept ones (DeepSpeed), scale.

    Renormalising after capacity keeps each token's output a convex mix of the experts that did
    process it; a token with every slot dropped gets zero weights and passes through the residual.
    """
    weights_NK = weights_NK * kept_NK
    if sel.renormalizes(top_k):
        weights_NK = weights_NK / weights_NK.sum(-1, keepdim=True).clamp_min(torch.finfo(weights_NK.dtype).eps)
    return weights_NK * sel.scale if sel.scale != 1.0 else weights_NK


def sample_gumbel(shape, device) -> torch.Tensor:
    """Standard Gumbel noise drawn exactly as DeepSpeed's gumbel_rsample (same RNG stream)."""
    zero, one = torch.tensor(0.0, device=device), torch.tensor(1.0, device=device)
    return torch.distributions.gumbel.Gumbel(zero, one).rsample(shape)
