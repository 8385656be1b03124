"""The dispatch+combine implementations the benchmarks race, each prepared from the same routing.

Legend: T tokens, D model dim, E experts, K slots per token, C capacity, R routed rows.

Every contender is a ``prepare(case, inputs) -> run`` pair: ``prepare`` converts the routing into
the contender's own input format outside the timed region (Megatron wants a [T, E] routing map, as
its router produces one), ``run()`` performs dispatch -> identity experts -> combine and returns y_TD.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch

from moe_sys import ops


@dataclass(frozen=True)
class Case:
    T: int
    D: int
    E: int
    K: int
    dtype: torch.dtype
    capacity_factor: Optional[float] = None  # None: dropless layout
    device: str = "cpu"

    @property
    def capacity(self) -> Optional[int]:
        """DeepSpeed's _capacity(cf * K): ceil(T / E * cf * K), so every contender drops alike."""
        if self.capacity_factor is None:
            return None
        return math.ceil(self.T / self.E * self.capacity_factor * self.K)


@dataclass(frozen=True)
class Inputs:
    x_TD: torch.Tensor
    logits_TE: torch.Tensor
    expert_ids_TK: torch.Tensor
    weights_TK: torch.Tensor


def make_inputs(case: Case, seed: int = 0) -> Inputs:
    """Random tokens and a softmax top-k routing of random logits (weights renormalised over k), drawn
    on the CPU (the same numbers on every device) and moved to ``case.device``."""
    g = torch.Generator().manual_seed(seed)
    x_TD = torch.randn(case.T, case.D, generator=g).to(case.device, case.dtype)
    logits_TE = torch.randn(case.T, case.E, generator=g).to(case.device)
    weights_TK, expert_ids_TK = _top_k(logits_TE, case.K)
    return Inputs(x_TD, logits_TE, expert_ids_TK, weights_TK)


def _top_k(logits_TE: torch.Tensor, k: int):
    weights_TK, expert_ids_TK = logits_TE.softmax(-1).topk(k, dim=-1)
    return weights_TK / weights_TK.sum(-1, keepdim=True), expert_ids_TK


def ours(impl: str, from_logits: bool = False):
    """moe_sys.ops with ops.impl = impl; from_logits adds the router's softmax/top-k (as DeepSpeed's
    gating does it) so the two are compared on the same work."""
    def prepare(case: Case, inputs: Inputs) -> Callable[[], torch.Tensor]:
        def run():
            ops.set_impl(impl)
            weights_TK, ids_TK = (_top_k(inputs.logits_TE, case.K) if from_logits
                                  else (inputs.weights_TK, inputs.expert_ids_TK))
            index = ops.build_index(ids_TK, case.E, case.capacity)
            x_RD = ops.permute(inputs.x_TD, index.dest_row_TK, index.num_rows)
            return ops.unpermute(x_RD, index.dest_row_TK, weights_TK)
        return run
    return prepare


def megatron(case: Case, inputs: Inputs) -> Callable[[], torch.Tensor]:
    """megatron.core moe_utils.permute/unpermute, the unfused (pure PyTorch) path; dropless only."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Transformer Engine and Apex are not installed"
        from megatron.core.transformer.moe import moe_utils
    routing_map_TE = torch.zeros(case.T, case.E, dtype=torch.bool, device=case.device).scatter_(
        1, inputs.expert_ids_TK, True)
    probs_TE = torch.zeros(case.T, case.E, device=case.device).scatter_(1, inputs.expert_ids_TK, inputs.weights_TK)
    num_out = case.T * case.K

    def run():
        x_RD, _, sorted_indices = moe_utils.permute(inputs.x_TD, routing_map_TE, num_out_tokens=num_out)
        y_TD = moe_utils.unpermute(x_RD, sorted_indices, inputs.x_TD.shape, probs=probs_TE,
                                   routing_map=routing_map_TE)
        return y_TD.to(inputs.x_TD.dtype)
    return run


def deepspeed_sparse(case: Case, inputs: Inputs) -> Callable[[], torch.Tensor]:
    """DeepSpeed 0.19's MOELayer path: topkgating(sparse_routes=True) -> _route_slots ->
    _sparse_encode (gather into [E, C, D]) -> _sparse_decode; capacity layout, 'position' drops."""
    from deepspeed.moe import sharded_moe as ds

    def run():
        _, C, E, idx_KT, loc_KT, gates_KT, _ = ds.topkgating(inputs.logits_TE, case.K, case.capacity_factor, 0,
                                                            drop_policy="position", sparse_routes=True)
        C = int(C)
        slots_KT = ds._route_slots(idx_KT, loc_KT, E, C)
        x_ECD = ds._sparse_encode(inputs.x_TD, slots_KT, E, C)
        return ds._sparse_decode(x_ECD.view(E * C, case.D), slots_KT, gates_KT, case.T)
    return run


def deepspeed_dense(case: Case, inputs: Inputs) -> Callable[[], torch.Tensor]:
    """DeepSpeed's dense einsum dispatch (its only path before 0.19 and still topkgating's default
    return): [T, E, C] combine weights, dispatch einsum 'sec,sm->ecm', combine 'sec,ecm->sm'."""
    from deepspeed.moe import sharded_moe as ds

    def run():
        _, combine_TEC, dispatch_TEC, _ = ds.topkgating(inputs.logits_TE, case.K, case.capacity_factor, 0,
                                                        drop_policy="position")
        x_ECD = torch.einsum("sec,sm->ecm", dispatch_TEC.to(case.dtype), inputs.x_TD)
        return torch.einsum("sec,ecm->sm", combine_TEC.to(case.dtype), x_ECD)
    return run


DROPLESS: Dict[str, Callable] = {"ours (kernel)": ours("kernel"), "ours (reference)": ours("reference"),
                                 "megatron-core": megatron}
CAPACITY: Dict[str, Callable] = {"ours (kernel)": ours("kernel"),
                                 "ours (kernel) + router": ours("kernel", from_logits=True),
                                 "ours (reference) + router": ours("reference", from_logits=True),
                                 "deepspeed (sparse)": deepspeed_sparse}
