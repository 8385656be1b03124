"""Embedded image data, never downloaded: glyphs rendered with the fonts matplotlib ships.

A *domain* is a Unicode block, a *class* is a code point, an *instance* is a font plus an
augmentation (size, rotation, shift, noise). Like PUMA's datasets the split is class-disjoint: the
first half of each domain's classes (in code-point order) trains, the second half tests. Fonts form
two groups: A, the training families, and B, the held-out families ``TEST_FAMILIES``; by default
training images are rendered with fonts A and test images with fonts B only (``FontSplit``, e.g.
("B", "B") for both splits in the held-out families: the zero-shot task transfer of
docs/multitask.md). A class is kept only if it has a glyph in at least one font of each group, so
every split is made of real renderings.

``BLOCKS`` holds the 8 domains of the unified-metric benchmark (Cyrillic dominates: ~60% of the
training images, as SOP dominates PUMA's union) and a disjoint pool for pre-training a backbone.

Cache: ``<cache root>/glyphs/v<version>-<hash of the spec, seed, matplotlib version>/`` holds
``images.npy`` (uint8 [N, 32, 32], white glyph on black) and ``index.json`` (per image: domain, class
code point, split, and the font file of its rendering). Built under a file lock into a temp dir, renamed into place when complete.

Legend: N images, H=W=32 pixels.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from moe_sys.data.corpus import default_cache_root
from moe_sys.data.indexed import file_lock

GLYPH_VERSION = 1
SIZE = 32
TEST_FAMILIES = ("DejaVuSerif", "STIXNonUni", "cm")  # font group B, held-out families: test images by default
FONT_GROUPS = ("A", "B")  # A: every other shipped font (training images by default)
FontSplit = Tuple[str, str]  # the font group of the (train, test) images
DEFAULT_FONTS: FontSplit = ("A", "B")
# LastResort draws a placeholder box for every code point; cmex10/cmsy10 map code points to TeX's
# symbol encodings (an ASCII letter there is a delimiter or an operator), not to the character.
SKIP_FONTS = ("LastResort", "cmex10", "cmsy10")


@dataclass(frozen=True)
class Block:
    """ranges: inclusive code-point ranges; letters: keep only letters (scripts) or any non-space
    graphic character (symbols); train_per_class / test_per_class: images per class."""

    ranges: Tuple[Tuple[int, int], ...]
    train_per_class: int
    test_per_class: int = 6
    letters: bool = False


BLOCKS: Dict[str, Block] = {
    # the 8 domains of configs/uml_puma.yaml
    "cyrillic": Block(((0x0400, 0x04FF),), 34, letters=True),
    "math_operators": Block(((0x2200, 0x22FF),), 8),
    "braille": Block(((0x2801, 0x28FF),), 4),
    "greek": Block(((0x0370, 0x03FF),), 6, letters=True),
    "arrows": Block(((0x2190, 0x21FF),), 5),
    "georgian": Block(((0x10A0, 0x10FF),), 5, letters=True),
    "latin": Block(((0x0041, 0x005A), (0x0061, 0x007A)), 12),
    "geometric_shapes": Block(((0x25A0, 0x25FF),), 5),
    # the disjoint pre-training pool of configs/vit_pretrain.yaml
    "latin_extended": Block(((0x00C0, 0x024F),), 12, letters=True),
    "armenian": Block(((0x0530, 0x058F),), 12, letters=True),
    "box_drawing": Block(((0x2500, 0x257F),), 12),
    "misc_technical": Block(((0x2300, 0x23FF),), 12),
    "letterlike": Block(((0x2100, 0x214F),), 12),
    "misc_symbols": Block(((0x2600, 0x26FF),), 12),
}


@dataclass
class GlyphSet:
    """Images with their labels; ``classes`` are code points, unique across domains."""

    images_NHW: np.ndarray  # uint8
    classes_N: np.ndarray  # int64 code points
    domains_N: np.ndarray  # int64 index into ``domains``
    domains: List[str]


def font_paths() -> List[Path]:
    import matplotlib

    root = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    return sorted(p for p in root.glob("*.ttf") if not p.name.startswith(SKIP_FONTS))


def is_test_font(path: Path) -> bool:
    return path.name.startswith(TEST_FAMILIES)


def font_group(path: Path) -> str:
    return "B" if is_test_font(path) else "A"


def block_classes(block: Block, charmaps: Dict[Path, set]) -> List[int]:
    """Code points of the block with a glyph in >= 1 training font and >= 1 test font."""
    out = []
    for lo, hi in block.ranges:
        for cp in range(lo, hi + 1):
            cat = unicodedata.category(chr(cp))
            if (block.letters and not cat.startswith("L")) or cat[0] in "ZC":
                continue
            fonts = [p for p, cmap in charmaps.items() if cp in cmap]
            if any(is_test_font(p) for p in fonts) and any(not is_test_font(p) for p in fonts):
                out.append(cp)
    return out


def render(font, cp: int) -> Optional[np.ndarray]:
    """The glyph centred in a 32x32 canvas, scaled to fit 26 px (uint8), or None if it draws nothing."""
    font.set_size(24, 72)
    font.set_text(chr(cp))
    font.draw_glyphs_to_bitmap(antialiased=True)
    bitmap = np.asarray(font.get_image(), dtype=np.float32)
    if bitmap.size == 0 or bitmap.max() == 0:
        return None
    ys, xs = np.nonzero(bitmap)
    bitmap = bitmap[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    scale = min(1.0, 26 / max(bitmap.shape))
    h, w = max(1, round(bitmap.shape[0] * scale)), max(1, round(bitmap.shape[1] * scale))
    small = F.interpolate(torch.from_numpy(bitmap)[None, None], size=(h, w), mode="area")[0, 0].numpy()
    canvas = np.zeros((SIZE, SIZE), np.float32)
    top, left = (SIZE - h) // 2, (SIZE - w) // 2
    canvas[top:top + h, left:left + w] = small
    return canvas


def augment(base_NHW: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random scale 0.75-1.15, rotation +-15 degrees, shift +-3 px and Gaussian noise (std 12/255)."""
    n = base_NHW.shape[0]
    scale = torch.empty(n).uniform_(0.75, 1.15, generator=gen)
    angle = torch.empty(n).uniform_(-math.pi / 12, math.pi / 12, generator=gen)
    shift = torch.empty(n, 2).uniform_(-3 / 16, 3 / 16, generator=gen)  # in [-1, 1] grid units
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, (n, 1, SIZE, SIZE), align_corners=False)
    out = F.grid_sample(base_NHW[:, None], grid, align_corners=False)[:, 0]
    out = out + torch.randn(out.shape, generator=gen) * 12
    return out.clamp(0, 255).round().to(torch.uint8)


def build(domains: Sequence[str], seed: int, fonts: FontSplit = DEFAULT_FONTS) -> Tuple[np.ndarray, List[dict]]:
    """Render every image of the named blocks: (uint8 [N, 32, 32], index entries). Each glyph is
    rendered once per font of its split's group (``fonts``: train, test); the instances are
    augmentations of those renderings, done in one batch (per-class torch calls cost more than the
    rendering)."""
    from matplotlib.ft2font import FT2Font

    faces = {p: FT2Font(str(p)) for p in font_paths()}
    charmaps = {p: set(f.get_charmap()) for p, f in faces.items()}
    gen = torch.Generator().manual_seed(seed)
    bases, picks, index = [], [], []
    for name in domains:
        block = BLOCKS[name]
        classes = block_classes(block, charmaps)
        for i, cp in enumerate(classes):
            split = "train" if i < len(classes) // 2 else "test"
            group = fonts[split == "test"]
            usable = [p for p in faces if cp in charmaps[p] and font_group(p) == group]
            rendered = [(p, b) for p, b in ((p, render(faces[p], cp)) for p in usable) if b is not None]
            if not rendered:
                continue
            count = block.train_per_class if split == "train" else block.test_per_class
            pick = torch.randint(len(rendered), (count,), generator=gen)
            picks.append(len(bases) + pick)
            bases += [b for _, b in rendered]
            index += [{"domain": name, "class": cp, "split": split, "font": rendered[k][0].name} for k in pick.tolist()]
    images = augment(torch.from_numpy(np.stack(bases))[torch.cat(picks)], gen)
    return images.numpy(), index


def cache_dir(domains: Sequence[str], seed: int, cache_root: Optional[str] = None,
              fonts: FontSplit = DEFAULT_FONTS) -> Path:
    import matplotlib

    spec = {"domains": sorted(domains), "blocks": {d: repr(BLOCKS[d]) for d in sorted(domains)}, "seed": seed,
            "matplotlib": matplotlib.__version__, "test_families": TEST_FAMILIES}
    if tuple(fonts) != DEFAULT_FONTS:  # the default's key predates font splits: its caches stay valid
        spec["fonts"] = list(fonts)
    digest = hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:10]
    root = Path(cache_root) if cache_root is not None else default_cache_root()
    return root / "glyphs" / f"v{GLYPH_VERSION}-{digest}"


def ensure_glyphs(domains: Sequence[str], seed: int = 0, cache_root: Optional[str] = None,
                  fonts: FontSplit = DEFAULT_FONTS) -> Path:
    """Build the named blocks' images if not cached (one process builds, others wait); their directory."""
    unknown = [d for d in domains if d not in BLOCKS]
    if unknown:
        raise ValueError(f"no embedded glyph domain named {unknown[0]!r}; known: {', '.join(BLOCKS)}")
    bad = [g for g in fonts if g not in FONT_GROUPS]
    if len(fonts) != 2 or bad:
        raise ValueError(f"font split {fonts!r}: give the (train, test) font groups, each one of {', '.join(FONT_GROUPS)}")
    final = cache_dir(domains, seed, cache_root, fonts)
    if not (final / "index.json").exists():
        final.parent.mkdir(parents=True, exist_ok=True)
        with file_lock(final.parent / f"{final.name}.lock"):
            if not (final / "index.json").exists():
                images, index = build(sorted(domains), seed, tuple(fonts))
                tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}-"))
                np.save(tmp / "images.npy", images)
                (tmp / "index.json").write_text(json.dumps(index))
                shutil.rmtree(final, ignore_errors=True)
                os.rename(tmp, final)
    return final


def load_glyphs(domains: Sequence[str], split: str, seed: int = 0, cache_root: Optional[str] = None,
                fonts: FontSplit = DEFAULT_FONTS) -> GlyphSet:
    """The images of one split ("train" | "test") of the named domains, domain ids in the given order."""
    root = ensure_glyphs(domains, seed, cache_root, fonts)
    index = json.loads((root / "index.json").read_text())
    keep = np.array([e["split"] == split for e in index])
    images = np.load(root / "images.npy", mmap_mode="r")[keep]
    order = {d: i for i, d in enumerate(domains)}
    entries = [e for e, k in zip(index, keep) if k]
    return GlyphSet(np.ascontiguousarray(images), np.array([e["class"] for e in entries], np.int64),
                    np.array([order[e["domain"]] for e in entries], np.int64), list(domains))
