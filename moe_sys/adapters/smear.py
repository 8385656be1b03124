"""SMEAR (Muqeeth, Liu, Raffel; TMLR 2024): route each example softly, merge the experts' parameters
with the routing weights, and run the one merged adapter. Gradients reach every expert and the
router exactly (no estimator), at about the cost of a single expert.

Here: the router and the per-example merge, also when the experts are sharded over expert-parallel
ranks; ``AdapterMoE`` (adapter_experts.py) runs the merged adapter.

Legend: B examples, S sequence, T = B*S tokens, G segments per sequence, N decisions (B*G), D model
dim, E experts (global), El local experts, P expert-parallel ranks, M flattened expert size.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn

from moe_sys.moe.routing import RouterOutput, RoutingContext


class SmearRouter(nn.Module):
    """p = softmax(LayerNorm(mask-aware mean of the block input) @ W^T): one decision per example
    (``segments`` = 1) or per causal segment (see ``segment_means``).

    As in the paper: no bias, W ~ N(0, 1e-2) (near-uniform merging at the start), and in training an
    optional expert dropout that zeroes each weight with probability p and renormalises. Every token
    carries all E experts with its segment's weights (K = E), so the same routing also drives the
    ensemble that mixes expert outputs instead of parameters.
    """

    def __init__(self, d_model: int, num_experts: int, expert_dropout: float = 0.0, segments: int = 1,
                 init_std: float = 1e-2):
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.weight = nn.Parameter(torch.randn(num_experts, d_model) * init_std)
        self.expert_dropout, self.segments = expert_dropout, segments

    def forward(self, x_TD: torch.Tensor, ctx: RoutingContext) -> RouterOutput:
        B, S = ctx.batch_shape
        pooled_BGD = segment_means(x_TD.view(B, S, -1), ctx.mask_BS, self.segments)
        # fp32 softmax: the merge weights multiply whole parameter tensors.
        logits_BGE = self.norm(pooled_BGD).float() @ self.weight.float().t()
        probs_BGE = self._drop_experts(torch.softmax(logits_BGE, dim=-1))
        E = probs_BGE.shape[-1]

        def per_token(t_BGE):
            return t_BGE.repeat_interleave(S // self.segments, dim=1).reshape(B * S, E)

        weights_TK, ids_TK = per_token(probs_BGE), torch.arange(E, device=x_TD.device).expand(B * S, E)
        if ctx.mask_BS is not None:  # padding tokens are routed nowhere
            pad_T1 = ctx.mask_BS.reshape(-1, 1) == 0
            weights_TK, ids_TK = weights_TK.masked_fill(pad_T1, 0.0), ids_TK.masked_fill(pad_T1, -1)
        probs_NE = probs_BGE.reshape(-1, E).detach()
        stats = {"load_E": probs_NE.mean(0), "dropped_fraction": probs_NE.new_zeros(()),
                 "entropy": -(probs_NE * probs_NE.clamp_min(1e-20).log()).sum(-1).mean()}
        return RouterOutput(weights_TK, ids_TK, per_token(logits_BGE), {}, stats)

    def _drop_experts(self, probs_NE: torch.Tensor) -> torch.Tensor:
        if not self.training or self.expert_dropout == 0:
            return probs_NE
        keep_NE = torch.rand_like(probs_NE) >= self.expert_dropout
        keep_NE |= ~keep_NE.any(-1, keepdim=True)  # a decision that lost every expert keeps them all
        kept_NE = probs_NE * keep_NE
        return kept_NE / kept_NE.sum(-1, keepdim=True)


def segment_means(x_BSD: torch.Tensor, mask_BS: Optional[torch.Tensor], segments: int) -> torch.Tensor:
    """[B, G, D] router inputs over the real (unmasked) tokens.

    G = 1: the mean of the whole example (SMEAR as published; in a causal LM early tokens then depend
    on later ones). G > 1: the sequence is cut into G equal segments and segment g gets the mean of
    segments 0..g-1 (zeros for g = 0, which the router turns into its learned prior), so no token's
    adapter reads the tokens of its own segment or after it.
    """
    B, S, D = x_BSD.shape
    if S % segments:
        raise ValueError(f"SMEAR: sequence length {S} is not divisible by segments={segments}")
    m_BS1 = (mask_BS.to(x_BSD.dtype) if mask_BS is not None else x_BSD.new_ones(B, S)).unsqueeze(-1)
    sums_BGD = (x_BSD * m_BS1).view(B, segments, S // segments, D).sum(2)
    counts_BG1 = m_BS1.view(B, segments, S // segments, 1).sum(2)
    if segments > 1:  # exclusive prefix sums: segment g sees only the segments before it
        sums_BGD, counts_BG1 = sums_BGD.cumsum(1) - sums_BGD, counts_BG1.cumsum(1) - counts_BG1
    return sums_BGD / counts_BG1.clamp_min(1.0)


def example_weights(routing: RouterOutput, batch_shape: Tuple[int, int], num_experts: int) -> torch.Tensor:
    """[B, E] weights of a per-example decision: the mean over each example's routed tokens (which
    all carry the same weights under an example- or task-level router; padding carries none)."""
    B, S = batch_shape
    ids_TK = routing.expert_ids_TK
    routed_TK = ids_TK >= 0
    w_TE = routing.weights_TK.new_zeros(B * S, num_experts)
    w_TE = w_TE.scatter_add(1, ids_TK.clamp_min(0), routing.weights_TK * routed_TK)
    tokens_B = routed_TK.any(-1).view(B, S).sum(1).clamp_min(1)
    return w_TE.view(B, S, num_experts).sum(1) / tokens_B[:, None]


def merge_experts(params_El: Dict[str, torch.Tensor], w_BE: torch.Tensor, ep_group: Optional[dist.ProcessGroup],
                  ep_rank: int = 0) -> Dict[str, torch.Tensor]:
    """Per-example merged parameters sum_e w[b, e] * P_e for every expert parameter P [El, ...] -> [B, ...].

    With the experts sharded over ``ep_group`` each rank holds El of them but needs the sum over all E
    for its own examples: the routing weights of every rank's examples are all-gathered, each rank
    sums its local experts for all of them, and a reduce-scatter hands every rank the total for its
    own examples (merged weight = sum over ranks of the local partial sums). One all-gather of P*B*E
    weights and one reduce-scatter of P*B*M values per site and step, the same again in backward:
    cheap for adapters, not for full FFN experts. All ranks must route the same number of examples.
    """
    El = next(iter(params_El.values())).shape[0]
    flat_ElM = torch.cat([p.reshape(El, -1) for p in params_El.values()], dim=1)
    if ep_group is None:
        merged_BM = w_BE.to(flat_ElM.dtype) @ flat_ElM
    else:
        w_all = _AllGather.apply(w_BE, ep_group)[:, ep_rank * El:(ep_rank + 1) * El]
        merged_BM = _ReduceScatter.apply(w_all.to(flat_ElM.dtype) @ flat_ElM, ep_group)
    sizes = [p[0].numel() for p in params_El.values()]
    return {k: m.view(-1, *p.shape[1:]) for (k, p), m in zip(params_El.items(), merged_BM.split(sizes, dim=1))}


class _AllGather(torch.autograd.Function):
    """[B, ...] on each of P ranks -> [P*B, ...] on all; the gradient of a gathered copy is summed
    back onto the rank it came from (reduce-scatter)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        out = x.new_empty((dist.get_world_size(group) * x.shape[0], *x.shape[1:]))
        dist.all_gather_single(out, x.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        return _ReduceScatter.apply(grad, ctx.group), None


class _ReduceScatter(torch.autograd.Function):
    """[P*B, ...] partial sums on all ranks -> rank r gets the sum of every rank's block r; backward
    hands each rank's gradient to every contributor (all-gather)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        out = x.new_empty((x.shape[0] // dist.get_world_size(group), *x.shape[1:]))
        dist.reduce_scatter_single(out, x.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        return _AllGather.apply(grad, ctx.group), None
