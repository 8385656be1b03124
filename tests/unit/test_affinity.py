"""Task affinity: TAG's lookahead and gradient cosine equal a direct re-computation on a tiny model and
leave it (parameters, buffers, grads, optimizer, RNG) untouched; the running average resumes; TAG's
group selection finds the known best groups and equals a brute-force search."""
import copy
import itertools

import numpy as np
import pytest
import torch
import torch.nn as nn

from moe_sys.analysis.affinity import (AffinityAverage, group_scores, gradient_cosine_affinity,
                                       lookahead_affinity, measure_affinity, select_groups)

TASKS = 3
SHARED = ["trunk.0.weight", "trunk.0.bias", "trunk.1.weight", "trunk.1.bias"]


class TinyMultitask(nn.Module):
    """Shared trunk (linear, batch norm, dropout) and one head per task."""

    def __init__(self):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(5, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Dropout(0.3))
        self.heads = nn.ModuleList(nn.Linear(16, 1) for _ in range(TASKS))

    def losses(self, batch):
        x_BI, y_BT = batch
        h_BH = self.trunk(x_BI)
        return torch.stack([((head(h_BH)[:, 0] - y_BT[:, t]) ** 2).mean() for t, head in enumerate(self.heads)])


def setup(seed=0):
    torch.manual_seed(seed)
    model = TinyMultitask().train()
    g = torch.Generator().manual_seed(seed + 1)
    batch = torch.randn(32, 5, generator=g), torch.randn(32, TASKS, generator=g)
    return model, batch


def sgd_after_two_steps(model, batch, kind=torch.optim.SGD, **hyper):
    opt = kind(model.parameters(), lr=0.05, **hyper)
    for _ in range(2):
        opt.zero_grad()
        model.losses(batch).sum().backward()
        opt.step()
    return opt


def direct_lookahead(model, batch, lr, opt=None, seed=7):
    """Deep-copy, step the copy's shared parameters on task i (a real SGD step on a copied optimizer),
    evaluate every task; the same RNG seed before every forward."""
    rows = []
    for i in range(TASKS):
        twin = copy.deepcopy(model)
        torch.manual_seed(seed)
        before = twin.losses(batch)
        shared = [dict(twin.named_parameters())[n] for n in SHARED]
        grads = torch.autograd.grad(before[i], shared)
        if opt is None:
            with torch.no_grad():
                for p, g in zip(shared, grads):
                    p.sub_(lr * g)
        else:
            twin_opt = type(opt)(twin.parameters(), lr=lr)
            twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # else it steps opt's own buffers
            for group in twin_opt.param_groups:
                group["lr"] = lr
            twin_opt.zero_grad(set_to_none=True)
            for p, g in zip(shared, grads):
                p.grad = g
            twin_opt.step()
        torch.manual_seed(seed)
        with torch.no_grad():
            rows.append(1 - twin.losses(batch) / before.detach())
    return torch.stack(rows)


@pytest.mark.parametrize("hyper", [None, {"momentum": 0.9, "dampening": 0.1, "weight_decay": 0.01},
                                   {"momentum": 0.9, "nesterov": True},
                                   {"kind": torch.optim.AdamW, "weight_decay": 0.1, "betas": (0.8, 0.9)},
                                   {"kind": torch.optim.Adam, "weight_decay": 0.01, "amsgrad": True}])
def test_lookahead_equals_a_direct_recomputation(hyper):
    model, batch = setup()
    opt = sgd_after_two_steps(model, batch, **hyper) if hyper is not None else None
    torch.manual_seed(7)
    got = lookahead_affinity(model, SHARED, model.losses, batch, lr=0.1, optimizer=opt)
    expected = direct_lookahead(model, batch, 0.1, opt)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)
    assert not torch.allclose(got, got.T)  # asymmetric, as TAG's affinity is
    if hyper is not None:  # the optimizer's state matters: plain SGD gives another answer
        torch.manual_seed(7)
        assert not torch.allclose(got, lookahead_affinity(model, SHARED, model.losses, batch, lr=0.1), atol=1e-5)


def assert_same_state(state, expected):
    """Optimizer state dicts equal bit for bit (settings, every state tensor)."""
    assert state["param_groups"] == expected["param_groups"]
    assert state["state"].keys() == expected["state"].keys()
    for k, entries in expected["state"].items():
        assert all(torch.equal(state["state"][k][name], value) for name, value in entries.items())


@pytest.mark.parametrize("kind", [torch.optim.SGD, torch.optim.AdamW])
def test_measuring_leaves_the_model_optimizer_and_rng_untouched(kind):
    model, batch = setup()
    opt = sgd_after_two_steps(model, batch, kind, **({"momentum": 0.9} if kind is torch.optim.SGD else {}))
    model.losses(batch).sum().backward()  # grads present, as mid-step
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    opt_state = copy.deepcopy(opt.state_dict())
    rng = torch.get_rng_state()
    out = measure_affinity(model, SHARED, model.losses, batch, lr=0.1, optimizer=opt)
    assert set(out) == {"lookahead", "cosine", "losses"}
    assert all(torch.equal(p, params[n]) and torch.equal(p.grad, grads[n]) for n, p in model.named_parameters())
    assert all(torch.equal(b, buffers[n]) for n, b in model.named_buffers())
    assert_same_state(opt.state_dict(), opt_state)
    assert torch.equal(torch.get_rng_state(), rng)


def test_gradient_cosine_equals_a_direct_recomputation():
    model, batch = setup(3)
    torch.manual_seed(5)
    got = gradient_cosine_affinity(model, SHARED, model.losses, batch)
    flat = []
    for i in range(TASKS):
        twin = copy.deepcopy(model)
        torch.manual_seed(5)
        twin.losses(batch)[i].backward()
        flat.append(torch.cat([dict(twin.named_parameters())[n].grad.reshape(-1) for n in SHARED]))
    expected = torch.stack([torch.stack([torch.nn.functional.cosine_similarity(a, b, dim=0) for b in flat])
                            for a in flat])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_unknown_shared_parameter_is_named():
    model, batch = setup()
    with pytest.raises(ValueError, match="trunk.9.weight"):
        lookahead_affinity(model, ["trunk.9.weight"], model.losses, batch, lr=0.1)
    with pytest.raises(ValueError, match="object"):
        lookahead_affinity(model, SHARED, model.losses, batch, lr=0.1, optimizer=object())


def test_running_average_resumes_exactly():
    g = torch.Generator().manual_seed(0)
    ms = [torch.randn(3, 3, generator=g) for _ in range(5)]
    full = AffinityAverage(["s", "d", "n"])
    first = AffinityAverage(["s", "d", "n"])
    for m in ms:
        full.update({"lookahead": m})
    for m in ms[:2]:
        first.update({"lookahead": m})
    resumed = AffinityAverage(["s", "d", "n"])
    resumed.load_state_dict(first.state_dict())
    for m in ms[2:]:
        resumed.update({"lookahead": m})
    assert torch.equal(resumed.mean("lookahead"), full.mean("lookahead"))
    torch.testing.assert_close(full.mean("lookahead"), torch.stack(ms).double().mean(0))
    with pytest.raises(ValueError, match="tasks"):
        AffinityAverage(["s", "d"]).load_state_dict(first.state_dict())


def test_grouping_picks_the_known_best_groups():
    # Z[s, t]: affinity of s onto t. 0 and 1 hurt each other, 2 helps both and is helped most by 1.
    z = torch.tensor([[0.0, -1.0, 1.0], [-1.0, 0.0, 1.5], [1.0, 2.0, 0.0]])
    two = select_groups(z, 2)
    assert two.groups == ((0, 2), (1, 2)) and two.assignment == (0, 1, 1)
    assert two.score == pytest.approx((1.0 + 2.0 + 1.5) / 3)
    one = select_groups(z, 1)  # one group must hold everyone; singletons score -1e6 as in TAG
    assert one.groups == ((0, 1, 2),) and one.score == pytest.approx((0.0 + 0.5 + 1.25) / 3)
    blocks = -torch.ones(4, 4)
    blocks[:2, :2] = blocks[2:, 2:] = 1.0
    assert select_groups(blocks, 2).groups == ((0, 1), (2, 3))
    assert select_groups(blocks, 3).groups == ((0, 1), (2, 3))  # a third group adds nothing


def brute_force(z_NN, k):
    """TAG's select_groups without pruning: every choice of <= k groups, strict improvement."""
    groups, score_CN = group_scores(z_NN)
    best, best_choice = -np.inf, None
    for size in range(1, k + 1):
        for choice in itertools.combinations(range(len(groups)), size):
            per_task = score_CN[list(choice)].max(0)
            if np.isfinite(per_task).all() and per_task.mean() > best:
                best, best_choice = per_task.mean(), choice
    return best, tuple(groups[c] for c in best_choice)


@pytest.mark.parametrize("n, k", [(4, 2), (5, 3), (6, 3)])
def test_grouping_equals_brute_force(n, k):
    z = np.random.default_rng(n * 10 + k).normal(size=(n, n))
    best, groups = brute_force(z, k)
    got = select_groups(torch.tensor(z), k)
    assert got.score == pytest.approx(best) and set(got.groups) == set(groups)


def test_grouping_rejects_bad_input():
    for z, k in ((torch.zeros(2, 3), 1), (torch.zeros(13, 13), 2), (torch.zeros(3, 3), 0)):
        with pytest.raises(ValueError, match="square affinity"):
            select_groups(z, k)
