from __future__ import annotations

import numpy as np
import pytest

from wsiseg.stain import HE, HED, StainMatrix, hematoxylin_od, rgb_to_od, separate_stains, stain_amount, stains_to_rgb


def _pixel(rgb: tuple[int, int, int]) -> np.ndarray:
    return np.array(rgb, np.uint8).reshape(1, 1, 3)


def test_white_glass_has_no_stain() -> None:
    white = np.full((4, 5, 3), 255, np.uint8)
    assert np.array_equal(rgb_to_od(white), np.zeros((4, 5, 3), np.float32))
    assert np.array_equal(hematoxylin_od(white), np.zeros((4, 5), np.float32))


def test_od_follows_beer_lambert() -> None:
    od = rgb_to_od(np.array([[[255, 25, 0]]], np.uint8))[0, 0]
    assert od[0] == pytest.approx(0.0)
    assert od[1] == pytest.approx(-np.log10(25 / 255), rel=1e-6)
    assert od[2] == pytest.approx(-np.log10(1 / 255), rel=1e-6)  # 0 reads as 1: finite


def test_separation_inverts_stain_mixing() -> None:
    h, e = np.meshgrid(np.linspace(0.0, 1.2, 7), np.linspace(0.0, 0.8, 5))
    amounts = np.stack([h, e, np.zeros_like(h)], axis=-1)
    rgb = stains_to_rgb(amounts)
    recovered = separate_stains(rgb)
    # uint8 quantisation limits the precision; dark pixels lose more.
    assert np.abs(recovered[..., 0] - h).max() < 0.04
    assert np.abs(recovered[..., 1] - e).max() < 0.04
    assert np.abs(recovered[..., 2]).max() < 0.04


def test_dab_separates_with_the_hed_matrix() -> None:
    amounts = np.array([[[0.4, 0.1, 0.6]]])
    recovered = separate_stains(stains_to_rgb(amounts, HED), HED)[0, 0]
    assert np.allclose(recovered, [0.4, 0.1, 0.6], atol=0.03)


def test_typical_he_colours_land_in_expected_ranges() -> None:
    nucleus = hematoxylin_od(_pixel((110, 80, 160)))[0, 0]
    dark_nucleus = hematoxylin_od(_pixel((60, 40, 120)))[0, 0]
    stroma = hematoxylin_od(_pixel((235, 160, 205)))[0, 0]
    eosin_rich = hematoxylin_od(_pixel((240, 120, 180)))[0, 0]
    assert nucleus > 0.4 and dark_nucleus > 0.8
    assert stroma < 0.15 and eosin_rich < 0.15
    assert dark_nucleus > nucleus > stroma


def test_hematoxylin_od_is_the_clipped_first_stain() -> None:
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (32, 48, 3), dtype=np.uint8)
    full = separate_stains(rgb)[..., 0]
    got = hematoxylin_od(rgb)
    assert got.dtype == np.float32 and got.shape == (32, 48)
    assert got.min() >= 0
    assert np.allclose(got, np.maximum(full, 0), atol=1e-5)
    assert np.allclose(stain_amount(rgb, 1, HE, clip=False), separate_stains(rgb)[..., 1], atol=1e-5)


def test_values_are_pixelwise_so_crops_match_the_whole_image() -> None:
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)
    whole = hematoxylin_od(rgb)
    crop = hematoxylin_od(np.ascontiguousarray(rgb[13:50, 7:71]))
    assert np.array_equal(whole[13:50, 7:71], crop)


@pytest.mark.parametrize(
    "image",
    [np.zeros((4, 4, 3), np.float32), np.zeros((4, 4), np.uint8), np.zeros((4, 4, 4), np.uint8)],
)
def test_rejects_non_rgb_uint8(image: np.ndarray) -> None:
    with pytest.raises(ValueError, match="uint8|RGB"):
        hematoxylin_od(image)


def test_stain_matrix_validation() -> None:
    with pytest.raises(ValueError, match="linearly dependent"):
        StainMatrix(("a", "b", "c"), ((1.0, 0.0, 0.0), (2.0, 0.0, 0.0)))
    with pytest.raises(ValueError, match="zero"):
        StainMatrix(("a", "b", "c"), ((0.0, 0.0, 0.0), (0.0, 1.0, 0.0)))
    with pytest.raises(ValueError, match="2 or 3"):
        StainMatrix(("a", "b", "c"), ((1.0, 0.0, 0.0),))
    with pytest.raises(ValueError, match="index"):
        stain_amount(np.zeros((2, 2, 3), np.uint8), 3)
    assert np.allclose(np.linalg.norm(HE.matrix(), axis=1), 1.0)
