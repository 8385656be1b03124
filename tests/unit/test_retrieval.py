"""Retrieval metrics: hand-computed cases with ties, self-matches and lone queries; a brute-force
ranking on tied random data (chunked); per-domain and harmonic mean; pml's AccuracyCalculator."""
import math

import pytest
import torch

from moe_sys.eval.retrieval import nearest, retrieval_metrics, scope_metrics

# Five unit vectors: 0, 1, 2 coincide (ties at 1, and with the query itself), 3 is orthogonal to
# all (ties at 0 everywhere), 4 is opposite to 0-2.
TIED = torch.tensor([[1.0, 0], [1, 0], [1, 0], [0, 1], [-1, 0]])
TIED_LABELS = torch.tensor([0, 1, 0, 0, 1])


def test_hand_computed_case_with_ties_and_self_matches():
    # rankings (ties to the lower index, self excluded): q0 [1,2,3,4] q1 [0,2,3,4] q2 [0,1,3,4]
    # q3 [0,1,2,4] q4 [3,0,1,2]; R = 2,1,2,2,1
    assert nearest(TIED, 4, chunk=2).tolist() == [[1, 2, 3, 4], [0, 2, 3, 4], [0, 1, 3, 4], [0, 1, 2, 4],
                                                  [3, 0, 1, 2]]
    assert nearest(TIED, 1).flatten().tolist() == [1, 0, 0, 0, 3]  # ties straddling the k-th place
    got = scope_metrics(TIED, TIED_LABELS)
    want = {"R@1": 2 / 5, "R@2": 3 / 5, "R@4": 1.0, "R@8": 1.0,  # R@8 is capped at the 4 other images
            "RP": (0.5 + 0 + 0.5 + 0.5 + 0) / 5,
            "MAP@R": (0.5 * 0.5 + 0 + 0.5 * 1 + 0.5 * 1 + 0) / 5}
    assert got.keys() == want.keys()
    for key in want:
        assert math.isclose(got[key], want[key], abs_tol=1e-7), key


def test_lone_queries_are_left_out():
    emb = torch.tensor([[1.0, 0], [0.8, 0.6], [0, 1]])
    got = scope_metrics(emb, torch.tensor([0, 0, 5]))  # query 2 has no other image of its class
    assert got["R@1"] == 1.0 and got["MAP@R"] == 1.0
    assert scope_metrics(emb, torch.tensor([0, 1, 2]))["R@1"] == 0.0  # no query has a match


def _brute_force(emb, cls, ks):
    x = torch.nn.functional.normalize(emb, dim=1)
    sims = (x @ x.T).tolist()
    per = {f"R@{k}": [] for k in ks} | {"RP": [], "MAP@R": []}
    for q in range(len(cls)):
        order = sorted((j for j in range(len(cls)) if j != q), key=lambda j: (-sims[q][j], j))
        match = [int(cls[j] == cls[q]) for j in order]
        R = sum(match)
        if R == 0:
            continue
        for k in ks:
            per[f"R@{k}"].append(float(any(match[:k])))
        per["RP"].append(sum(match[:R]) / R)
        per["MAP@R"].append(sum(sum(match[:i + 1]) / (i + 1) * match[i] for i in range(R)) / R)
    return {k: sum(v) / len(v) for k, v in per.items()}


@pytest.mark.parametrize("seed", [0, 1])
def test_chunked_knn_matches_a_brute_force_ranking_on_tied_data(seed):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randint(-1, 2, (60, 3), generator=g).float()  # few distinct directions: many ties
    emb[emb.abs().sum(1) == 0] = 1.0
    cls = torch.randint(0, 6, (60,), generator=g)
    got = scope_metrics(emb, cls, chunk=7)
    want = _brute_force(emb, cls, (1, 2, 4, 8))
    for key in want:
        assert math.isclose(got[key], want[key], abs_tol=1e-6), key


def test_domains_unified_per_domain_and_harmonic_mean():
    g = torch.Generator().manual_seed(3)
    emb = torch.randn(40, 4, generator=g)
    labels = torch.randint(0, 4, (40,), generator=g)  # the same label ids in both domains
    domains = (torch.arange(40) >= 24).long()
    out = retrieval_metrics(emb, labels, domains, domain_names=["cyrillic", "braille"], chunk=16)
    cls = labels + 10 * domains  # images of different domains never match
    for key, value in scope_metrics(emb, cls).items():
        assert math.isclose(out[f"unified/{key}"], value, abs_tol=1e-7)
    a = scope_metrics(emb[:24], labels[:24])
    b = scope_metrics(emb[24:], labels[24:])
    for key in a:
        assert math.isclose(out[f"domain/cyrillic/{key}"], a[key], abs_tol=1e-12)
        assert math.isclose(out[f"domain/braille/{key}"], b[key], abs_tol=1e-12)
        assert math.isclose(out[f"hmean/{key}"], 2 / (1 / a[key] + 1 / b[key]), rel_tol=1e-9)
    assert all(isinstance(v, float) for v in out.values())


def test_matches_pml_accuracy_calculator():
    from pytorch_metric_learning.distances import CosineSimilarity
    from pytorch_metric_learning.utils import accuracy_calculator
    from pytorch_metric_learning.utils.inference import CustomKNN

    g = torch.Generator().manual_seed(4)
    emb = torch.randn(80, 8, generator=g)
    labels = torch.randint(0, 7, (80,), generator=g)
    calc = accuracy_calculator.AccuracyCalculator(include=("precision_at_1", "r_precision", "mean_average_precision_at_r"),
                                       knn_func=CustomKNN(CosineSimilarity()), device=torch.device("cpu"))
    ref = calc.get_accuracy(emb, labels)
    ours = scope_metrics(emb, labels)
    assert math.isclose(ours["R@1"], ref["precision_at_1"], abs_tol=1e-6)
    assert math.isclose(ours["RP"], ref["r_precision"], abs_tol=1e-6)
    assert math.isclose(ours["MAP@R"], ref["mean_average_precision_at_r"], abs_tol=1e-6)
