"""ScaledSlide: the working frame at a model's mpp; level choice, tile consistency, frames."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest

from wsiseg.readers import MissingMppError, ScaledSlide, open_slide
from wsiseg.readers.scaled import axis_weights, choose_level, dyadic_denominator, resample_float, resample_integer
from wsiseg.synthetic import SyntheticSpec, render_region


def test_choose_level_prefers_the_largest_downsample_at_or_below_scale() -> None:
    ds = (1.0, 4.0, 16.0)
    assert choose_level(ds, 1.01, 0.02) == (0, 1.0)
    assert choose_level(ds, 2.0, 0.02) == (0, 2.0)
    assert choose_level(ds, 3.95, 0.02) == (1, 4.0)
    assert choose_level(ds, 4.0, 0.02) == (1, 4.0)
    assert choose_level(ds, 6.0, 0.02) == (1, 6.0)
    assert choose_level(ds, 40.0, 0.02) == (2, 40.0)
    assert choose_level(ds, 0.5, 0.02) == (0, 0.5)
    assert choose_level(ds, 1.01, 0.0) == (0, 1.01)


def test_axis_weights_average_covered_pixels_or_interpolate() -> None:
    index, weight = axis_weights(10, 4, 2.0)
    np.testing.assert_array_equal(index[:, :2], [[20, 21], [22, 23], [24, 25], [26, 27]])
    np.testing.assert_allclose(weight, [[0.5, 0.5, 0.0]] * 4)
    for ratio in (0.37, 0.5, 1.3, 2.5, 7.9):
        index, weight = axis_weights(-5, 50, ratio)
        np.testing.assert_allclose(weight.sum(axis=1), 1.0, atol=1e-6)
        assert (weight >= 0).all()
    index, weight = axis_weights(0, 2, 0.5)  # upsampling: output centres land on source -0.25 and 0.25
    np.testing.assert_allclose(weight, [[0.25, 0.75], [0.75, 0.25]])
    np.testing.assert_array_equal(index, [[-1, 0], [0, 1]])


def test_slide_at_its_own_mpp_is_a_plain_crop(svs_slide: Path) -> None:
    slide = open_slide(svs_slide)
    for target in (0.5, 0.505, 0.495):
        scaled = ScaledSlide(slide, target)
        assert (scaled.scale, scaled.level, scaled.size_px, scaled.mpp) == (1.0, 0, (2048, 1536), 0.5)
        np.testing.assert_array_equal(scaled.read(100, 50, 300, 200), slide.read_region((100, 50), 0, (300, 200)))
    assert ScaledSlide(slide, 0.52).scale == pytest.approx(1.04)


def test_snapping_to_a_pyramid_level_reads_it_directly(svs_slide: Path) -> None:
    slide = open_slide(svs_slide)
    scaled = ScaledSlide(slide, 2.0)
    assert (scaled.scale, scaled.level, scaled.size_px) == (4.0, 1, (512, 384))
    np.testing.assert_array_equal(scaled.read(10, 20, 100, 80), slide.read_region((40, 80), 1, (100, 80)))


@pytest.mark.parametrize("target_mpp", [0.3, 0.8, 1.0, 3.0, 9.0])
def test_reading_in_pieces_equals_reading_whole(svs_slide: Path, target_mpp: float) -> None:
    scaled = ScaledSlide(open_slide(svs_slide), target_mpp)
    x0, y0, w, h = 37, 23, 150, 110
    whole = scaled.read(x0, y0, w, h)
    left, right = scaled.read(x0, y0, 67, h), scaled.read(x0 + 67, y0, w - 67, h)
    np.testing.assert_array_equal(np.concatenate([left, right], axis=1), whole)
    top, bottom = scaled.read(x0, y0, w, 41), scaled.read(x0, y0 + 41, w, h - 41)
    np.testing.assert_array_equal(np.concatenate([top, bottom], axis=0), whole)
    inner = scaled.read(x0 + 13, y0 + 7, 50, 60)
    np.testing.assert_array_equal(inner, whole[7:67, 13:63])


@pytest.mark.parametrize("backend", ["openslide", "tiffslide"])
def test_pieces_agree_on_a_level_with_a_non_integer_downsample(make_slide, backend: str) -> None:
    path, _ = make_slide(SyntheticSpec(2050, 1539, seed=2), "tiff", levels=(1, 4))
    slide = open_slide(path, backend=backend)
    assert slide.properties.level_downsamples[1] == pytest.approx(4.00586, abs=1e-5)
    for target_mpp in (2.0, 3.0):  # level 1 read directly, and resampled from level 1
        scaled = ScaledSlide(slide, target_mpp)
        assert scaled.level == 1
        whole = scaled.read(150, 240, 150, 110)  # straddles the 512 px chunk grid of level 1
        np.testing.assert_array_equal(
            np.concatenate([scaled.read(150, 240, 67, 110), scaled.read(217, 240, 83, 110)], 1), whole
        )
        np.testing.assert_array_equal(
            np.concatenate([scaled.read(150, 240, 150, 41), scaled.read(150, 281, 150, 69)], 0), whole
        )


def test_pieces_agree_across_the_slide_edge(tiff_slide: Path) -> None:
    scaled = ScaledSlide(open_slide(tiff_slide), 0.61)
    w, h = scaled.size_px
    whole = scaled.read(w - 50, h - 40, 90, 70)
    np.testing.assert_array_equal(whole[:, :30], scaled.read(w - 50, h - 40, 30, 70))
    np.testing.assert_array_equal(whole[25:, 30:], scaled.read(w - 20, h - 15, 60, 45))
    assert (whole[45:, :] == 255).all() and (whole[:, 55:] == 255).all()


def test_quarter_micron_slide_at_half_micron_is_a_2x_area_downsample(tiff_slide: Path, tiff_spec, tiff_truth) -> None:
    slide = open_slide(tiff_slide)
    scaled = ScaledSlide(slide, 0.5)
    assert (scaled.scale, scaled.level, scaled.size_px) == (2.0, 0, (768, 512))
    got = scaled.read(0, 0, 768, 512).astype(int)
    full = render_region(tiff_spec, tiff_truth, 0, 0, 1536, 1024).astype(float)
    expected = full.reshape(512, 2, 768, 2, 3).mean(axis=(1, 3))
    assert np.abs(got - expected).max() <= 0.5 + 1e-6  # only rounding
    nearest = full[::2, ::2]
    assert np.abs(got - nearest).mean() < 6  # and approximately a plain subsample


def test_true_nuclei_land_on_dark_working_pixels(tiff_slide: Path, tiff_truth) -> None:
    scaled = ScaledSlide(open_slide(tiff_slide), 0.5)
    image = scaled.read(0, 0, *scaled.size_px)
    centres = np.floor(scaled.from_l0(tiff_truth.centers_l0)).astype(int)
    at_nuclei = image[centres[:, 1], centres[:, 0]].astype(int).sum(axis=1)
    assert len(centres) > 100
    assert np.median(at_nuclei) < 0.6 * np.median(image.astype(int).sum(axis=2))


def test_frame_conversions_are_edge_frame_inverses(tiff_slide: Path) -> None:
    scaled = ScaledSlide(open_slide(tiff_slide), 0.5)
    xy = np.array([[0.0, 0.0], [10.5, 3.25], [767.0, 511.0]])
    np.testing.assert_allclose(scaled.to_l0(xy), xy * 2.0)
    np.testing.assert_allclose(scaled.from_l0(scaled.to_l0(xy)), xy)
    assert scaled.to_l0([[768, 512]]).tolist() == [[1536.0, 1024.0]]


def test_working_size_rounds_up(svs_slide: Path) -> None:
    scaled = ScaledSlide(open_slide(svs_slide), 0.5 * 3.0)
    assert scaled.size_px == (683, 512)  # ceil(2048 / 3), 1536 / 3


def test_region_outside_the_slide_is_white(svs_slide: Path) -> None:
    scaled = ScaledSlide(open_slide(svs_slide), 0.8)
    assert (scaled.read(-300, -300, 100, 100) == 255).all()
    assert (scaled.read(5000, 0, 10, 10) == 255).all()
    assert scaled.read(0, 0, 0, 7).shape == (7, 0, 3)


def test_scaled_slide_pickles_cheaply_and_reads_the_same(svs_slide: Path) -> None:
    scaled = ScaledSlide(open_slide(svs_slide), 0.8, tolerance=0.05)
    data = pickle.dumps(scaled)
    assert len(data) < 2000
    clone = pickle.loads(data)
    assert (clone.scale, clone.level, clone.tolerance, clone.size_px) == (
        scaled.scale,
        scaled.level,
        0.05,
        scaled.size_px,
    )
    np.testing.assert_array_equal(clone.read(5, 6, 40, 30), scaled.read(5, 6, 40, 30))


def test_missing_mpp_and_bad_targets_are_refused(no_mpp_tiff: Path, svs_slide: Path) -> None:
    with pytest.raises(MissingMppError, match="--mpp"):
        ScaledSlide(open_slide(no_mpp_tiff), 0.5)
    assert ScaledSlide(open_slide(no_mpp_tiff, mpp=0.25), 0.5).scale == 2.0
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="target_mpp"):
            ScaledSlide(open_slide(svs_slide), bad)
    with pytest.raises(ValueError, match="tolerance"):
        ScaledSlide(open_slide(svs_slide), 0.5, tolerance=0.7)


@pytest.mark.parametrize("ratio", [0.5, 0.25, 0.125, 0.75, 2.0, 4.0, 8.0])
def test_integer_resampling_gives_the_float_paths_bytes_for_dyadic_weights(ratio: float) -> None:
    rng = np.random.default_rng(int(ratio * 1000))
    for start in (0, 7, 1001):
        ix, wx = axis_weights(start, 96, ratio)
        iy, wy = axis_weights(start + 3, 80, ratio)
        ix, iy = ix - ix.min(), iy - iy.min()
        patch = rng.integers(0, 256, (int(iy.max()) + 1, int(ix.max()) + 1, 3), dtype=np.uint8)
        patch[:4], patch[4:8] = 255, 0  # flat runs: many sums land exactly on .5
        kx, ky = dyadic_denominator(wx), dyadic_denominator(wy)
        assert kx is not None and ky is not None
        fast = resample_integer(patch, ix, np.rint(wx * kx), iy, np.rint(wy * ky), kx * ky)
        assert np.array_equal(fast, resample_float(patch, ix, wx, iy, wy))
    assert dyadic_denominator(axis_weights(0, 50, 1.5)[1]) is None  # thirds: the float path


def test_integer_resampling_refuses_a_denominator_that_is_not_a_power_of_two() -> None:
    taps = np.zeros((1, 2), np.int64)
    with pytest.raises(ValueError, match="power of two"):
        resample_integer(np.zeros((1, 1, 3), np.uint8), taps, np.array([[2, 1]]), taps, np.array([[2, 1]]), 9)


def test_opening_the_readers_does_not_load_numba() -> None:
    """The compiled resampling kernel loads with the first resampled read, not with `import
    wsiseg.readers` (numba's import would add about 0.3 s to every `wsiseg info`)."""
    import subprocess
    import sys

    code = "import sys, wsiseg.readers, wsiseg.readers.scaled; print('numba' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"
