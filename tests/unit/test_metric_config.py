"""The loss config: names and parameters checked with a 'did you mean', defaults equal to the
loss functions' own (pml 2.9's), every name builds, stateful losses checkpoint their state."""
import inspect

import pytest
import torch
from pydantic import ValidationError

from moe_sys.config.metric import LOSS_PARAMS, LossSpec, ProjectorSpec
from moe_sys.metric.projector import Projector
from moe_sys.metric.registry import LOSSES, build_loss


def _defaults(target):
    skip = {"emb_BD", "labels_B", "num_classes", "embedding_size", "self"}
    params = inspect.signature(target).parameters.values()
    return {p.name: p.default for p in params if p.name not in skip}


@pytest.mark.parametrize("name", sorted(LOSS_PARAMS))
def test_config_defaults_are_the_loss_defaults(name):
    assert LOSSES.keys() == LOSS_PARAMS.keys()
    assert LOSS_PARAMS[name]().model_dump() == _defaults(LOSSES[name])


def _error(**kw):
    with pytest.raises(ValidationError) as err:
        LossSpec(**kw)
    return err.value.errors()[0]["msg"]


def test_bad_names_and_parameters_are_named():
    assert "name: unknown loss 'tripplet'; did you mean 'triplet'?" in _error(name="tripplet")
    assert "params.margn: unknown parameter of loss 'triplet'; did you mean 'margin'?" in _error(
        name="triplet", params={"margn": 0.1})
    assert "params.temperature: Input should be greater than 0 (got -1)" in _error(
        name="supcon", params={"temperature": -1})
    assert "unknown parameter of loss 'npair'; it takes none" in _error(name="npair", params={"scale": 1})
    assert "params.mining" in _error(name="triplet", params={"mining": "hardest"})


def test_every_loss_builds_runs_and_keeps_its_state_in_the_state_dict():
    emb = torch.randn(10, 8, requires_grad=True)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 0, 1])
    for name in LOSSES:
        loss = build_loss(LossSpec(name=name, params={}), num_classes=4, embedding_size=8)
        value = loss(emb, labels)
        assert value.ndim == 0 and torch.isfinite(value)
        value.backward()
    state = build_loss(LossSpec(name="curricularface"), 4, 8).state_dict()
    assert set(state) == {"loss.weight", "loss.t"}


def test_projector_is_l2_normalised():
    x = torch.randn(5, 12)
    for spec in (ProjectorSpec(), ProjectorSpec(kind="mlp", dim=16, hidden=32)):
        out = Projector(12, spec.dim, spec.kind, spec.hidden)(x)
        assert out.shape == (5, spec.dim)
        torch.testing.assert_close(out.norm(dim=1), torch.ones(5))


@pytest.mark.parametrize("name", ["ntxent", "arcface", "curricularface"])
def test_bf16_embeddings_and_class_vectors_are_computed_in_fp32(name):
    emb = torch.randn(10, 8).bfloat16()
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 0, 1])
    low = build_loss(LossSpec(name=name), 4, 8).bfloat16()
    high = build_loss(LossSpec(name=name), 4, 8)
    high.load_state_dict({k: v.float() for k, v in low.state_dict().items()})
    value = low(emb, labels)
    assert value.dtype == torch.float32
    assert torch.equal(value, high(emb.float(), labels))
