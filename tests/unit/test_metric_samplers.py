"""Metric samplers: distinct images per rank, m per class, domain proportions, resuming, errors."""
import numpy as np
import pytest

from moe_sys.metric.samplers import MetricBatchSampler, domain_weights


def _data(per_domain=((40, 10), (8, 6), (4, 5))):
    """(labels, domains): domain d has classes x images-per-class from ``per_domain``; ids are global."""
    labels, domains, next_label = [], [], 0
    for d, (classes, images) in enumerate(per_domain):
        for c in range(classes):
            labels += [next_label + c] * images
            domains += [d] * images
        next_label += classes
    rng = np.random.default_rng(0)
    order = rng.permutation(len(labels))  # images of a class are not stored together
    return np.array(labels)[order], np.array(domains)[order]


@pytest.mark.parametrize("m", [1, 4])
def test_ranks_get_distinct_images_that_make_up_the_global_batch(m):
    labels, domains = _data()
    ranks = [MetricBatchSampler(labels, domains, 8, m, dp_rank=r, dp_size=2, seed=3) for r in range(2)]
    for g in range(20):
        a, b = ranks[0].batch(g), ranks[1].batch(g)
        assert len(a) == len(b) == 8 and not set(a) & set(b)
        assert a + b == ranks[0].global_batch(g).tolist()
    assert ranks[0].batch(0) != ranks[0].batch(1)


def test_m_per_class_batches_hold_m_images_of_distinct_classes():
    labels, domains = _data()
    sampler = MetricBatchSampler(labels, domains, 12, 3, seed=1)
    for g in range(30):
        batch = sampler.batch(g)
        groups = [labels[batch[i:i + 3]] for i in range(0, 12, 3)]
        assert all(len(set(grp)) == 1 for grp in groups)  # m consecutive images of one class
        assert len(set(batch)) == 12  # distinct images


def _domain_shares(sampler, domains, batches=400):
    seen = np.concatenate([domains[sampler.batch(g)] for g in range(batches)])
    return np.bincount(seen, minlength=3) / len(seen)


@pytest.mark.parametrize("mode,temperature", [("union", 1.0), ("balanced", 1.0), ("temperature", 2.0)])
def test_domain_proportions(mode, temperature):
    labels, domains = _data()
    counts = np.bincount(domains)  # 400, 48, 20 images
    expected = {"union": counts / counts.sum(), "balanced": np.full(3, 1 / 3),
                "temperature": np.sqrt(counts) / np.sqrt(counts).sum()}[mode]
    np.testing.assert_allclose(domain_weights(counts, mode, temperature), expected)
    for m in (1, 2):
        sampler = MetricBatchSampler(labels, domains, 32, m, mode=mode, temperature=temperature, seed=5)
        np.testing.assert_allclose(_domain_shares(sampler, domains), expected, atol=0.025)


def test_union_draws_every_image_equally_often():
    labels, domains = _data()
    sampler = MetricBatchSampler(labels, domains, 16, 1, seed=2)
    hits = np.bincount(np.concatenate([sampler.batch(g) for g in range(600)]), minlength=len(labels))
    expected = 600 * 16 / len(labels)
    assert hits.std() < 0.35 * expected  # Poisson-like spread (~0.22); domain-balanced would give ~1.5


def test_resume_continues_the_exact_stream():
    labels, domains = _data()

    def make():
        return MetricBatchSampler(labels, domains, 8, 2, mode="balanced", dp_rank=1, dp_size=2, seed=7)

    straight = iter(make())
    batches = [next(straight) for _ in range(5)]
    stopped = make()
    stream = iter(stopped)
    assert [next(stream) for _ in range(3)] == batches[:3]
    assert stopped.state_dict() == {"consumed_samples": 3 * 16, "seed": 7}
    resumed = make()
    resumed.load_state_dict(stopped.state_dict())
    stream = iter(resumed)
    assert [next(stream), next(stream)] == batches[3:]
    with pytest.raises(ValueError, match="seed 7"):
        MetricBatchSampler(labels, domains, 8, 2, seed=8).load_state_dict(stopped.state_dict())


def test_a_class_with_fewer_than_m_images_is_named():
    labels, domains = _data(((3, 4), (2, 1)))
    with pytest.raises(ValueError) as err:
        MetricBatchSampler(labels, domains, 4, 2, domain_names=["greek", "braille"])
    assert str(err.value) == "class 3 of braille has 1 image(s), fewer than m_per_class=2"
    with pytest.raises(ValueError, match="not a multiple of m_per_class"):
        MetricBatchSampler(labels, domains, 5, 2)
    with pytest.raises(ValueError, match="no labelled images"):
        MetricBatchSampler([], [], 4, 1)
    with pytest.raises(ValueError, match="expected one of"):
        MetricBatchSampler(labels, domains, 4, 1, mode="uniform")
