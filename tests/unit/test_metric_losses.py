"""Metric losses and miners: each against a naive loop over its formula, and against
pytorch-metric-learning 2.9 (the library users compare with) on fresh random inputs."""
import math

import pytest
import torch
from pytorch_metric_learning import losses as pml_losses  # test-only dependency (the dev extra)
from pytorch_metric_learning import miners as pml_miners

from moe_sys.metric import losses as L
from moe_sys.metric import miners
from moe_sys.metric import proxy_losses as P
from moe_sys.metric.pairs import euclidean_BB

B, D, C = 14, 6, 5


def _batch(seed, classes=C):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (B,), generator=g)
    labels[:classes] = torch.arange(classes)  # every class present at least once
    labels[classes] = 0  # and at least one positive pair
    return torch.randn(B, D, generator=g, dtype=torch.float64), labels


def _unit(x):
    return [xi / xi.norm() for xi in x]


def _d(u, i, j):
    return float((u[i] - u[j]).norm())


def _s(u, i, j):
    return float(u[i] @ u[j])


def _pairs(y, same):
    return [(i, j) for i in range(len(y)) for j in range(len(y)) if i != j and (y[i] == y[j]) == same]


def _avg_nonzero(vals):
    nz = [v for v in vals if v > 0]
    return sum(nz) / len(nz) if nz else 0.0


def naive_contrastive(x, y, pos_margin=0.0, neg_margin=1.0):
    u = _unit(x)
    return (_avg_nonzero([max(_d(u, i, j) - pos_margin, 0) for i, j in _pairs(y, True)])
            + _avg_nonzero([max(neg_margin - _d(u, i, j), 0) for i, j in _pairs(y, False)]))


def naive_triplets(y):
    return [(a, p, n) for a, p in _pairs(y, True) for n in range(len(y)) if y[n] != y[a]]


def naive_triplet(x, y, margin=0.05, triplets=None):
    u = _unit(x)
    triplets = naive_triplets(y) if triplets is None else triplets
    return _avg_nonzero([max(_d(u, a, p) - _d(u, a, n) + margin, 0) for a, p, n in triplets])


def naive_npair(x, y):
    anchors, positives = [], []
    for label in sorted(set(y.tolist())):
        idx = [i for i in range(len(y)) if y[i] == label]
        if len(idx) >= 2:
            anchors.append(idx[0])
            positives.append(idx[1])
    u, total = _unit(x), 0.0
    for k, a in enumerate(anchors):
        logits = [_s(u, a, p) for p in positives]
        total += -logits[k] + math.log(sum(math.exp(v) for v in logits))
    return total / len(anchors)


def naive_ntxent(x, y, temperature=0.07):
    u = _unit(x)
    terms = []
    for i, p in _pairs(y, True):
        num = math.exp(_s(u, i, p) / temperature)
        den = num + sum(math.exp(_s(u, i, n) / temperature) for n in range(len(y)) if y[n] != y[i])
        terms.append(-math.log(num / den))
    return sum(terms) / len(terms)


def naive_supcon(x, y, temperature=0.1):
    u = _unit(x)
    per_anchor = []
    for i in range(len(y)):
        pos = [p for p in range(len(y)) if p != i and y[p] == y[i]]
        if not pos:
            per_anchor.append(0.0)
            continue
        den = sum(math.exp(_s(u, i, a) / temperature) for a in range(len(y)) if a != i)
        per_anchor.append(-sum(math.log(math.exp(_s(u, i, p) / temperature) / den) for p in pos) / len(pos))
    return _avg_nonzero(per_anchor)


def naive_ms(x, y, alpha=2.0, beta=50.0, base=0.5):
    u = _unit(x)
    total = 0.0
    for i in range(len(y)):
        pos = [math.exp(-alpha * (_s(u, i, p) - base)) for p in range(len(y)) if p != i and y[p] == y[i]]
        neg = [math.exp(beta * (_s(u, i, n) - base)) for n in range(len(y)) if y[n] != y[i]]
        total += math.log(1 + sum(pos)) / alpha + math.log(1 + sum(neg)) / beta
    return total / len(y)


def _cos_to(x, w):
    u, v = _unit(x), _unit(w)
    return [[float(ui @ vc) for vc in v] for ui in u]


def naive_proxy_anchor(x, y, proxies, margin=0.1, alpha=32.0):
    cos = _cos_to(x, proxies)
    present = sorted(set(y.tolist()))
    pos = sum(math.log(1 + sum(math.exp(-alpha * (cos[i][c] - margin)) for i in range(len(y)) if y[i] == c))
              for c in present)
    neg = sum(math.log(1 + sum(math.exp(alpha * (cos[i][c] + margin)) for i in range(len(y)) if y[i] != c))
              for c in range(len(proxies)))
    return pos / len(present) + neg / len(proxies)


def _ce(logits, target):
    return -logits[target] + math.log(sum(math.exp(v) for v in logits))


def _arc_target(c, m):
    theta = math.acos(c)
    return math.cos(theta + m) if theta <= math.pi - m else c - m * math.sin(m)


def naive_margin_softmax(x, y, w, scale, target_fn, negative_fn=lambda c, i, cy: c):
    cos = _cos_to(x, w)
    total = 0.0
    for i in range(len(y)):
        cy = target_fn(cos[i][y[i]])
        logits = [scale * (cy if c == y[i] else negative_fn(cos[i][c], i, cy)) for c in range(len(w))]
        total += _ce(logits, int(y[i]))
    return total / len(y)


def _check(ours, naive, x, y):
    assert abs(float(ours) - naive) <= 1e-9 * max(1.0, abs(naive)), (float(ours), naive)


@pytest.mark.parametrize("seed", [0, 1])
def test_pair_losses_match_naive_loops(seed):
    x, y = _batch(seed)
    _check(L.contrastive_loss(x, y), naive_contrastive(x, y), x, y)
    _check(L.contrastive_loss(x, y, 0.3, 0.8), naive_contrastive(x, y, 0.3, 0.8), x, y)
    _check(L.triplet_loss(x, y, margin=0.3), naive_triplet(x, y, 0.3), x, y)
    _check(L.npair_loss(x, y), naive_npair(x, y), x, y)
    _check(L.ntxent_loss(x, y, 0.5), naive_ntxent(x, y, 0.5), x, y)
    _check(L.supcon_loss(x, y, 0.3), naive_supcon(x, y, 0.3), x, y)
    _check(L.multi_similarity_loss(x, y, 2.0, 10.0, 0.5), naive_ms(x, y, 2.0, 10.0, 0.5), x, y)


@pytest.mark.parametrize("seed", [0, 1])
def test_proxy_losses_match_naive_loops(seed):
    x, y = _batch(seed)
    w = torch.randn(C, D, generator=torch.Generator().manual_seed(seed + 9), dtype=torch.float64)
    _check(P.proxy_anchor_loss(x, y, w, 0.1, 4.0), naive_proxy_anchor(x, y, w, 0.1, 4.0), x, y)
    m = math.radians(28.6)
    _check(P.arcface_loss(x, y, w, 28.6, 4.0), naive_margin_softmax(x, y, w, 4.0, lambda c: _arc_target(c, m)), x, y)
    _check(P.cosface_loss(x, y, w, 0.35, 4.0), naive_margin_softmax(x, y, w, 4.0, lambda c: c - 0.35), x, y)
    t = torch.rand(C, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    curricular = lambda c, i, cy: c if c <= cy else c * (float(t[y[i]]) + c)  # noqa: E731
    _check(P.curricularface_loss(x, y, w, t, 0.3, 4.0),
           naive_margin_softmax(x, y, w, 4.0, lambda c: _arc_target(c, 0.3), curricular), x, y)


def test_arcface_fall_back_keeps_the_target_logit_decreasing():
    cos = torch.linspace(-1, 1, 401, dtype=torch.float64)
    target = P.additive_angular_target(cos, math.radians(28.6))
    assert (target[1:] > target[:-1]).all()  # increasing in cos = decreasing in the angle


def test_curricularface_running_t_is_the_class_mean_cosine_ema():
    x, y = _batch(3)
    loss = P.CurricularFaceLoss(C, D, momentum=0.9).double()
    loss(x, y)
    cos = _cos_to(x, loss.weight.detach())
    for c in range(C):
        mean = sum(cos[i][c] for i in range(B) if y[i] == c) / int((y == c).sum())
        assert abs(float(loss.t[c]) - 0.1 * mean) < 1e-12
    before = loss.t.clone()
    loss.eval()(x, y)
    assert torch.equal(loss.t, before)  # evaluation leaves the state alone
    assert "t" in loss.state_dict()


def test_miners_pick_what_their_definition_says():
    x, y = _batch(4)
    d = euclidean_BB(x)
    a, p, n = miners.batch_hard(d, y)
    expected = []
    for i in range(B):
        pos = [j for j in range(B) if j != i and y[j] == y[i]]
        neg = [j for j in range(B) if y[j] != y[i]]
        if pos and neg:
            expected.append((i, max(pos, key=lambda j: float(d[i, j])), min(neg, key=lambda j: float(d[i, j]))))
    assert list(zip(a.tolist(), p.tolist(), n.tolist())) == expected
    for margin in (0.1, 0.5):
        got = set(zip(*(t.tolist() for t in miners.semi_hard(d, y, margin))))
        want = {(a, p, n) for a, p, n in naive_triplets(y) if 0 < float(d[a, n] - d[a, p]) <= margin}
        assert got == want and want  # a non-empty set, exactly the semi-hard window
    ours = L.triplet_loss(x, y, margin=0.3, mining="semi_hard", miner_margin=0.5)
    _check(ours, naive_triplet(x, y, 0.3, sorted(want)), x, y)


def test_empty_comparisons_give_a_zero_loss_with_a_gradient():
    x = torch.randn(4, D, requires_grad=True)
    same = torch.zeros(4, dtype=torch.long)
    distinct = torch.arange(4)
    for loss in (L.triplet_loss(x, same), L.triplet_loss(x, distinct), L.npair_loss(x, distinct),
                 L.ntxent_loss(x, same), L.supcon_loss(x, distinct)):
        assert float(loss.detach()) == 0.0
        loss.backward()


# ---------------------------------------------------------------- vs pytorch-metric-learning 2.9


def _pml_pair_cases():
    return [
        (lambda x, y: L.contrastive_loss(x, y), lambda: pml_losses.ContrastiveLoss(), None),
        (lambda x, y: L.triplet_loss(x, y), lambda: pml_losses.TripletMarginLoss(), None),
        (lambda x, y: L.triplet_loss(x, y, mining="batch_hard"), lambda: pml_losses.TripletMarginLoss(),
         lambda: pml_miners.BatchHardMiner()),
        (lambda x, y: L.triplet_loss(x, y, mining="semi_hard"), lambda: pml_losses.TripletMarginLoss(),
         lambda: pml_miners.TripletMarginMiner(type_of_triplets="semihard")),
        (lambda x, y: L.npair_loss(x, y), lambda: pml_losses.NPairsLoss(), None),
        (lambda x, y: L.ntxent_loss(x, y), lambda: pml_losses.NTXentLoss(), None),
        (lambda x, y: L.supcon_loss(x, y), lambda: pml_losses.SupConLoss(), None),
        (lambda x, y: L.multi_similarity_loss(x, y), lambda: pml_losses.MultiSimilarityLoss(), None),
    ]


def _value_and_grad(fn, x, y):
    x = x.clone().requires_grad_()
    loss = fn(x, y)
    loss.backward()
    return loss.detach(), x.grad


@pytest.mark.parametrize("case", range(8))
@pytest.mark.parametrize("seed", [0, 1])
def test_pair_losses_match_pml(case, seed):
    ours, theirs, miner = _pml_pair_cases()[case]
    x, y = _batch(seed + 10)
    x = x.float()
    ref_loss = theirs()
    ref_miner = miner() if miner else None
    ref = (lambda e, t: ref_loss(e, t, ref_miner(e, t))) if ref_miner else ref_loss
    v, g = _value_and_grad(ours, x, y)
    rv, rg = _value_and_grad(ref, x, y)
    assert float(rv) != 0.0
    torch.testing.assert_close(v, rv, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g, rg, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["proxy_anchor", "arcface", "cosface"])
def test_proxy_losses_match_pml(name):
    x, y = _batch(20)
    x = x.float()
    if name == "proxy_anchor":
        ours, ref = P.ProxyAnchorLoss(C, D), pml_losses.ProxyAnchorLoss(C, D)
        with torch.no_grad():
            ref.proxies.copy_(ours.proxies)
    else:
        ours = {"arcface": P.ArcFaceLoss, "cosface": P.CosFaceLoss}[name](C, D)
        ref = {"arcface": pml_losses.ArcFaceLoss, "cosface": pml_losses.CosFaceLoss}[name](C, D)
        with torch.no_grad():
            ref.W.copy_(ours.weight.T)
    v, g = _value_and_grad(ours, x, y)
    rv, rg = _value_and_grad(ref, x, y)
    torch.testing.assert_close(v, rv, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g, rg, rtol=1e-4, atol=1e-5)
    ours_w = next(ours.parameters()).grad
    ref_w = ref.proxies.grad if name == "proxy_anchor" else ref.W.grad.T
    torch.testing.assert_close(ours_w, ref_w, rtol=1e-4, atol=1e-5)
