"""`moe-sys embed RUN_DIR IMAGES --out FILE`: embeddings of a user's images by a trained metric run.

The run's resolved config rebuilds the encoder (+ its adapters) and the projector head; the weights
come from the run's latest checkpoint. IMAGES is a folder searched recursively for .png/.jpg files
(sorted paths); FILE is a .safetensors file with ``embeddings`` [N, D] (L2-normalised) and the
images' paths, relative to IMAGES, as a JSON list in the metadata key ``paths``.
"""
from __future__ import annotations

import json
import os
from typing import List

import numpy as np
import torch

from moe_sys.weights import io as weights_io
from moe_sys.adapters.inject import inject
from moe_sys.config import load_config
from moe_sys.data.images import EXTENSIONS, ImageDataError, ImageSet, read_image
from moe_sys.metric.projector import Projector
from moe_sys.models.vit import build_vit
from moe_sys.tasks.metric import MetricOutput, embed_images


class _Encoder(torch.nn.Module):
    """encoder + head under the names a metric run's checkpoint uses (the loss is not needed)."""

    def __init__(self, cfg):
        super().__init__()
        self.encoder = build_vit(cfg, len(cfg.data.domains))
        if cfg.adapters.modules or cfg.adapters.load_from:
            inject(self.encoder, cfg.adapters, [d.name for d in cfg.data.domains])
        p = cfg.task.metric.projector
        self.head = Projector(cfg.model.d_model, p.dim, p.kind, p.hidden)
        self.device = torch.device("cpu")

    def forward(self, images_BCHW, domain_ids_B):
        out = self.encoder(images_BCHW, domain_ids_B)
        return MetricOutput(self.head(out.features_BD), out.routings)


def image_files(root: str) -> List[str]:
    if not os.path.isdir(root):
        raise ImageDataError(f"{root}: no image folder")
    found = sorted(os.path.relpath(os.path.join(d, f), root) for d, _, files in os.walk(root) for f in files
                   if f.lower().endswith(EXTENSIONS))
    if not found:
        raise ImageDataError(f"{root}: no {'/'.join(EXTENSIONS)} images")
    return found


def embed(run_dir: str, images_dir: str, out: str, batch_size: int = 256) -> int:
    """Write the embeddings file; returns the number of images."""
    config_path = os.path.join(run_dir, "config.yaml")
    if not os.path.exists(config_path):
        raise ImageDataError(f"{run_dir}: no config.yaml (not a run directory)")
    cfg = load_config(config_path)
    if cfg.task.type != "metric":
        raise ImageDataError(f"{run_dir}: a {cfg.task.type!r} run; embed needs a metric run (task.type: metric)")
    model = _Encoder(cfg)
    state = weights_io.read_model_weights(run_dir)
    missing, _ = model.load_state_dict({k: v for k, v in state.items() if not k.startswith("criterion.")},
                                       strict=False)
    if missing:
        raise ImageDataError(f"{run_dir}: the checkpoint lacks {missing[:3]}")
    files = image_files(images_dir)
    v = cfg.model.vit
    images = np.stack([read_image(os.path.join(images_dir, f), v.image_size, v.in_channels) for f in files])
    zeros = np.zeros(len(files), np.int64)  # domain ids: unknown for a user's images; domain-routed adapters use 0
    model.eval()
    with torch.no_grad():
        emb_ND = embed_images(model, ImageSet(images, zeros, zeros, [d.name for d in cfg.data.domains]),
                              np.arange(len(files)), batch_size)
    weights_io.save_model_weights({"embeddings": emb_ND}, out, metadata={"paths": json.dumps(files),
                                                                          "run_dir": os.path.abspath(run_dir)})
    return len(files)
