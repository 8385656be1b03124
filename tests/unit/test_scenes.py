"""Multitask scene targets on hand-made scenes (a single square glyph), and the cached scene data."""
import numpy as np
import pytest
import torch

from moe_sys.data import scenes

CLIP = 4.0


def square_scene(side=9, top=10, left=12, size=32):
    """One white square glyph (domain 2, class 65) on a black background, all pixels covered."""
    patch = np.full((side, side), 255, np.uint8)
    glyph = scenes.Glyph(patch, top, left, domain=2, cls=65)
    return scenes.compose(np.zeros((size, size), np.float32), [glyph], [1.0], CLIP), (top, left, side)


def test_square_mask_and_labels():
    out, (top, left, side) = square_scene()
    expected = torch.zeros(32, 32, dtype=torch.int64)
    expected[top:top + side, left:left + side] = 3
    assert torch.equal(out["seg"], expected)
    assert (out["largest_class"], out["largest_domain"], out["count"]) == (65, 2, 1)


def test_square_height_field():
    out, (top, left, side) = square_scene()
    h = out["height"] * CLIP  # in pixels
    inside = out["seg"] > 0
    assert torch.all(h[~inside] == 0)
    # distance of each pixel centre to the square's boundary, the boundary half a pixel outside
    ys, xs = torch.meshgrid(torch.arange(32), torch.arange(32), indexing="ij")
    to_edge = torch.stack([ys - top, top + side - 1 - ys, xs - left, left + side - 1 - xs]).amin(0) + 0.5
    assert torch.allclose(h[inside], to_edge[inside].float().clamp(max=CLIP))
    centre = (top + side // 2, left + side // 2)
    assert h[centre] == h.max() == 4.0
    assert h[top, left + side // 2] == 0.5  # the border


def test_distance_transform_is_exact_euclidean():
    """Diagonal distances count (not a city-block or chessboard transform)."""
    outside = torch.zeros(1, 7, 7, dtype=torch.bool)
    outside[0, 0, 0] = True
    d2 = scenes.squared_distance(outside)[0]
    ys, xs = torch.meshgrid(torch.arange(7), torch.arange(7), indexing="ij")
    assert torch.equal(d2, (ys ** 2 + xs ** 2).float())


def test_square_normals_tilt_outwards():
    out, (top, left, side) = square_scene()
    n = scenes.normals(out["height"][None], CLIP)[0]
    assert torch.allclose(n.norm(dim=0), torch.ones(32, 32))
    mid = top + side // 2
    assert n[0, mid, left + 1] < 0 and n[0, mid, left + side - 2] > 0  # left side tilts left (-x), right side +x
    assert n[1, top + 1, left + side // 2] < 0 and n[1, top + side - 2, left + side // 2] > 0  # top -y, bottom +y
    assert torch.allclose(n[:, mid, left + side // 2], torch.tensor([0.0, 0.0, 1.0]))  # flat top at the centre
    assert torch.equal(n[:, 0, 0], torch.tensor([0.0, 0.0, 1.0]))  # flat background


def test_square_edges_on_its_border():
    out, (top, left, side) = square_scene()
    e = scenes.sobel_edges(out["image"][None])[0]
    border = torch.zeros(32, 32, dtype=torch.bool)
    border[top - 1:top + side + 1, left - 1:left + side + 1] = True
    border[top + 1:top + side - 1, left + 1:left + side - 1] = False  # a ring two pixels wide around the edge
    assert torch.all(e[~border] == 0)
    assert torch.all(e[top - 1:top + 1, left + 2:left + side - 2] == 0.5)  # a straight step of height 1
    assert e.max() <= 1


def test_occlusion_later_glyph_on_top():
    a = scenes.Glyph(np.full((8, 8), 255, np.uint8), 4, 4, domain=0, cls=1)
    b = scenes.Glyph(np.full((6, 6), 255, np.uint8), 8, 8, domain=1, cls=2)
    out = scenes.compose(np.zeros((20, 20), np.float32), [a, b], [0.5, 1.0], CLIP)
    assert out["seg"][9, 9] == 2 and out["seg"][5, 5] == 1
    assert out["largest_class"] == 1 and out["count"] == 2  # a keeps 64 - 16 = 48 visible pixels, b 36
    assert out["image"][9, 9] == 1.0 and out["image"][5, 5] == 0.5
    # heights follow the visible regions: b's border next to a is a boundary of both
    assert out["height"][8, 9] * CLIP == 0.5 and out["height"][7, 9] * CLIP == 0.5


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("scenes"))


def test_load_scenes_deterministic_cached_and_consistent(cache):
    a = scenes.load_scenes(["latin", "greek"], "train", 12, size=48, cache_root=cache)
    b = scenes.load_scenes(["latin", "greek"], "train", 12, size=48, cache_root=cache)
    assert np.array_equal(a.images_NHW, b.images_NHW) and np.array_equal(a.seg_NHW, b.seg_NHW)
    assert a.images_NHW.shape == (12, 48, 48) and a.normals_N3HW.shape == (12, 3, 48, 48)
    assert set(np.unique(a.seg_NHW)) <= {0, 1, 2} and ((a.height_NHW > 0) == (a.seg_NHW > 0)).all()
    assert ((1 <= a.count_N) & (a.count_N <= 3)).all()
    for n in range(12):  # the largest glyph's domain covers the most pixels of its scene's S (or ties)
        area = np.bincount(a.seg_NHW[n].ravel(), minlength=3)[1:]
        assert area[a.largest_domain_N[n]] > 0
    test = scenes.load_scenes(["latin", "greek"], "test", 12, size=48, cache_root=cache)
    assert not set(test.largest_class_N) & set(a.largest_class_N)  # glyph splits: other classes, other fonts


def test_height_on_bounding_boxes_equals_the_whole_canvas_transform():
    g = torch.Generator().manual_seed(0)
    instances = (torch.rand(40, 40, generator=g) < 0.6).long() * torch.randint(1, 4, (40, 40), generator=g)
    instances[:, :3] = 2  # a region touching the canvas edge
    instances[instances == 3] = 1
    instances[20:26, 15:22], instances[22, 18] = 3, 0  # a small region (its box is cropped) with a hole
    whole = torch.zeros(40, 40)
    for i in (1, 2, 3):
        d = scenes.squared_distance((instances != i)[None])[0].sqrt() - 0.5
        whole += d.clamp(max=CLIP) * (instances == i) / CLIP
    assert torch.equal(scenes.height_field(instances, CLIP), whole)


def test_scene_glyph_domains_are_uniform_over_an_imbalanced_glyph_set():
    """90% of the glyphs are domain 0, yet each domain fills a third of the scenes' glyphs."""
    from moe_sys.data.glyphs import GlyphSet

    domains_N = np.array([0] * 90 + [1] * 5 + [2] * 5)
    source = GlyphSet(np.zeros((100, 32, 32), np.uint8), np.arange(100), domains_N, ["a", "b", "c"])
    gen = torch.Generator().manual_seed(0)
    drawn = [g.domain for _ in range(600) for g in scenes.random_scene(source, 40, 3, gen)[1]]
    share = np.bincount(drawn, minlength=3) / len(drawn)
    assert np.abs(share - 1 / 3).max() < 0.05, share
    assert all(domains_N[g.cls] == g.domain for g in scenes.random_scene(source, 40, 3, gen)[1])
