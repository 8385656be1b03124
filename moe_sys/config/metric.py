"""Config sections of the metric-learning pieces: the loss, the projector head and the sampler.

Pydantic only (no torch), so reading a config stays cheap. It lives with the other sections: imported
from moe_sys.metric it would meet a half-imported config package. ``LossSpec`` picks a loss by name
and checks its ``params`` against that loss's parameter model below; the defaults there are
pytorch-metric-learning 2.9's (PUMA's for CurricularFace) and a unit test keeps them equal to the
defaults of the functions in ``moe_sys.metric.losses`` / ``proxy_losses``.
"""
from __future__ import annotations

import difflib
from typing import Any, Dict, Literal, Optional, Type

from pydantic import BaseModel, Field, ValidationError, model_validator

from moe_sys.config.section import Section


class ContrastiveParams(Section):
    pos_margin: float = Field(0.0, description="positive pairs are pulled in to this distance")
    neg_margin: float = Field(1.0, description="negative pairs are pushed out to this distance")


class TripletParams(Section):
    margin: float = Field(0.05, description="required gap d_an - d_ap")
    mining: Literal["all", "batch_hard", "semi_hard"] = Field("all", description="which triplets (metric/miners.py)")
    miner_margin: float = Field(0.2, gt=0, description="semi_hard window: d_ap < d_an <= d_ap + miner_margin")


class NPairParams(Section):
    pass


class TemperatureParams(Section):
    temperature: float = Field(0.07, gt=0, description="softmax temperature t")


class SupConParams(Section):
    temperature: float = Field(0.1, gt=0, description="softmax temperature t")


class MultiSimilarityParams(Section):
    alpha: float = Field(2.0, gt=0, description="positive-pair sharpness")
    beta: float = Field(50.0, gt=0, description="negative-pair sharpness")
    base: float = Field(0.5, description="similarity offset lambda")


class ProxyAnchorParams(Section):
    margin: float = 0.1
    alpha: float = Field(32.0, gt=0, description="scale of the similarities")


class ArcFaceParams(Section):
    margin: float = Field(28.6, ge=0, lt=180, description="additive angular margin in DEGREES (as pml)")
    scale: float = Field(64.0, gt=0)


class CosFaceParams(Section):
    margin: float = Field(0.35, description="additive cosine margin")
    scale: float = Field(64.0, gt=0)


class CurricularFaceParams(Section):
    margin: float = Field(0.3, ge=0, lt=3.14159, description="additive angular margin in RADIANS (as PUMA)")
    scale: float = Field(32.0, gt=0)
    momentum: float = Field(0.99, ge=0, le=1, description="EMA momentum of each class's running t")


LOSS_PARAMS: Dict[str, Type[Section]] = {
    "contrastive": ContrastiveParams,
    "triplet": TripletParams,
    "npair": NPairParams,
    "ntxent": TemperatureParams,
    "infonce": TemperatureParams,
    "supcon": SupConParams,
    "multi_similarity": MultiSimilarityParams,
    "proxy_anchor": ProxyAnchorParams,
    "arcface": ArcFaceParams,
    "cosface": CosFaceParams,
    "curricularface": CurricularFaceParams,
}


def _closest(word: str, choices) -> str:
    match = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.5)
    return f"; did you mean {match[0]!r}?" if match else f"; valid: {', '.join(choices)}"


class LossSpec(Section):
    """The metric loss: ``name`` from the list below, ``params`` its hyper-parameters (defaults as pml)."""

    name: str = Field("curricularface", description=f"one of {', '.join(LOSS_PARAMS)}")
    params: Dict[str, Any] = Field(default_factory=dict, description="hyper-parameters of that loss")
    gather: bool = Field(True, description="compute the loss on the batch of every data-parallel rank "
                                           "(negatives from all ranks; docs/metric.md)")
    lr_mult: float = Field(1.0, gt=0, description="learning-rate multiplier of the loss's own proxies / class "
                                                   "weights (Proxy-Anchor's code, on which PUMA builds: 100)")

    @model_validator(mode="after")
    def _known(self):
        if self.name not in LOSS_PARAMS:
            raise ValueError(f"name: unknown loss {self.name!r}{_closest(self.name, LOSS_PARAMS)}")
        self.resolved()
        return self

    def resolved(self) -> BaseModel:
        """The validated parameter model of this loss (defaults filled in); ValueError naming a bad key."""
        model = LOSS_PARAMS[self.name]
        try:
            return model.model_validate(self.params)
        except ValidationError as e:
            err = e.errors()[0]
            key = ".".join(str(p) for p in err["loc"])
            if err["type"] == "extra_forbidden":
                raise ValueError(f"params.{key}: unknown parameter of loss {self.name!r}"
                                 f"{_closest(key, model.model_fields) if model.model_fields else '; it takes none'}"
                                 ) from None
            raise ValueError(f"params.{key}: {err['msg']} (got {err.get('input')!r})") from None


class ProjectorSpec(Section):
    """The head that maps the encoder's feature to the L2-normalised embedding."""

    kind: Literal["linear", "mlp"] = Field("linear", description="linear (PUMA) or MLP with ReLU (SimCLR)")
    dim: int = Field(128, gt=0, description="embedding width (PUMA: 128)")
    hidden: Optional[int] = Field(None, gt=0, description="MLP hidden width (default: the input width)")


class SamplerSpec(Section):
    """How training batches are drawn from labelled images of several domains (metric/samplers.py)."""

    m_per_class: int = Field(1, ge=1, description="images per class in a batch; 1: no class grouping (PUMA)")
    domains: Literal["union", "balanced", "temperature"] = Field(
        "union", description="union: every image equally likely (PUMA); balanced: every domain equally; "
                             "temperature: domain d with probability ~ n_d^(1/temperature)")
    temperature: float = Field(2.0, gt=0, description="for domains=temperature: 1 = union, large = balanced")
