"""Embedded glyph data and image folders: deterministic, class-disjoint, cached; bad input in one line."""
import numpy as np
import pytest

from moe_sys.config.schema import DomainConfig
from moe_sys.data import glyphs
from moe_sys.data.images import ImageDataError, load_domains


def test_glyphs_are_deterministic_class_disjoint_and_cached(tmp_path):
    a = glyphs.build(["latin", "arrows"], seed=3)
    b = glyphs.build(["latin", "arrows"], seed=3)
    assert np.array_equal(a[0], b[0]) and a[1] == b[1]
    assert a[0].shape[1:] == (32, 32) and a[0].dtype == np.uint8
    train = glyphs.load_glyphs(["latin", "arrows"], "train", 3, str(tmp_path))
    test = glyphs.load_glyphs(["latin", "arrows"], "test", 3, str(tmp_path))
    assert not set(train.classes_N) & set(test.classes_N)
    latin = sorted(set(train.classes_N[train.domains_N == 0]) | set(test.classes_N[test.domains_N == 0]))
    assert sorted(set(train.classes_N[train.domains_N == 0])) == latin[:len(latin) // 2]  # first half trains
    assert np.bincount(train.classes_N)[ord("A")] == glyphs.BLOCKS["latin"].train_per_class
    cached = glyphs.cache_dir(["latin", "arrows"], 3, str(tmp_path))
    mtime = (cached / "images.npy").stat().st_mtime_ns
    again = glyphs.load_glyphs(["arrows", "latin"], "train", 3, str(tmp_path))  # same set, other order: cache hit
    assert (cached / "images.npy").stat().st_mtime_ns == mtime
    assert np.array_equal(again.domains_N, 1 - train.domains_N)


def test_test_fonts_are_held_out():
    fonts = glyphs.font_paths()
    assert any(glyphs.is_test_font(p) for p in fonts) and any(not glyphs.is_test_font(p) for p in fonts)
    assert not any(p.name.startswith(glyphs.SKIP_FONTS) for p in fonts)


def _folder(root, classes, size=8, count=2):
    import matplotlib.image

    for c in range(classes):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(count):
            matplotlib.image.imsave(root / f"c{c}" / f"{i}.png", np.full((size, size), 16 * c + i, np.uint8),
                                    cmap="gray", vmin=0, vmax=255)


def test_image_folder_splits_classes_and_labels_stay_distinct(tmp_path):
    _folder(tmp_path / "shapes", 4)
    domains = [DomainConfig(name="shapes", path=str(tmp_path / "shapes"))]
    train = load_domains(domains, "train", 8, 1)
    test = load_domains(domains, "test", 8, 1)
    assert train.images_NCHW.shape == (4, 1, 8, 8) and train.labels_N.tolist() == [0, 0, 1, 1]
    assert train.images_NCHW[2, 0, 0, 0] == 16  # class c1, image 0 (sorted classes: c0, c1 train)
    assert test.images_NCHW[0, 0, 0, 0] == 32  # c2 is the first test class
    rgb = load_domains(domains, "train", 8, 3)
    assert rgb.images_NCHW.shape == (4, 3, 8, 8)


@pytest.mark.parametrize("make, size, m, message", [
    (lambda root: None, 8, 1, "no image folder"),
    (lambda root: (_folder(root, 2), (root / "c0" / "0.png").unlink(), (root / "c0" / "1.png").unlink()), 8, 1,
     "empty class"),
    (lambda root: _folder(root, 2, size=8), 32, 1, "images are 8x8 pixels, the model takes 32x32"),
    (lambda root: _folder(root, 2, count=1), 8, 2, "1 image(s), fewer than task.metric.sampler.m_per_class=2"),
])
def test_bad_image_folders_get_one_line_naming_them(tmp_path, make, size, m, message):
    root = tmp_path / "mine"
    make(root)
    with pytest.raises(ImageDataError) as err:
        load_domains([DomainConfig(name="mine", path=str(root))], "train", size, 1, m_per_class=m)
    assert message in str(err.value) and str(root) in str(err.value) and "\n" not in str(err.value)
