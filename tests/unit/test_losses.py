"""Every balancing loss and the aux-loss-free bias update on cases small enough to do by hand."""
import math

import pytest
import torch

from moe_sys.moe import losses
from moe_sys.moe.balance import Balancer, BalanceSpec
from moe_sys.moe.routing import RoutingContext, token_rows

P = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7]])


def test_switch_aux_loss_by_hand_and_padding_ignored():
    ids = torch.tensor([[0], [0], [1]])
    # f = [2/3, 1/3], P = [0.6, 0.4]: 2 * (2/3*0.6 + 1/3*0.4) = 16/15
    counts = losses.expert_counts(ids, 2)
    assert counts.tolist() == [2.0, 1.0]
    assert losses.switch_aux_loss(P, counts).item() == pytest.approx(16 / 15)
    # Padding row 2: f = [1, 0], P = [0.75, 0.25] -> 1.5
    valid = torch.tensor([1.0, 1.0, 0.0])
    masked = losses.switch_aux_loss(P, losses.expert_counts(ids, 2, valid), valid)
    assert masked.item() == pytest.approx(1.5)
    uniform = losses.switch_aux_loss(torch.full((4, 2), 0.5), torch.tensor([2.0, 2.0]))
    assert uniform.item() == pytest.approx(1.0)


def test_seq_aux_loss_by_hand():
    # Sequence 0 = rows 0, 1 (both chose expert 0): f = [1, 0], P = [0.75, 0.25] -> 2 * 0.75 = 1.5
    # Sequence 1 = row 2 (chose expert 1): f = [0, 1], P = [0.3, 0.7] -> 2 * 0.7 = 1.4
    ids, seq = torch.tensor([[0], [0], [1]]), torch.tensor([0, 0, 1])
    assert losses.seq_aux_loss(P, ids, seq, 2).item() == pytest.approx((1.5 + 1.4) / 2)
    # A sequence of padding only is left out of the mean.
    assert losses.seq_aux_loss(P, ids, torch.tensor([0, 0, 2]), 3, torch.tensor([1.0, 1.0, 0.0])).item() == \
        pytest.approx(1.5)


def test_z_loss_by_hand():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])  # logsumexp: ln 2, ln 4
    expected = (math.log(2) ** 2 + math.log(4) ** 2) / 2
    assert losses.z_loss(logits).item() == pytest.approx(expected)
    assert losses.z_loss(logits, torch.tensor([1.0, 0.0])).item() == pytest.approx(math.log(2) ** 2)


def test_mi_loss_by_hand():
    tasks = torch.tensor([0, 0, 1, 1])
    # Each task sure of its own expert: H(e) = ln 2, H(e|a) = 0.
    sure = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    assert losses.mi_loss(sure, tasks, 2).item() == pytest.approx(-math.log(2))
    assert losses.mi_loss(torch.full((4, 2), 0.5), tasks, 2).item() == pytest.approx(0.0, abs=1e-7)
    # p(e|0) = [.5, .5], p(e|1) = [0, 1]: p(e) = [.25, .75]; MI = H(.25, .75) - ln2 / 2
    mixed = torch.tensor([[0.5, 0.5], [0.5, 0.5], [0.0, 1.0], [0.0, 1.0]])
    h_e = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert losses.mi_loss(mixed, tasks, 2).item() == pytest.approx(-(h_e - math.log(2) / 2))
    # Padding rows do not count toward p(a) or p(e|a).
    padded = torch.cat([sure, torch.tensor([[0.5, 0.5]])])
    assert losses.mi_loss(padded, torch.tensor([0, 0, 1, 1, 0]), 2, torch.tensor([1.0, 1, 1, 1, 0])).item() == \
        pytest.approx(-math.log(2))


def test_losses_carry_gradient_through_probabilities_only():
    logits = torch.randn(6, 4, requires_grad=True)
    probs = torch.softmax(logits, -1)
    ids = probs.topk(2, -1).indices
    loss = losses.switch_aux_loss(probs, losses.expert_counts(ids, 4)) + losses.z_loss(logits)
    loss.backward()
    assert logits.grad.abs().sum() > 0


def _rows(n):
    return token_rows(RoutingContext((1, n)), "cpu")


def test_global_loss_averages_counts_over_the_steps_micro_batches():
    balancer = Balancer(2, BalanceSpec((("global", 1.0),)))
    probs = torch.full((2, 2), 0.5)
    logits = torch.zeros(2, 2)
    first = balancer.losses(logits, torch.tensor([[0.9, 0.1], [0.8, 0.2]]), torch.tensor([[0], [0]]), _rows(2))
    assert first["global"].item() == pytest.approx(2 * 0.85)  # f = [1, 0] so far
    second = balancer.losses(logits, probs, torch.tensor([[1], [1]]), _rows(2))
    assert second["global"].item() == pytest.approx(1.0)  # counts averaged: f = [.5, .5]
    balancer.step()
    again = balancer.losses(logits, torch.tensor([[0.9, 0.1], [0.8, 0.2]]), torch.tensor([[1], [1]]), _rows(2))
    assert again["global"].item() == pytest.approx(2 * 0.15)  # reset: f = [0, 1]


def test_bias_update_by_hand_padding_excluded_and_eval_ignored():
    balancer = Balancer(4, BalanceSpec((), bias_rate=0.1)).train()
    ctx = RoutingContext((1, 5), mask_BS=torch.tensor([[1, 1, 1, 1, 0]]))
    rows = token_rows(ctx, "cpu")
    chosen = torch.tensor([[0], [0], [0], [1], [-1]])  # loads [3, 1, 0, 0], mean 1
    balancer.observe(chosen, rows)
    with torch.no_grad():  # evaluation-style forwards do not count
        balancer.observe(torch.tensor([[3], [3], [3], [3], [3]]), token_rows(RoutingContext((1, 5)), "cpu"))
    balancer.step()
    assert balancer.bias_E.tolist() == pytest.approx([-0.1, 0.0, 0.1, 0.1])
    balancer.step()  # nothing observed since the last step: no change
    assert balancer.bias_E.tolist() == pytest.approx([-0.1, 0.0, 0.1, 0.1])


def test_bias_is_checkpointed_and_stays_fp32_under_a_bf16_cast():
    balancer = Balancer(4, BalanceSpec((), bias_rate=1e-3))
    assert "bias_E" in balancer.state_dict()
    balancer.bias_E.fill_(0.123456789)
    balancer.bfloat16()
    assert balancer.bias_E.dtype == torch.float32 and balancer.bias_E[0].item() == pytest.approx(0.123456789, rel=1e-7)
    assert "bias_E" not in Balancer(4, BalanceSpec(())).state_dict()
