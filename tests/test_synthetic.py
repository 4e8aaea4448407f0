"""Synthetic slides: deterministic layout, region-independent rendering, truth that matches
the pixels, realistic enough stain for a colour-deconvolution detector, and the writers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage as ndi
from scipy.spatial import cKDTree
from skimage.color import rgb2hed
from skimage.feature import blob_log
from skimage.filters import threshold_otsu

from wsiseg.readers import open_slide
from wsiseg.synthetic import (
    CLASS_NAMES,
    SyntheticSpec,
    make_nuclei,
    render_region,
    tissue_mask,
    truth_mask,
    write_generic_tiff,
    write_png,
    write_svs_like,
)

DENSE = SyntheticSpec(1024, 1024, seed=5, tissue_fraction=1.0, touching_fraction=0.1)


@pytest.fixture(scope="module")
def dense():
    truth = make_nuclei(DENSE)
    return truth, render_region(DENSE, truth, 0, 0, 1024, 1024), truth_mask(DENSE, truth, 0, 0, 1024, 1024)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"width": 8}, "width and height"),
        ({"mpp": 0.0}, "mpp"),
        ({"radius_um": (5.0, 2.0)}, "radius_um"),
        ({"tissue_fraction": 0.0}, "tissue_fraction"),
        ({"tissue_pieces": 0}, "tissue_pieces"),
        ({"touching_fraction": 1.5}, "touching_fraction"),
        ({"debris": -1}, "debris"),
        ({"nucleus_density_per_mm2": 50_000.0}, "too dense"),
    ],
)
def test_spec_rejects_bad_values(kwargs, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SyntheticSpec(**{"width": 256, "height": 256, **kwargs})


def test_layout_is_deterministic_in_the_seed() -> None:
    a, b = make_nuclei(DENSE), make_nuclei(DENSE)
    np.testing.assert_array_equal(a.centers_l0, b.centers_l0)
    np.testing.assert_array_equal(a.semi_axes_l0, b.semi_axes_l0)
    other = make_nuclei(SyntheticSpec(1024, 1024, seed=6, tissue_fraction=1.0))
    assert len(other) != len(a) or not np.array_equal(other.centers_l0, a.centers_l0)


def test_truth_is_sorted_inside_the_slide_and_sized_as_asked(dense) -> None:
    truth, _, _ = dense
    x, y = truth.centers_l0.T
    assert (np.diff(y) >= 0).all()
    assert ((x >= 0) & (x < 1024) & (y >= 0) & (y < 1024)).all()
    single = truth.pair_id < 0
    a, b = truth.semi_axes_l0.T
    assert (a[single] >= 2.5 / 0.5 - 1e-9).all() and (a <= 5.0 / 0.5 + 1e-9).all() and (b <= a + 1e-9).all()
    assert set(np.unique(truth.class_id)) == set(range(len(CLASS_NAMES)))
    np.testing.assert_array_equal(truth.label_ids, np.arange(1, len(truth) + 1))
    area_mm2 = (1024 * 0.5e-3) ** 2
    assert 0.8 * 2500 < len(truth) / area_mm2 < 1.2 * 2500


def test_nuclei_do_not_overlap_except_touching_pairs(dense) -> None:
    truth, _, labels = dense
    areas = np.bincount(labels.ravel(), minlength=len(truth) + 1)[1:]
    expected = np.pi * truth.semi_axes_l0[:, 0] * truth.semi_axes_l0[:, 1]
    reach = truth.semi_axes_l0[:, 0] + 1
    whole = ((truth.centers_l0 >= reach[:, None]) & (truth.centers_l0 <= 1024 - reach[:, None])).all(axis=1)
    single = (truth.pair_id < 0) & whole
    assert (areas > 0).all()
    np.testing.assert_allclose(areas[single], expected[single], rtol=0.25, atol=4)
    # Horizontally adjacent pixels of different nuclei occur only between pair partners.
    left, right = labels[:, :-1], labels[:, 1:]
    contact = (left > 0) & (right > 0) & (left != right)
    partners = truth.pair_id[left[contact] - 1] == truth.pair_id[right[contact] - 1]
    assert partners.all() and (truth.pair_id[left[contact] - 1] >= 0).all()


def test_touching_pairs_share_a_boundary(dense) -> None:
    truth, _, labels = dense
    pairs = np.unique(truth.pair_id[truth.pair_id >= 0])
    assert len(pairs) > 10
    contacts = set()
    for a, b in [(labels[:, :-1], labels[:, 1:]), (labels[:-1], labels[1:])]:
        touch = (a > 0) & (b > 0) & (a != b)
        contacts |= {frozenset(p) for p in zip(a[touch].tolist(), b[touch].tolist())}
    touching = sum(frozenset((np.flatnonzero(truth.pair_id == p) + 1).tolist()) in contacts for p in pairs)
    assert touching >= 0.9 * len(pairs)


def test_any_region_renders_like_the_same_part_of_a_larger_one(dense) -> None:
    truth, image, labels = dense
    rng = np.random.default_rng(0)
    for _ in range(6):
        x0, y0 = rng.integers(-40, 900, 2)
        w, h = rng.integers(1, 200, 2)
        part = render_region(DENSE, truth, x0, y0, w, h)
        part_labels = truth_mask(DENSE, truth, x0, y0, w, h)
        assert part.shape == (h, w, 3) and part.dtype == np.uint8 and part_labels.dtype == np.uint32
        xs, ys = max(0, -x0), max(0, -y0)
        np.testing.assert_array_equal(part[ys:, xs:], image[y0 + ys : y0 + h, x0 + xs : x0 + w])
        np.testing.assert_array_equal(part_labels[ys:, xs:], labels[y0 + ys : y0 + h, x0 + xs : x0 + w])


def test_truth_centres_lie_on_dark_haematoxylin_pixels(dense) -> None:
    truth, image, labels = dense
    col, row = np.floor(truth.centers_l0).astype(int).T
    np.testing.assert_array_equal(labels[row, col], truth.label_ids)
    brightness = image.astype(int).sum(axis=2)
    assert brightness[row, col].max() < np.percentile(brightness[labels == 0], 5)
    haem = rgb2hed(image)[..., 0]
    assert np.percentile(haem[labels > 0], 5) > np.percentile(haem[labels == 0], 95)


def test_colour_deconvolution_and_blob_detectors_find_the_nuclei(dense) -> None:
    truth, image, _ = dense
    haem = ndi.gaussian_filter(rgb2hed(image)[..., 0], 1.0)
    mask = haem > threshold_otsu(haem)
    components, n = ndi.label(mask)
    found = np.array(ndi.center_of_mass(mask, components, range(1, n + 1)))[:, ::-1] + 0.5
    distance, _ = cKDTree(found).query(truth.centers_l0)
    assert (distance[truth.pair_id < 0] < 4).mean() > 0.97
    assert (cKDTree(truth.centers_l0).query(found)[0] < 5).mean() > 0.9
    crop = rgb2hed(image[:384, :384])[..., 0]
    blobs = blob_log(crop / crop.max(), min_sigma=2, max_sigma=8, num_sigma=4, threshold=0.05)[:, 1::-1] + 0.5
    inside = truth.centers_in(6, 6, 372, 372)
    assert (cKDTree(blobs).query(truth.centers_l0[inside])[0] < 5).mean() > 0.9


def test_tissue_covers_the_asked_fraction_and_nuclei_stay_in_it() -> None:
    for fraction, pieces in [(0.3, 1), (0.6, 3)]:
        spec = SyntheticSpec(1024, 768, seed=7, tissue_fraction=fraction, tissue_pieces=pieces)
        truth = make_nuclei(spec)
        tissue = tissue_mask(spec, truth, 0, 0, 1024, 768)
        assert abs(tissue.mean() - fraction) < 0.02
        labels = truth_mask(spec, truth, 0, 0, 1024, 768)
        assert tissue[labels > 0].all()
        image = render_region(spec, truth, 0, 0, 1024, 768)
        glass = image[~ndi.binary_dilation(tissue, iterations=6)]  # the edge fades over a few px
        assert glass.min() > 225 and np.abs(glass.astype(int) - glass.mean(axis=0)).max() < 15


def test_pen_mark_and_debris_draw_without_changing_the_truth() -> None:
    plain = SyntheticSpec(768, 512, seed=8)
    marked = SyntheticSpec(768, 512, seed=8, pen_mark=True, debris=6)
    a, b = make_nuclei(plain), make_nuclei(marked)
    np.testing.assert_array_equal(a.centers_l0, b.centers_l0)
    assert b.pen is not None and len(b.debris_l0) == 6
    image = render_region(marked, b, 0, 0, 768, 512).astype(int)
    green = (image[..., 1] > image[..., 0] + 40) & (image[..., 1] > image[..., 2] + 20)
    assert green.sum() > 500
    grey = (image.max(axis=2) - image.min(axis=2) < 25) & (image.max(axis=2) < 140)
    assert grey.sum() > 200
    np.testing.assert_array_equal(render_region(plain, a, 0, 0, 64, 64), render_region(plain, a, 0, 0, 64, 64))


def test_writers_refuse_bad_pyramids(tmp_path: Path) -> None:
    spec = SyntheticSpec(256, 256)
    for kwargs, message in [
        ({"tile": 100}, "multiple of 16"),
        ({"levels": (2, 4)}, "starting at 1"),
        ({"levels": (1, 3)}, "powers of two"),
        ({"levels": (1, 512)}, "leave pixels"),
        ({"compression": "lzma"}, "compression"),
    ]:
        with pytest.raises(ValueError, match=message):
            write_svs_like(tmp_path / "x.svs", spec, **kwargs)


def test_written_files_hold_the_rendered_slide(tmp_path: Path) -> None:
    spec = SyntheticSpec(600, 420, seed=9, mpp=0.25)
    truth = write_generic_tiff(tmp_path / "a.tif", spec, levels=(1, 2, 8), tile=128, compression="none")
    rendered = render_region(spec, truth, 0, 0, 600, 420)
    slide = open_slide(tmp_path / "a.tif")
    assert slide.properties.level_dimensions == ((600, 420), (300, 210), (75, 52))
    np.testing.assert_array_equal(slide.read_region((0, 0), 0, (600, 420)), rendered)
    write_png(tmp_path / "a.png", spec, truth)
    np.testing.assert_array_equal(open_slide(tmp_path / "a.png").read_region((0, 0), 0, (600, 420)), rendered)
    write_svs_like(tmp_path / "a.svs", spec, truth, levels=(1, 4), compression="deflate")
    svs = open_slide(tmp_path / "a.svs")
    assert svs.properties.objective_power == 40.0 and svs.properties.mpp == (0.25, 0.25)
    np.testing.assert_array_equal(svs.read_region((0, 0), 0, (600, 420)), rendered)
    assert not list(tmp_path.glob(".synthetic-*"))  # scratch space is cleaned up
