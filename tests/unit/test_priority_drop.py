"""drop_policy: priority (V-MoE's batch prioritized routing) against a direct re-computation of its definition."""
import pytest
import torch

from moe_sys.moe.capacity import Capacity, capacity


def _bpr_reference(expert_ids_NK, affinity_NE, cap):
    """vmoe/moe.py _get_top_experts_per_item_common with batch_priority=True, written as loops: tokens
    sorted by their top gate (stable), slots visited top-1 choices first, each expert keeps its first cap."""
    N, K = expert_ids_NK.shape
    top_N = affinity_NE.max(1).values.tolist()
    perm = sorted(range(N), key=lambda n: -top_N[n])  # Python's sort is stable, like jnp.argsort
    filled, kept = {}, torch.full_like(expert_ids_NK, -1)
    for k in range(K):
        for n in perm:
            e = int(expert_ids_NK[n, k])
            if e >= 0 and filled.get(e, 0) < cap:
                filled[e] = filled.get(e, 0) + 1
                kept[n, k] = e
    return kept


def _route(N, E, K, seed, ties):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(N, E, generator=g)
    if ties:  # coarse logits: many tokens share their top gate exactly
        logits = logits.round()
    affinity = torch.softmax(logits, -1)
    return torch.topk(affinity, K, dim=-1).indices, affinity


@pytest.mark.parametrize("N,E,K,factor,seed,ties", [(40, 4, 1, 0.5, 0, False), (64, 8, 2, 0.6, 1, False),
                                                    (50, 4, 2, 0.7, 2, True), (33, 6, 3, 0.4, 3, True)])
def test_priority_policy_equals_batch_prioritized_routing(N, E, K, factor, seed, ties):
    ids, affinity = _route(N, E, K, seed, ties)
    cap = capacity(N, E, K, factor, min_capacity=1)
    kept = Capacity(factor=factor, min_capacity=1, drop_policy="priority").apply(ids, affinity, training=True)
    assert (kept >= 0).sum() < N * K, "capacity should drop slots, else the case proves nothing"
    assert torch.equal(kept, _bpr_reference(ids, affinity, cap))


def test_priority_differs_from_position_and_probs():
    """A weak first choice beats a strong second choice (probs lets the second win), and a confident
    late token beats an unsure early one for the same first choice (position keeps the early one)."""
    affinity = torch.tensor([[0.40, 0.32, 0.28],   # token 0: unsure, first choice expert 0
                             [0.45, 0.50, 0.05],   # token 1: first expert 1, strong second choice expert 0
                             [0.04, 0.90, 0.06]])  # token 2: confident first choice expert 1
    ids = torch.topk(affinity, 2, dim=-1).indices
    by = {p: Capacity(1 / 3, None, 1, p).apply(ids, affinity, True) for p in ("position", "probs", "priority")}
    assert capacity(3, 3, 2, 1 / 3, 1) == 1  # one slot per expert
    assert by["priority"].tolist() == [[0, -1], [-1, -1], [1, 2]]
    assert by["probs"].tolist() == [[-1, -1], [-1, 0], [1, 2]]
    assert by["position"].tolist() == [[0, -1], [1, -1], [-1, 2]]


def test_priority_keeps_padding_out():
    ids, affinity = _route(20, 4, 2, 5, False)
    ids[3] = -1
    kept = Capacity(factor=0.5, min_capacity=1, drop_policy="priority").apply(ids, affinity, training=True)
    assert (kept[3] == -1).all()
    assert torch.equal(kept, _bpr_reference(ids, affinity, capacity(20, 4, 2, 0.5, 1)))
