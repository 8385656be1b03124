"""The ``task`` section: which kind of problem the one training loop runs (``moe_sys/tasks``)."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from moe_sys.config.section import Section
from moe_sys.config.metric import LossSpec, ProjectorSpec, SamplerSpec
from moe_sys.config.multitask import MultitaskConfig


class MetricTaskConfig(Section):
    """Metric learning over the image domains of ``data.domains`` (docs/metric.md); unused by lm."""

    loss: LossSpec = Field(default_factory=LossSpec)
    projector: ProjectorSpec = Field(default_factory=ProjectorSpec)
    sampler: SamplerSpec = Field(default_factory=SamplerSpec)
    glyph_seed: int = Field(0, description="seed of the embedded glyph renderer (part of its cache key)")
    eval_batch_size: int = Field(256, gt=0, description="images per forward pass in retrieval evaluation")
    freeze_encoder: bool = Field(False, description="train only the head and the loss's proxies (a linear probe); "
                                                    "adapters freeze the encoder anyway")


class TaskConfig(Section):
    type: Literal["lm", "metric", "multitask"] = Field(
        "lm", description="lm: next-token language modelling on data.domains; metric: a ViT (model.arch: vit) "
        "learns an embedding of the image domains in data.domains, evaluated by retrieval; multitask: a shared "
        "ViT with a decoder per dense task on the embedded glyph scenes (task.multitask)")
    metric: MetricTaskConfig = Field(default_factory=MetricTaskConfig)
    multitask: MultitaskConfig = Field(default_factory=MultitaskConfig)

    def routing_domains(self, data_domains) -> list:
        """Names of the ids batches carry in domain_ids: the tasks of a multitask run, else data.domains."""
        return list(self.multitask.tasks) if self.type == "multitask" else [d.name for d in data_domains]
