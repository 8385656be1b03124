"""TIES / DARE-TIES agree with peft.utils.merge_utils (the default) and with mergekit's convention by name,
on fresh random task vectors with unequal weights; banks trim each slot on its own."""
from __future__ import annotations

import pytest
import torch

merge_utils = pytest.importorskip("peft.utils.merge_utils")
from moe_sys.adapters.merge import MergeOptions, merge_deltas, merge_states  # noqa: E402


def taus(seed: int, shape=(3, 7, 11)):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("density", [0.07, 0.2, 0.5])
def test_ties_equals_peft(density):
    tau_M, w = taus(0, (3, 100)), [0.7, 1.3, 0.4]
    ours = merge_deltas(tau_M, MergeOptions("ties", w, density=density), torch.Generator())
    theirs = merge_utils.ties(list(tau_M), torch.tensor(w), density)
    torch.testing.assert_close(ours, theirs)


def test_ties_keeps_int_density_n():
    tau_M = taus(1, (1, 100))
    ours = merge_deltas(tau_M, MergeOptions("ties", density=0.07), torch.Generator())
    assert int((ours != 0).sum()) == 7


def test_dare_ties_equals_peft_given_the_same_drop():
    tau_M, w = taus(2, (2, 50)), [1.0, 0.5]
    generator = torch.Generator().manual_seed(3)
    keep = torch.rand(tau_M.shape, generator=torch.Generator().manual_seed(3)) < 0.5
    ours = merge_deltas(tau_M, MergeOptions("dare_ties", w, density=0.5), generator)
    rescaled = list(tau_M * keep / 0.5)
    theirs = merge_utils.disjoint_merge(torch.stack(rescaled) * torch.tensor(w)[:, None],
                                        merge_utils.calculate_majority_sign_mask(torch.stack(rescaled)))
    torch.testing.assert_close(ours, theirs)


def test_mergekit_convention():
    """mergekit: sign of the weighted sum; the mean divides by the weights that agree."""
    tau_M = torch.tensor([[2.0, -1.0, 0.0], [-1.0, -1.0, 3.0]])
    ours = merge_deltas(tau_M, MergeOptions("ties", [1.0, 3.0], density=1.0, sign="mergekit"), torch.Generator())
    torch.testing.assert_close(ours, torch.tensor([(-3.0) / 3.0, (-1.0 - 3.0) / 4.0, 9.0 / 3.0]))
    peft = merge_deltas(tau_M, MergeOptions("ties", [1.0, 3.0], density=1.0), torch.Generator())
    torch.testing.assert_close(peft, torch.tensor([2.0, (-1.0 - 3.0) / 2.0, 9.0]))


def test_banks_trim_each_slot_on_its_own():
    bank = taus(4, (2, 5, 4, 6))  # 2 inputs, 5 slots
    merged = merge_states([{"x.bank.A_NIR": bank[0]}, {"x.bank.A_NIR": bank[1]}], MergeOptions("ties", density=0.25))
    for slot in range(5):
        expected = merge_utils.ties([bank[0, slot], bank[1, slot]], torch.ones(2), 0.25)
        torch.testing.assert_close(merged["x.bank.A_NIR"][slot], expected)
