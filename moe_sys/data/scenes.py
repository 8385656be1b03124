"""Embedded multitask data: scenes of 1-3 rendered glyphs over a smooth background, every target
computed from the rendering (no labelling, nothing downloaded).

A scene pastes glyph images of ``moe_sys/data/glyphs.py`` (white on black, 32x32, already augmented)
at random places of a ``size`` x ``size`` canvas, each in a random grey over a smooth random
background (bicubic upsampling of 4x4 noise); later glyphs lie on top of earlier ones. A glyph covers
the pixels where its rendering is >= 128. Targets (the tasks of VTAGML's NYUv2/Taskonomy protocols):

  S  segmentation: 1 + the domain of the glyph covering each pixel, 0 = background
  D  height: distance from each covered pixel's centre to the boundary of its glyph's visible region
     (exact Euclidean, the boundary half a pixel outside the border pixels), clipped at ``clip`` px and
     divided by it: 0 outside, 0.5/clip on the border, rising towards the middle of each stroke
  N  unit normals of the surface z = clip * D (pixel units, so a slope of one pixel per pixel tilts
     45 degrees): n ~ (-dz/dx, -dz/dy, 1), central differences; x to the right, y downwards
  E  Sobel gradient magnitude of the image (kernels / 8: an ideal step of height 1 gives 0.5), in [0, 1]
  G  the class (code point) and domain of the glyph with the most visible pixels; the visible glyph count

Splits follow the glyphs': train scenes use training glyphs (training fonts), test scenes the test
split (held-out font families and the other half of each domain's classes), so S, D, N, E and the
domain of the largest glyph measure generalisation to unseen fonts; its class is unseen at test.
``fonts`` picks other font groups for the two splits (glyphs.FontSplit), e.g. ("B", "B"): both in
the held-out families.

Cache: ``<cache root>/scenes/v<version>-<hash of the spec>/scenes.npz`` holds the image, S, D and G
(N and E are recomputed on load: cheap and deterministic). Built under a file lock, renamed into place.

Legend: N scenes, H=W=size pixels, K glyphs of one scene, h=w=32 glyph pixels.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from moe_sys.data import glyphs
from moe_sys.data.corpus import default_cache_root
from moe_sys.data.indexed import file_lock

SCENE_VERSION = 2  # 2: glyphs drawn domain-uniform (1 followed the glyph set's imbalance)
COVER = 128  # a glyph covers a pixel where its rendering is at least this bright


@dataclass
class Glyph:
    """One glyph placed in a scene: its rendering (uint8 [h, w]), top-left corner and labels."""

    image_hw: np.ndarray
    top: int
    left: int
    domain: int
    cls: int


@dataclass
class SceneSet:
    images_NHW: np.ndarray  # float32 in [0, 1]
    seg_NHW: np.ndarray  # int64, 0 = background, 1 + domain id
    height_NHW: np.ndarray  # float32 in [0, 1]
    normals_N3HW: np.ndarray  # float32 unit vectors (x, y, z)
    edges_NHW: np.ndarray  # float32 in [0, 1]
    largest_class_N: np.ndarray  # int64 code point
    largest_domain_N: np.ndarray  # int64 domain id
    count_N: np.ndarray  # int64 visible glyphs
    domains: List[str]


def squared_distance(outside_NHW: torch.Tensor) -> torch.Tensor:
    """Exact squared Euclidean distance of every pixel to the nearest ``outside`` pixel (separable:
    min over a column, then over a row, each as one broadcast min; inf when there is none)."""
    _, H, W = outside_NHW.shape
    f_NHW = torch.where(outside_NHW, 0.0, float("inf"))
    dy_HH = (torch.arange(H)[:, None] - torch.arange(H)[None, :]).float() ** 2
    g_NHW = (f_NHW[:, None, :, :] + dy_HH[None, :, :, None]).amin(2)  # [N, i, k, j] -> min over k
    dx_WW = (torch.arange(W)[:, None] - torch.arange(W)[None, :]).float() ** 2
    return (g_NHW[:, :, None, :] + dx_WW[None, None, :, :]).amin(3)  # [N, i, j, l] -> min over l


def height_field(instances_HW: torch.Tensor, clip: float) -> torch.Tensor:
    """D: per visible glyph region, the clipped distance of its pixels to the region's boundary / clip.
    Each region's transform runs on its bounding box plus one pixel, which holds the nearest outside
    pixel of every region pixel (a pixel beyond it has a closer one on the box's rim)."""
    height_HW = torch.zeros(instances_HW.shape)
    for i in instances_HW.unique().tolist():
        if i == 0:
            continue
        ys, xs = torch.nonzero(instances_HW == i, as_tuple=True)
        box = (slice(max(int(ys.min()) - 1, 0), int(ys.max()) + 2), slice(max(int(xs.min()) - 1, 0), int(xs.max()) + 2))
        inside_hw = instances_HW[box] == i
        dist_hw = squared_distance(~inside_hw[None])[0].sqrt() - 0.5  # boundary half a pixel outside the border
        height_HW[box] += dist_hw.clamp(max=clip) * inside_hw / clip
    return height_HW


def normals(height_NHW: torch.Tensor, clip: float) -> torch.Tensor:
    """N: unit normals [N, 3, H, W] of z = clip * D, central differences (one-sided at the edges)."""
    z_NHW = height_NHW * clip
    dz_dy, dz_dx = torch.gradient(z_NHW, dim=(1, 2))
    n_N3HW = torch.stack([-dz_dx, -dz_dy, torch.ones_like(z_NHW)], 1)
    return n_N3HW / n_N3HW.norm(dim=1, keepdim=True)


def sobel_edges(images_NHW: torch.Tensor) -> torch.Tensor:
    """E: |Sobel gradient| / 8 of images in [0, 1], replicate padding, clipped to [0, 1]."""
    kx_33 = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]) / 8
    k_2133 = torch.stack([kx_33, kx_33.T])[:, None]
    padded = F.pad(images_NHW[:, None], (1, 1, 1, 1), mode="replicate")
    g_N2HW = F.conv2d(padded, k_2133)
    return g_N2HW.norm(dim=1).clamp(max=1.0)


def compose(background_HW: np.ndarray, placed: Sequence[Glyph], colours: Sequence[float], clip: float) -> dict:
    """Paint the glyphs (in order, later on top) and compute the per-scene targets: image, S, D, G."""
    image_HW = torch.from_numpy(background_HW).float().clone()
    instances_HW = torch.zeros(image_HW.shape, dtype=torch.int64)
    seg_HW = torch.zeros(image_HW.shape, dtype=torch.int64)
    for k, (g, colour) in enumerate(zip(placed, colours), start=1):
        h, w = g.image_hw.shape
        window = (slice(g.top, g.top + h), slice(g.left, g.left + w))
        alpha_hw = torch.from_numpy(g.image_hw.astype(np.float32) / 255)
        image_HW[window] = image_HW[window] * (1 - alpha_hw) + colour * alpha_hw
        covered = torch.from_numpy(g.image_hw >= COVER)
        instances_HW[window][covered] = k
        seg_HW[window][covered] = 1 + g.domain
    visible_K = torch.bincount(instances_HW.flatten(), minlength=len(placed) + 1)[1:]
    largest = placed[int(visible_K.argmax())]
    return {"image": image_HW.clamp(0, 1), "seg": seg_HW, "height": height_field(instances_HW, clip),
            "largest_class": largest.cls, "largest_domain": largest.domain, "count": int((visible_K > 0).sum())}


def random_scene(source: glyphs.GlyphSet, size: int, max_glyphs: int, gen: torch.Generator
                 ) -> Tuple[np.ndarray, List[Glyph], List[float]]:
    """A smooth background, 1..max_glyphs glyphs at random places, their greys. Each glyph's domain is
    uniform over the domains, then its image uniform within the domain: the glyph set is imbalanced on
    purpose (the metric task's dominant domain), and S and G would otherwise learn only that domain."""
    noise = torch.rand(1, 1, 4, 4, generator=gen) * 0.5
    background_HW = F.interpolate(noise, size=(size, size), mode="bicubic", align_corners=True)[0, 0].clamp(0, 1)
    count = int(torch.randint(1, max_glyphs + 1, (1,), generator=gen))
    members = [np.flatnonzero(source.domains_N == d) for d in np.unique(source.domains_N)]
    domain_K = torch.randint(len(members), (count,), generator=gen).tolist()
    picks = [int(members[d][int(torch.randint(len(members[d]), (1,), generator=gen))]) for d in domain_K]
    span = size - glyphs.SIZE + 1
    corners = torch.randint(span, (count, 2), generator=gen).tolist()
    placed = [Glyph(source.images_NHW[i], top, left, int(source.domains_N[i]), int(source.classes_N[i]))
              for i, (top, left) in zip(picks, corners)]
    colours = (0.6 + 0.4 * torch.rand(count, generator=gen)).tolist()
    return background_HW.numpy(), placed, colours


def build(domains: Sequence[str], split: str, num: int, size: int, max_glyphs: int, clip: float, seed: int,
          cache_root: Optional[str], fonts: glyphs.FontSplit) -> dict:
    """Render ``num`` scenes of one split: arrays of the image, S, D and G."""
    source = glyphs.load_glyphs(domains, split, seed, cache_root, fonts)
    gen = torch.Generator().manual_seed(seed * 2 + (split == "test"))
    scenes = [compose(*random_scene(source, size, max_glyphs, gen), clip) for _ in range(num)]
    stack = {k: np.stack([s[k].numpy() for s in scenes]) for k in ("image", "seg", "height")}
    return {"image": (stack["image"] * 255).round().astype(np.uint8), "seg": stack["seg"].astype(np.uint8),
            "height": stack["height"].astype(np.float32),
            **{k: np.array([s[k] for s in scenes], np.int64) for k in ("largest_class", "largest_domain", "count")}}


def cache_file(spec: dict, cache_root: Optional[str]) -> Path:
    digest = hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:10]
    root = Path(cache_root) if cache_root is not None else default_cache_root()
    return root / "scenes" / f"v{SCENE_VERSION}-{digest}" / "scenes.npz"


def load_scenes(domains: Sequence[str], split: str, num: int, size: int = 64, max_glyphs: int = 3,
                clip: float = 4.0, seed: int = 0, cache_root: Optional[str] = None,
                fonts: glyphs.FontSplit = glyphs.DEFAULT_FONTS) -> SceneSet:
    """``num`` scenes of one split ("train" | "test") of the named glyph domains, built once and cached;
    ``fonts``: the font groups of the glyphs' (train, test) splits."""
    if size < glyphs.SIZE:
        raise ValueError(f"scene size {size} is smaller than a glyph ({glyphs.SIZE} px)")
    spec = {"domains": list(domains), "split": split, "num": num, "size": size, "max_glyphs": max_glyphs,
            "clip": clip, "seed": seed, "glyphs": str(glyphs.cache_dir(domains, seed, cache_root, fonts).name)}
    path = cache_file(spec, cache_root)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        with file_lock(path.parent.with_suffix(".lock")):
            if not path.exists():
                fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz")
                with os.fdopen(fd, "wb") as f:
                    np.savez(f, **build(domains, split, num, size, max_glyphs, clip, seed, cache_root, fonts))
                os.replace(tmp, path)
    return scene_set(dict(np.load(path)), clip, list(domains))


def scene_set(arrays: dict, clip: float, domains: List[str]) -> SceneSet:
    """The cached arrays plus the targets derived from them (N from D, E from the image)."""
    images_NHW = torch.from_numpy(arrays["image"]).float() / 255
    height_NHW = torch.from_numpy(arrays["height"])
    return SceneSet(images_NHW.numpy(), arrays["seg"].astype(np.int64), arrays["height"],
                    normals(height_NHW, clip).numpy(), sobel_edges(images_NHW).numpy(), arrays["largest_class"],
                    arrays["largest_domain"], arrays["count"], domains)
