"""Our token-choice routing equals DeepSpeed's and Megatron-Core's on the same logits, and where it
differs on purpose the difference is pinned here (and explained in docs/routing.md)."""
import pytest
import torch
from deepspeed.moe import sharded_moe
from megatron.core.transformer.moe import moe_utils

from moe_sys import ops
from moe_sys.moe import losses
from moe_sys.moe.balance import Balancer, BalanceSpec
from moe_sys.moe.capacity import Capacity
from moe_sys.moe.gate import Noise
from moe_sys.moe.router_topk import route_rows
from moe_sys.moe.routing import RouterSpec, RoutingContext, token_rows
from moe_sys.moe.scoring import Selection

T, E = 48, 8


def _logits(seed, t=T, e=E):
    return torch.randn(t, e, generator=torch.Generator().manual_seed(seed)) * 2


def _ours(logits, k, spec, bias=None, valid=None):
    """The TopKRouter path after its gate, on given logits; losses with coefficient 1."""
    rows = token_rows(RoutingContext((1, logits.shape[0]), mask_BS=valid[None] if valid is not None else None), "cpu")
    spec = RouterSpec(selection=spec.selection, capacity=spec.capacity, noise=spec.noise,
                      balance=BalanceSpec(losses=(("switch", 1.0), ("z", 1.0)), bias_rate=0.0 if bias is not None else None))
    balancer = Balancer(logits.shape[1], spec.balance)
    if bias is not None:
        balancer.bias_E.copy_(bias)
    return route_rows(logits, rows, k, spec, balancer, training=True, capacity=spec.capacity)


def _dense_TEC(r, capacity):
    """Our (expert ids, dest positions, weights) in DeepSpeed's combine_weights layout [T, E, C]."""
    dest_TK = ops.build_index(r.expert_ids_NK, E, capacity).dest_row_TK
    out = torch.zeros(dest_TK.shape[0], E * capacity)
    rows, cols = (dest_TK >= 0).nonzero(as_tuple=True)
    out[rows, dest_TK[rows, cols]] = r.weights_NK[rows, cols]
    return out.view(-1, E, capacity)


def _dense_TE(weights_NK, ids_NK):
    kept = ids_NK >= 0
    return torch.zeros(ids_NK.shape[0], E).scatter_add(1, ids_NK.clamp(min=0), weights_NK * kept)


@pytest.mark.parametrize("seed", range(3))
def test_top1_random_priority_equals_deepspeed_top1gating(seed):
    logits = _logits(seed)
    torch.manual_seed(seed)  # both draw the random-token-selection priority as U(0,1) of shape [T, E]
    l_aux, combine, _, _ = sharded_moe.top1gating(logits.clone(), 0.5, 2, use_rts=True)
    torch.manual_seed(seed)
    r = _ours(logits, 1, RouterSpec(capacity=Capacity(0.5, min_capacity=2, drop_policy="random")))
    assert (r.expert_ids_NK < 0).any(), "capacity 0.5 must drop, else the case proves nothing"
    torch.testing.assert_close(_dense_TEC(r, combine.shape[2]), combine)
    torch.testing.assert_close(r.losses["switch"], l_aux)


@pytest.mark.parametrize("sample", [False, True])
def test_top2_position_equals_deepspeed_top2gating(sample):
    logits = _logits(3)
    torch.manual_seed(0)
    l_aux, combine, _, _ = sharded_moe.top2gating(logits.clone(), 0.5, 2, top2_2nd_expert_sampling=sample)
    torch.manual_seed(0)
    r = _ours(logits, 2, RouterSpec(capacity=Capacity(0.5, min_capacity=2), noise=Noise(sample_second=sample)))
    assert (r.expert_ids_NK < 0).any()
    torch.testing.assert_close(_dense_TEC(r, combine.shape[2]), combine)
    # DeepSpeed's top-2 aux loss counts first choices only; ours counts all K slots, as its
    # topkgating does (checked with K=2 in the next test).
    first_only = losses.switch_aux_loss(r.probs_NE, losses.expert_counts(r.chosen_NK[:, :1], E))
    torch.testing.assert_close(first_only, l_aux)


@pytest.mark.parametrize("k", [2, 3, 4])
def test_topk_probs_policy_equals_deepspeed_topkgating(k):
    logits = _logits(10 + k)
    l_aux, combine, dispatch, counts = sharded_moe.topkgating(logits.clone(), k, 0.5, 2, drop_policy="probs")
    r = _ours(logits, k, RouterSpec(capacity=Capacity(0.5, min_capacity=2, drop_policy="probs")))
    assert (r.expert_ids_NK < 0).any()
    # Same kept (token, expert) pairs and weights; DeepSpeed numbers kept slots in token order,
    # we in slot-major order, which only permutes rows inside an expert's buffer.
    torch.testing.assert_close(_dense_TE(r.weights_NK, r.expert_ids_NK), combine.sum(-1))
    assert torch.equal(_dense_TE(torch.ones_like(r.weights_NK), r.expert_ids_NK).bool(), dispatch.any(-1))
    torch.testing.assert_close(r.losses["switch"], l_aux)
    torch.testing.assert_close(losses.expert_counts(r.chosen_NK, E), counts.float())


def test_dropless_equals_deepspeed_without_dropping():
    logits = _logits(20)
    _, combine, _, _ = sharded_moe.topkgating(logits.clone(), 3, 1.0, 2, drop_tokens=False)
    r = _ours(logits, 3, RouterSpec())
    assert (r.expert_ids_NK >= 0).all()
    torch.testing.assert_close(_dense_TE(r.weights_NK, r.expert_ids_NK), combine.sum(-1))


def test_our_position_policy_is_slot_major_unlike_deepspeed_topk_position():
    # Token 0 picks (e0, e1), token 1 picks (e1, e0); one slot per expert. Slot-major priority keeps
    # both first choices; DeepSpeed's topkgating 'position' numbers slots token by token, so token 0's
    # second choice takes e1 before token 1's first choice.
    logits = torch.tensor([[3.0, 2.0, -9, -9], [2.0, 3.0, -9, -9], [-9, -9, 0, 0], [-9, -9, 0, 0]])
    spec = RouterSpec(capacity=Capacity(0.5, min_capacity=1))
    r = route_rows(logits, token_rows(RoutingContext((1, 4)), "cpu"), 2, spec, Balancer(4, BalanceSpec(())), True,
                   spec.capacity)
    assert r.expert_ids_NK[:2].tolist() == [[0, -1], [1, -1]]
    ds = sharded_moe.topkgating(logits.clone(), 2, 0.5, 1, drop_policy="position")[2].any(-1)
    assert ds[0].tolist()[:2] == [True, True] and ds[1].tolist()[:2] == [False, False]


def test_position_policy_keeps_the_first_tokens():
    # Megatron's 'position' and DeepSpeed top1 without RTS pick among equal mask values with
    # torch.topk, whose tie order is unspecified (on CPU they keep tokens from the middle).
    logits = torch.zeros(64, 4)
    logits[:, 0] = 5.0
    r = _ours(logits, 1, RouterSpec(capacity=Capacity(0.25, min_capacity=1)))
    assert (r.expert_ids_NK[:, 0] >= 0).nonzero().flatten().tolist() == [0, 1, 2, 3]


MEGATRON_CASES = [
    # (score, pre_softmax, normalize, k, groups, scaling)
    ("softmax", False, None, 2, None, None),
    ("softmax", False, None, 4, None, None),
    ("softmax", True, False, 1, None, None),
    ("softmax", True, False, 3, None, None),
    ("sigmoid", True, None, 1, None, None),
    ("sigmoid", True, None, 4, None, 2.5),
    ("softmax", False, None, 4, (4, 2), None),
    ("sigmoid", True, None, 4, (4, 2), 2.5),
]


@pytest.mark.parametrize("score,pre,normalize,k,groups,scale", MEGATRON_CASES)
def test_topk_routing_equals_megatron(score, pre, normalize, k, groups, scale):
    logits = _logits(30 + k)
    probs, rmap = moe_utils.topk_routing_with_score_function(
        logits, k, use_pre_softmax=pre, num_groups=groups and groups[0], group_topk=groups and groups[1],
        scaling_factor=scale, score_function=score)
    sel = Selection(score, pre, normalize, scale or 1.0, groups and groups[0], groups and groups[1])
    r = _ours(logits, k, RouterSpec(selection=sel))
    torch.testing.assert_close(_dense_TE(r.weights_NK, r.expert_ids_NK), probs)
    assert torch.equal(_dense_TE(torch.ones_like(r.weights_NK), r.expert_ids_NK).bool(), rmap)


def test_sigmoid_expert_bias_equals_megatron():
    logits, bias = _logits(40), torch.randn(E) * 0.3
    probs, rmap = moe_utils.topk_routing_with_score_function(logits, 4, score_function="sigmoid", expert_bias=bias)
    r = _ours(logits, 4, RouterSpec(selection=Selection("sigmoid")), bias=bias)
    torch.testing.assert_close(_dense_TE(r.weights_NK, r.expert_ids_NK), probs)
    plain = _ours(logits, 4, RouterSpec(selection=Selection("sigmoid")))
    assert not torch.equal(r.expert_ids_NK, plain.expert_ids_NK), "the bias should change some choices"


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_switch_aux_and_z_loss_equal_megatron_with_padding(score):
    k, logits = 2, _logits(50)
    valid = (torch.rand(T, generator=torch.Generator().manual_seed(1)) > 0.25).float()
    r = _ours(logits, k, RouterSpec(selection=Selection(score)), valid=valid)
    padding = valid == 0
    # Megatron's padding_mask is True at padding here (its docstring says the opposite; the code masks ~mask).
    rmap, scores = moe_utils.compute_routing_scores_for_aux_loss(logits, k, score, padding_mask=padding)
    tokens_E = rmap.sum(0).float()
    expected = moe_utils.switch_load_balancing_loss_func(scores, tokens_E, int(tokens_E.sum()) // k, k, E, 1.0)
    torch.testing.assert_close(r.losses["switch"], expected)
    torch.testing.assert_close(r.losses["z"], moe_utils.z_loss_func(logits, 1.0, padding_mask=padding))


def test_seq_aux_loss_equals_megatron_seq_aux_loss():
    B, S, k = 3, 16, 2
    logits_BSE = _logits(60, B * S).view(B, S, E)
    probs_BSE = torch.softmax(logits_BSE, -1)
    ids_BSK = probs_BSE.topk(k, -1).indices
    ours = losses.seq_aux_loss(probs_BSE.reshape(-1, E), ids_BSK.reshape(-1, k),
                               torch.arange(B).repeat_interleave(S), B)
    # Megatron (router._apply_seq_aux_loss): [S, B, E] viewed as [S, B*E], so each sequence is its
    # own block of experts; the Switch loss over that, divided by B.
    rmap_SBE = torch.zeros(B, S, E).scatter(2, ids_BSK, 1.0).transpose(0, 1)
    expected = moe_utils.switch_load_balancing_loss_func(
        probs_BSE.transpose(0, 1).reshape(S, B * E), rmap_SBE.reshape(S, B * E).sum(0), S, k, E, 1.0) / B
    torch.testing.assert_close(ours, expected)


def test_bias_update_equals_megatron_get_updated_expert_bias(monkeypatch):
    counts = torch.tensor([5.0, 1, 3, 3, 0, 9, 2, 1])
    bias = torch.randn(E)
    monkeypatch.setattr(moe_utils.torch.distributed, "all_reduce", lambda t, group=None: t)
    monkeypatch.setattr(moe_utils.parallel_state, "get_tensor_and_data_parallel_group", lambda **kw: None)
    expected = moe_utils.get_updated_expert_bias(counts.clone(), bias.clone(), 1e-3)
    balancer = Balancer(E, BalanceSpec((), bias_rate=1e-3))
    balancer.bias_E.copy_(bias)
    balancer.step_counts_E = counts.clone()
    balancer.step()
    torch.testing.assert_close(balancer.bias_E, expected)


def test_probs_drop_policy_equals_megatron_when_both_rank_by_the_softmax():
    # Megatron ranks tokens by the final routing probs, we by the affinity (softmax over all E, as
    # DeepSpeed). They coincide with pre-softmax and no renormalisation; with post-softmax Megatron
    # ranks by the softmax over the K chosen logits instead (docs/routing.md).
    k, logits = 2, _logits(70)
    probs, rmap = moe_utils.topk_routing_with_score_function(logits, k, use_pre_softmax=True)
    _, kept_map = moe_utils.apply_router_token_dropping(probs, rmap, k, 0.5, drop_policy="probs")
    spec = RouterSpec(selection=Selection(normalize=False), capacity=Capacity(0.5, min_capacity=0, drop_policy="probs"))
    r = _ours(logits, k, spec)
    assert (r.expert_ids_NK < 0).any()
    assert torch.equal(_dense_TE(torch.ones_like(r.weights_NK), r.expert_ids_NK).bool(), kept_map)
