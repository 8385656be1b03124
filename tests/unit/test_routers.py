"""Each router on hand-computed cases, the config rules that guard them, and the MoE layer around them."""
import math

import pytest
import torch

from moe_sys.config import ConfigError, validate
from moe_sys.moe.balance import BalanceSpec
from moe_sys.moe.capacity import Capacity
from moe_sys.moe.gate import Noise
from moe_sys.moe.layer import MoELayer
from moe_sys.moe.routing import ROUTERS, RouterSpec, RoutingContext
from moe_sys.moe.scoring import Selection

NO_LOSSES = BalanceSpec(())


def _router(kind, d_model, num_experts, top_k, weight=None, **spec):
    router = ROUTERS[kind](d_model, num_experts, top_k, spec=RouterSpec(**spec), num_tasks=3)
    if weight is not None:
        router.gate.weight.data.copy_(torch.tensor(weight, dtype=torch.float32))
    return router.eval()


def test_expert_choice_each_expert_takes_its_top_tokens():
    # Gate = identity, x = log of the affinities, so softmax(x) is exactly this table:
    aff = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.3, 0.7]])
    x = aff.log()
    ec = dict(capacity=Capacity(1.0, min_capacity=1))
    one_each = _router("expert_choice", 2, 2, 1, [[1, 0], [0, 1]], **ec)(x, RoutingContext((1, 4)))
    # C = 4/2 * 1 = 2: expert 0 takes t0, t1; expert 1 takes t2, t3.
    assert one_each.expert_ids_TK.tolist() == [[0], [0], [1], [1]]
    torch.testing.assert_close(one_each.weights_TK[:, 0], torch.tensor([0.9, 0.6, 0.8, 0.7]))
    # cf = 1.5 -> C = 3: expert 0 adds t3 (0.3), expert 1 adds t1 (0.4); t1 and t3 get both experts.
    wide = _router("expert_choice", 2, 2, 1, [[1, 0], [0, 1]], capacity=Capacity(1.5, min_capacity=1))(x, RoutingContext((1, 4)))
    assert wide.expert_ids_TK.tolist() == [[0, -1], [0, 1], [1, -1], [0, 1]]
    torch.testing.assert_close(wide.weights_TK, torch.tensor([[0.9, 0], [0.6, 0.4], [0.8, 0], [0.3, 0.7]]))
    assert wide.stats["load_E"].tolist() == [0.5, 0.5]
    # Padding is never taken: with t0 padded, expert 0's top-2 become t1, t3 and t0 gets nothing.
    masked = _router("expert_choice", 2, 2, 1, [[1, 0], [0, 1]], **ec)(x, RoutingContext((1, 4), mask_BS=torch.tensor([[0, 1, 1, 1]])))
    assert masked.expert_ids_TK.tolist() == [[-1, -1], [0, -1], [1, -1], [0, 1]]
    assert masked.stats["dropped_fraction"].item() == 0.0


def test_expert_choice_reports_tokens_no_expert_took():
    x = torch.tensor([[5.0, 5.0], [5.0, 5.0], [-5.0, -5.0], [-5.0, -5.0]])  # sigmoid: two tokens win both experts
    out = _router("expert_choice", 2, 2, 1, [[1, 0], [0, 1]], selection=Selection("sigmoid"),
                  capacity=Capacity(min_capacity=1))(x, RoutingContext((1, 4)))
    assert out.expert_ids_TK.tolist() == [[0, 1], [0, 1], [-1, -1], [-1, -1]]
    assert out.stats["dropped_fraction"].item() == 0.5


def test_example_level_routes_each_sequence_by_its_masked_mean():
    # Example 0: real tokens [2, 0] and [0, 0] (the third is padding) -> mean [1, 0] -> expert 0.
    # Example 1: [0, 1], [0, 2], [0, 3] -> mean [0, 2] -> expert 1.
    x = torch.tensor([[2.0, 0], [0, 0], [100, 0], [0, 1], [0, 2], [0, 3]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    out = _router("example", 2, 2, 1, [[1, 0], [0, 1]])(x, RoutingContext((2, 3), mask_BS=mask))
    assert out.expert_ids_TK[:, 0].tolist() == [0, 0, -1, 1, 1, 1]
    p0, p1 = 1 / (1 + math.exp(-1)), 1 / (1 + math.exp(-2))  # softmax weight of the chosen expert
    torch.testing.assert_close(out.weights_TK[:, 0], torch.tensor([p0, p0, 0.0, p1, p1, p1]))
    assert out.stats["load_E"].tolist() == pytest.approx([0.4, 0.6])  # in tokens: 2 of example 0, 3 of example 1


def test_task_table_routes_a_mixed_batch_by_domain():
    router = _router("task", 4, 6, 2, task_table=((0, 1), (2, 3), (4, 5)), balance=NO_LOSSES)
    ctx = RoutingContext((3, 2), domain_B=torch.tensor([2, 0, 1]))
    out = router(torch.randn(6, 4), ctx)
    assert out.expert_ids_TK.tolist() == [[4, 5], [4, 5], [0, 1], [0, 1], [2, 3], [2, 3]]
    assert torch.all(out.weights_TK == 0.5)
    assert out.losses == {} and list(router.parameters()) == []
    torch.testing.assert_close(torch.softmax(out.logits_TE[0], -1), torch.tensor([0, 0, 0, 0, 0.5, 0.5]))


def test_task_embedding_feeds_the_gate():
    router = _router("task", 3, 3, 1, [[1, 0, 0], [0, 1, 0], [0, 0, 1]])
    router.task_embed_AD.data.copy_(torch.tensor([[0.0, 3.0, 0.0], [0.0, 0.0, 3.0], [3.0, 0.0, 0.0]]))
    out = router(torch.randn(4, 3), RoutingContext((2, 2), domain_B=torch.tensor([1, 2])))
    assert out.expert_ids_TK[:, 0].tolist() == [2, 2, 0, 0]
    p = math.exp(3) / (math.exp(3) + 2)
    torch.testing.assert_close(out.weights_TK[:, 0], torch.full((4,), p))
    with pytest.raises(ValueError, match="domain ids"):
        router(torch.randn(4, 3), RoutingContext((2, 2)))


def test_group_limited_routing_stays_inside_the_best_groups():
    # Sigmoid affinities; 4 groups of 2. Plain top-2 is e0 (0.90) and e4 (0.88). With one group
    # allowed, a group scores the sum of its best top_k/group_topk = 2: g0 1.00, g1 0.95, g2 1.75,
    # g3 0.30, so both experts come from group 2.
    aff = torch.tensor([[0.90, 0.10, 0.50, 0.45, 0.88, 0.87, 0.20, 0.10]])
    logits = torch.log(aff / (1 - aff))
    eye = torch.eye(8).tolist()
    plain = _router("topk", 8, 8, 2, eye, selection=Selection("sigmoid"))(logits, RoutingContext((1, 1)))
    assert sorted(plain.expert_ids_TK[0].tolist()) == [0, 4]
    limited = _router("topk", 8, 8, 2, eye, selection=Selection("sigmoid", num_groups=4, group_topk=1))(
        logits, RoutingContext((1, 1)))
    assert limited.expert_ids_TK[0].tolist() == [4, 5]
    torch.testing.assert_close(limited.weights_TK[0], torch.tensor([0.88, 0.87]) / 1.75)


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_bias_changes_the_choice_not_the_weights(score):
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    router = _router("topk", 4, 4, 1, torch.eye(4).tolist(), selection=Selection(score),
                     balance=BalanceSpec((), bias_rate=1e-3))
    router.balance.bias_E.copy_(torch.tensor([0.0, 0.0, 5.0, 0.0]))
    out = router(logits, RoutingContext((1, 1)))
    assert out.expert_ids_TK.tolist() == [[2]]
    aff = torch.softmax(logits, -1) if score == "softmax" else torch.sigmoid(logits)
    torch.testing.assert_close(out.weights_TK[0, 0], aff[0, 2])


def test_padding_takes_no_slot_and_no_capacity():
    router = _router("topk", 4, 4, 1, torch.eye(4).tolist(), capacity=Capacity(0.5, min_capacity=1))
    x = torch.tensor([[5.0, 0, 0, 0]] * 4)
    # C = ceil(4/4 * 0.5) = 1. Token 0 is padding, so token 1 (not token 0) gets expert 0's one slot.
    out = router(x, RoutingContext((1, 4), mask_BS=torch.tensor([[0, 1, 1, 1]])))
    assert out.expert_ids_TK[:, 0].tolist() == [-1, 0, -1, -1]
    assert out.stats["dropped_fraction"].item() == pytest.approx(2 / 3)


def test_eval_capacity_factor_and_training_only_noise():
    spec = dict(capacity=Capacity(0.25, eval_factor=None, min_capacity=1), noise=Noise(0.5, True, True))
    router = _router("topk", 8, 8, 2, **spec)
    x = torch.randn(32, 8)
    first, second = router(x, RoutingContext((1, 32))), router(x, RoutingContext((1, 32)))
    assert torch.equal(first.expert_ids_TK, second.expert_ids_TK), "no noise in eval"
    router.train()
    noisy = [router(x, RoutingContext((1, 32))).expert_ids_TK for _ in range(2)]
    assert not torch.equal(noisy[0], noisy[1])
    wide = _router("topk", 8, 8, 2, capacity=Capacity(0.25, eval_factor=4.0, min_capacity=1))
    assert (wide(x, RoutingContext((1, 32))).expert_ids_TK >= 0).all()


def test_losses_only_in_training_and_named_by_type():
    router = _router("topk", 8, 8, 2, balance=BalanceSpec((("seq", 0.1), ("z", 0.01), ("mi", 0.5))))
    ctx = RoutingContext((2, 4), domain_B=torch.tensor([0, 1]))
    assert router(torch.randn(8, 8), ctx).losses == {}
    assert set(router.train()(torch.randn(8, 8), ctx).losses) == {"seq", "z", "mi"}


@pytest.mark.parametrize("gated", [False, True])
def test_shared_experts_add_a_dense_path(gated):
    torch.manual_seed(0)
    layer = MoELayer(8, 16, 4, 2, shared_experts=2, shared_gate=gated)
    x = torch.randn(2, 3, 8)
    y, _ = layer(x)
    routed = MoELayer(8, 16, 4, 2)
    routed.load_state_dict({k: v for k, v in layer.state_dict().items() if not k.startswith("shared")})
    x_TD = x.view(6, 8)
    h = torch.nn.functional.silu(x_TD @ layer.shared.w_gate_EDF[0]) * (x_TD @ layer.shared.w_up_EDF[0])
    shared = h @ layer.shared.w_down_EFD[0]
    if gated:
        shared = shared * torch.sigmoid(layer.shared_gate(x_TD))
    torch.testing.assert_close(y, routed(x)[0] + shared.view(2, 3, 8))
    assert layer.shared.w_up_EDF.shape == (1, 8, 32)


@pytest.mark.parametrize("router", ["topk", "expert_choice", "example", "task"])
def test_only_routed_expert_weights_have_expert_in_their_state_dict_key(router):
    # DeepSpeed writes every MoE-layer key containing "expert" into the per-expert files.
    spec = RouterSpec(balance=BalanceSpec((("switch", 0.01),), bias_rate=None if router == "expert_choice" else 1e-3))
    layer = MoELayer(8, 16, 4, 2, router=router, spec=spec, num_tasks=3, shared_experts=1, shared_gate=True)
    keys = list(layer.state_dict())
    assert [k for k in keys if "expert" in k and not k.startswith("experts.")] == []
    if router != "expert_choice":
        assert "router.balance.bias_E" in keys


def _error(moe, **other):
    with pytest.raises(ConfigError) as info:
        validate({"moe": moe, **other})
    return str(info.value)


def test_config_refuses_noncausal_routers_unless_allowed():
    msg = _error({"router": {"type": "expert_choice"}})
    assert msg.startswith("moe.router.type: expert_choice routing is not causal") and "allow_noncausal: true" in msg
    assert "leaks future tokens" in _error({"router": {"type": "example"}})
    assert validate({"moe": {"router": {"type": "example", "allow_noncausal": True}}}).moe.router.type == "example"
    assert validate({"moe": {"router": {"type": "task"}}}).moe.router.type == "task"


def test_config_rules_for_groups_tables_capacity_and_balance():
    assert _error({"router": {"num_groups": 4}}).startswith("moe.router.group_topk: group-limited routing needs both")
    assert _error({"router": {"num_groups": 3, "group_topk": 1}}) == \
        "moe.router.num_groups: 3 does not divide moe.num_experts=8"
    assert _error({"top_k": 4, "router": {"num_groups": 4, "group_topk": 1}}) == \
        "moe.router.group_topk: 1 groups of 2 experts hold fewer than top_k=4 experts"
    assert _error({"router": {"type": "task", "task_table": [[0, 1], [2, 3]]}, "balance": {"losses": []}}) == \
        "moe.router.task_table: 2 rows for 3 data.domains (one row per domain)"
    assert _error({"router": {"type": "task", "task_table": [[0, 1], [2, 9], [4, 5]]}, "balance": {"losses": []}}) == \
        "moe.router.task_table.1: [2, 9] must be top_k=2 distinct expert ids in [0, 8)"
    assert _error({"router": {"type": "task", "task_table": [[0, 1], [2, 3], [4, 5]]}}).startswith(
        "moe.balance.losses: a fixed task_table has no learned router to balance")
    assert _error({"router": {"type": "task"}, "capacity_factor": 1.0}).startswith(
        "moe.capacity_factor: task routing sends whole sequences")
    assert _error({"balance": {"losses": [{"type": "z", "coef": 1}, {"type": "z", "coef": 2}]}}).startswith(
        "moe.balance.losses: each type at most once")
    assert _error({"top_k": 1, "router": {"pre_softmax": False}}).startswith(
        "moe.router.pre_softmax: false with top_k=1 gives every token weight 1.0")
    assert _error({"balance": {"losses": [{"type": "swich", "coef": 1}]}}).startswith("moe.balance.losses.0.type: ")
    assert _error({"router": {"drop_polcy": "probs"}}) == "moe.router.drop_polcy: unknown key; did you mean 'drop_policy'?"
