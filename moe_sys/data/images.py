"""Labelled images of several domains for metric learning: embedded glyphs or the user's folders.

A domain in ``data.domains`` without a ``path`` is an embedded glyph block (``moe_sys/data/glyphs.py``,
named like its key in ``glyphs.BLOCKS``); one with a ``path`` is a folder with one sub-folder per class
(ImageFolder layout: ``PATH/<class>/*.png|jpg``). Folders are split as the glyphs are (and as PUMA's
datasets): the first half of the classes in sorted order trains, the second half tests.

Labels are (domain, class) pairs made into one id: ``labels_N`` counts the split's classes from 0 in
domain order, so proxy losses get contiguous ids and a class never spans two domains.

Legend: N images, C channels, H, W pixels.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np

from moe_sys.data import glyphs

EXTENSIONS = (".png", ".jpg", ".jpeg")


class ImageDataError(ValueError):
    """Bad image input, worded as one line naming the file or folder."""


@dataclass
class ImageSet:
    images_NCHW: np.ndarray  # uint8
    labels_N: np.ndarray  # int64, contiguous from 0
    domains_N: np.ndarray  # int64 index into domain_names
    domain_names: List[str]

    @property
    def num_classes(self) -> int:
        return int(self.labels_N.max()) + 1 if len(self.labels_N) else 0


def load_domains(domains, split: str, image_size: int, channels: int, cache_dir: Optional[str] = None,
                 seed: int = 0, m_per_class: int = 1) -> ImageSet:
    """One split ("train" | "test") of every domain (``DomainConfig`` items), images C x H x W uint8.

    Raises ImageDataError for a missing folder, an empty class, an image of the wrong size and (train
    split) a class with fewer than ``m_per_class`` images.
    """
    names = [d.name for d in domains]
    embedded = [d.name for d in domains if d.path is None]
    glyph_set = glyphs.load_glyphs(embedded, split, seed, cache_dir) if embedded else None
    images, labels, domain_ids = [], [], []
    for i, d in enumerate(domains):
        if d.path is None:
            keep = glyph_set.domains_N == embedded.index(d.name)
            x_NHW, cls_N = glyph_set.images_NHW[keep], glyph_set.classes_N[keep]
            x_NCHW = _fit(x_NHW[:, None], f"glyph domain {d.name!r}", image_size, channels)
        else:
            x_NCHW, cls_N = read_folder(d.path, split, image_size, channels, m_per_class if split == "train" else 1)
        images.append(x_NCHW)
        labels.append(np.unique(cls_N, return_inverse=True)[1].reshape(-1) + sum(len(np.unique(c)) for c in labels))
        domain_ids.append(np.full(len(cls_N), i, np.int64))
    return ImageSet(np.concatenate(images), np.concatenate(labels).astype(np.int64), np.concatenate(domain_ids), names)


def read_folder(root: str, split: str, image_size: int, channels: int, m_per_class: int = 1
                ) -> Tuple[np.ndarray, np.ndarray]:
    """The split's images of an ImageFolder directory: (uint8 [N, C, H, W], class index [N])."""
    if not os.path.isdir(root):
        raise ImageDataError(f"{root}: no image folder (expected one sub-folder of images per class)")
    classes = sorted(c for c in os.listdir(root) if os.path.isdir(os.path.join(root, c)))
    if len(classes) < 2:
        raise ImageDataError(f"{root}: {len(classes)} class folder(s); the class-disjoint split needs at least 2")
    half = len(classes) // 2
    chosen = classes[:half] if split == "train" else classes[half:]
    images, labels = [], []
    for k, name in enumerate(chosen):
        folder = os.path.join(root, name)
        files = sorted(f for f in os.listdir(folder) if f.lower().endswith(EXTENSIONS))
        if not files:
            raise ImageDataError(f"{folder}: empty class (no {'/'.join(EXTENSIONS)} images)")
        if len(files) < m_per_class:
            raise ImageDataError(f"{folder}: {len(files)} image(s), fewer than "
                                 f"task.metric.sampler.m_per_class={m_per_class}")
        images += [read_image(os.path.join(folder, f), image_size, channels) for f in files]
        labels += [k] * len(files)
    return np.stack(images), np.asarray(labels, np.int64)


def read_image(path: str, image_size: int, channels: int) -> np.ndarray:
    """uint8 [C, H, W]: grey from colour by the channel mean, colour from grey by repetition."""
    import matplotlib.image

    try:
        x = np.asarray(matplotlib.image.imread(path))
    except Exception as e:  # PIL/libpng raise many kinds; the user needs the file name and the reason
        raise ImageDataError(f"{path}: cannot read the image ({e})") from None
    if x.dtype != np.uint8:  # PNGs come as floats in [0, 1]
        x = (np.clip(x, 0, 1) * 255).round().astype(np.uint8)
    x_HWC = x[:, :, None] if x.ndim == 2 else x[:, :, :3]
    return _fit(x_HWC.transpose(2, 0, 1)[None], path, image_size, channels)[0]


def _fit(x_NCHW: np.ndarray, where: str, image_size: int, channels: int) -> np.ndarray:
    """Check the size, convert the channels."""
    h, w = x_NCHW.shape[2:]
    if (h, w) != (image_size, image_size):
        raise ImageDataError(f"{where}: images are {h}x{w} pixels, the model takes {image_size}x{image_size} "
                             "(model.vit.image_size, a multiple of model.vit.patch_size)")
    if x_NCHW.shape[1] == channels:
        return x_NCHW
    if channels == 1:
        return x_NCHW.mean(1, keepdims=True).round().astype(np.uint8)
    return np.repeat(x_NCHW[:, :1], channels, axis=1)


def domain_counts(images: ImageSet) -> Sequence[int]:
    return np.bincount(images.domains_N, minlength=len(images.domain_names)).tolist()
