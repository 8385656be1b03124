"""Metric learning: a ViT encoder + projector head learns one embedding for several image domains
(PUMA's unified metric learning), trained with a loss of ``moe_sys.metric`` and evaluated by
retrieval on the class-disjoint test split (``moe_sys.eval.retrieval``).

Legend: B images per rank, C channels, H, W pixels, F encoder width, D embedding width, N images.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from moe_sys.adapters.io import base_state
from moe_sys.weights import io as weights_io
from moe_sys.weights.vit import fit_positions
from moe_sys.analysis.retrieval_plot import SAMPLE_FILE
from moe_sys.data.images import ImageSet, load_domains
from moe_sys.eval.retrieval import nearest, retrieval_metrics
from moe_sys.metric.distributed import all_gather_rows
from moe_sys.metric.projector import Projector
from moe_sys.metric.registry import build_loss
from moe_sys.metric.samplers import MetricBatchSampler
from moe_sys.models.vit import build_vit
from moe_sys.moe.routing import RouterOutput
from moe_sys.tasks.base import Task
from moe_sys.train.distributed import to_device

SAMPLE_QUERIES, SAMPLE_NEIGHBOURS = 8, 5


@dataclass
class MetricOutput:
    emb_BD: torch.Tensor  # L2-normalised
    routings: List[RouterOutput]
    losses: Dict[str, torch.Tensor] = field(default_factory=dict)  # the encoder's extra weighted losses


class MetricModel(nn.Module):
    """encoder (ViT) -> head (projector); ``criterion`` holds the loss's own parameters (proxies), so the
    engine trains and checkpoints them with the rest."""

    def __init__(self, encoder: nn.Module, head: nn.Module, criterion: nn.Module):
        super().__init__()
        self.encoder, self.head, self.criterion = encoder, head, criterion

    def forward(self, images_BCHW: torch.Tensor, domain_ids_B: torch.Tensor) -> MetricOutput:
        out = self.encoder(images_BCHW, domain_ids_B)
        return MetricOutput(self.head(out.features_BD), out.routings, out.losses)


def to_float(images_NCHW: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> [-1, 1] (what timm's ViTs expect with mean = std = 0.5)."""
    return images_NCHW.float() / 127.5 - 1.0


class ImageStream:
    """Endless training batches {images, labels, domain_ids}; the state is the sampler's position."""

    def __init__(self, images: ImageSet, sampler: MetricBatchSampler):
        self.images, self.sampler = images, sampler
        self._batches = iter(sampler)

    def __iter__(self):
        return self

    def __next__(self) -> Dict[str, torch.Tensor]:
        idx = np.asarray(next(self._batches))
        return {"images": to_float(torch.from_numpy(self.images.images_NCHW[idx])),
                "labels": torch.from_numpy(self.images.labels_N[idx]),
                "domain_ids": torch.from_numpy(self.images.domains_N[idx])}

    def state_dict(self) -> Dict[str, int]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: Dict[str, int]) -> None:
        self.sampler.load_state_dict(state)


class MetricTask(Task):
    throughput_key, throughput_label = "images_per_s", "img/s"
    progress_keys = {"unified_R@1": "R@1"}

    def __init__(self, cfg):
        super().__init__(cfg)
        self.spec = cfg.task.metric
        self.train_set, self.test_set = load_splits(cfg)

    @classmethod
    def check_inputs(cls, cfg) -> None:
        """Read (and, for glyphs, build and cache) both splits once, so ranks start from a warm cache."""
        load_splits(cfg)

    def build_model(self):
        cfg = self.cfg
        encoder = build_vit(cfg, num_domains=len(cfg.data.domains))
        if cfg.train.init_from:
            load_encoder_weights(encoder, cfg.train.init_from)
        encoder.requires_grad_(not self.spec.freeze_encoder)
        p = self.spec.projector
        head = Projector(cfg.model.d_model, p.dim, p.kind, p.hidden)
        criterion = build_loss(self.spec.loss, self.train_set.num_classes, p.dim)
        self.model = MetricModel(encoder, head, criterion)  # the engine wraps this very module
        return self.model

    def adapter_root(self, model):
        return model.encoder

    def lr_mults(self):
        return {"criterion.": self.spec.loss.lr_mult}  # proxies / class weights (a no-op for pair losses)

    def build_feeds(self, rank, world):
        s, t = self.spec.sampler, self.cfg.train
        sampler = MetricBatchSampler(self.train_set.labels_N, self.train_set.domains_N, t.micro_batch_size,
                                     s.m_per_class, s.domains, s.temperature, rank, world, self.cfg.data.seed,
                                     domain_names=self.train_set.domain_names)
        return ImageStream(self.train_set, sampler), lambda: iter(())

    def forward(self, model, batch):
        return model(batch["images"], batch["domain_ids"])

    def loss(self, out, batch):
        parts = {"metric": self.model.criterion(out.emb_BD, batch["labels"]), **out.losses}
        return sum(parts.values()), parts

    def units(self, batch):
        return batch["images"].shape[0]

    @torch.no_grad()
    def evaluate(self, model, batches) -> Dict[str, Any]:
        """Retrieval on the test split: every rank embeds its share, the metrics see all of them."""
        rank, world = dist.get_rank(), dist.get_world_size()
        mine = np.arange(len(self.test_set.labels_N))[rank::world]
        emb_ND = embed_images(model, self.test_set, mine, self.spec.eval_batch_size)
        ts = self.test_set
        labels_N, domains_N = (torch.from_numpy(a[mine]).to(model.device) for a in (ts.labels_N, ts.domains_N))
        metrics = retrieval_metrics(emb_ND, labels_N, domains_N, ts.domain_names)
        order_N = np.concatenate([np.arange(len(ts.labels_N))[r::world] for r in range(world)])
        all_ND = all_gather_rows(emb_ND)
        if rank == 0:
            save_sample(os.path.join(self.cfg.logging.run_dir, SAMPLE_FILE), all_ND, ts, order_N)
        return {"unified_R@1": metrics["unified/R@1"], "retrieval": metrics}


def load_splits(cfg):
    """(train, test) ImageSets of data.domains at the ViT's image size and channels."""
    v, spec = cfg.model.vit, cfg.task.metric
    load = dict(image_size=v.image_size, channels=v.in_channels, cache_dir=cfg.data.cache_dir, seed=spec.glyph_seed)
    return (load_domains(cfg.data.domains, "train", m_per_class=spec.sampler.m_per_class, **load),
            load_domains(cfg.data.domains, "test", **load))


def embed_images(model, images: ImageSet, idx_N: np.ndarray, batch_size: int) -> torch.Tensor:
    """[len(idx_N), D] embeddings of the chosen images (model in eval mode, the caller's job)."""
    out = []
    for start in range(0, len(idx_N), batch_size):
        idx = idx_N[start:start + batch_size]
        batch = to_device({"images": to_float(torch.from_numpy(images.images_NCHW[idx])),
                           "domain_ids": torch.from_numpy(images.domains_N[idx])}, model.device)
        out.append(model(batch["images"], batch["domain_ids"]).emb_BD.float())
    return torch.cat(out) if out else torch.zeros(0, 1)


def save_sample(path: str, emb_ND: torch.Tensor, images: ImageSet, order_N: np.ndarray) -> None:
    """A fixed spread of queries, their 5 nearest gallery images and whether each matches."""
    picks = np.linspace(0, len(order_N) - 1, SAMPLE_QUERIES).astype(int)
    nn_QK = nearest(emb_ND, SAMPLE_NEIGHBOURS)[picks].cpu().numpy()
    q, n = order_N[picks], order_N[nn_QK]
    same = (images.labels_N[n] == images.labels_N[q][:, None]) & (images.domains_N[n] == images.domains_N[q][:, None])
    np.savez(path, queries=images.images_NCHW[q], neighbours=images.images_NCHW[n], match=same,
             query_domains=np.asarray(images.domain_names)[images.domains_N[q]])


def load_encoder_weights(encoder: nn.Module, path: str, state: Optional[Dict[str, torch.Tensor]] = None) -> None:
    """The encoder of a metric or multitask run (its ``encoder.*`` weights; the heads and losses stay
    behind; of a run with adapters, the base encoder's: the adapters load from its adapters/ dir), or a
    whole-encoder .safetensors file; positions are resampled to this image size. ``state``: the
    weights at ``path``, already read."""
    state = weights_io.read_model_weights(path) if state is None else state
    if any(k.startswith("encoder.") for k in state):
        state = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
    state = base_state(state)
    state = fit_positions(state, encoder)  # an encoder trained on another image size
    missing, unexpected = encoder.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not fit the encoder: missing {missing[:4]}, unexpected {unexpected[:4]}")
