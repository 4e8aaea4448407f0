"""Slide readers: properties, pixels, backend choice and fallback, bad input, pickling."""

from __future__ import annotations

import dataclasses
import logging
import pickle
from pathlib import Path

import numpy as np
import pytest
import tifffile

from wsiseg.readers import (
    BACKENDS,
    MissingMppError,
    SlideError,
    SlideReader,
    UnsupportedSlideError,
    list_backends,
    open_slide,
    read_thumbnail,
    register_backend,
    require_mpp,
)
from wsiseg.readers import scaled as scaled_module
from wsiseg.readers.base import checked_mpp
from wsiseg.readers.image_reader import ImageReader, tiff_resolution_mpp
from wsiseg.readers.openslide_reader import properties_from_metadata
from wsiseg.readers.registry import Backend, tiff_data_end
from wsiseg.readers.tiffslide_reader import l0_for_level_px
from wsiseg.synthetic import render_region


def block_mean(image: np.ndarray, d: int) -> np.ndarray:
    h, w = image.shape[0] // d, image.shape[1] // d
    total = image[: h * d, : w * d].reshape(h, d, w, d, 3).sum(axis=(1, 3), dtype=np.uint32)
    return ((total + d * d // 2) // (d * d)).astype(np.uint8)


# --- properties -------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["openslide", "tiffslide"])
def test_svs_properties_match_what_was_written(svs_slide: Path, backend: str) -> None:
    with open_slide(svs_slide, backend=backend) as slide:
        props = slide.properties
        assert isinstance(slide, SlideReader)
        assert props.reader == backend
        assert props.vendor == "aperio"
        assert props.size_l0 == (2048, 1536)
        assert props.level_dimensions == ((2048, 1536), (512, 384), (128, 96))
        assert props.level_downsamples == (1.0, 4.0, 16.0)
        assert props.mpp == (0.5, 0.5)
        assert props.objective_power == 20.0
        assert props.bounds_l0 is None
        assert props.path == svs_slide


def test_svs_opens_with_openslide_first(svs_slide: Path) -> None:
    assert open_slide(svs_slide).properties.reader == "openslide"


@pytest.mark.parametrize("backend", ["openslide", "tiffslide"])
def test_generic_tiff_reports_its_pyramid_and_resolution_tags(tiff_slide: Path, backend: str) -> None:
    props = open_slide(tiff_slide, backend=backend).properties
    assert props.vendor == "generic-tiff"
    assert props.level_dimensions == ((1536, 1024), (384, 256))
    assert props.level_downsamples == (1.0, 4.0)
    assert props.mpp == pytest.approx((0.25, 0.25))
    assert props.objective_power is None


def test_bounds_and_objective_parse_from_openslide_properties() -> None:
    metadata = {
        "openslide.vendor": "hamamatsu",
        "openslide.mpp-x": "0.2271",
        "openslide.mpp-y": "0.2273",
        "openslide.objective-power": "40",
        "openslide.bounds-x": "1024",
        "openslide.bounds-y": "512",
        "openslide.bounds-width": "30000",
        "openslide.bounds-height": "20000",
    }
    props = properties_from_metadata(
        Path("x.ndpi"), "openslide", metadata, "openslide", ((40000, 30000),), (1.0,), mpp_override=None
    )
    assert props.bounds_l0 == (1024, 512, 30000, 20000)
    assert props.mpp == (0.2271, 0.2273)
    assert props.objective_power == 40.0
    assert props.vendor == "hamamatsu"
    partial = properties_from_metadata(
        Path("x"), "o", {"openslide.bounds-x": "5"}, "openslide", ((10, 10),), (1.0,), mpp_override=0.5
    )
    assert partial.bounds_l0 is None and partial.mpp == (0.5, 0.5) and partial.vendor == "generic-tiff"


def test_implausible_mpp_counts_as_missing() -> None:
    assert checked_mpp("0.25", 0.25) == (0.25, 0.25)
    assert checked_mpp(352.77, 352.77) is None  # 72 dpi
    assert checked_mpp(None, 0.5) is None
    assert checked_mpp("abc", 0.5) is None


# --- pixels -----------------------------------------------------------------------------


def test_openslide_and_tiffslide_return_identical_pixels(svs_slide: Path, tiff_slide: Path) -> None:
    for path in (svs_slide, tiff_slide):
        a, b = open_slide(path, backend="openslide"), open_slide(path, backend="tiffslide")
        for level, (w, h) in enumerate(a.properties.level_dimensions):
            ds = int(a.properties.level_downsamples[level])
            for x, y in [(0, 0), (w // 3, h // 5), (w - 40, h - 30), (-17, -9)]:
                region_a = a.read_region((x * ds, y * ds), level, (100, 70))
                region_b = b.read_region((x * ds, y * ds), level, (100, 70))
                assert region_a.shape == (70, 100, 3) and region_a.dtype == np.uint8
                np.testing.assert_array_equal(region_a, region_b)


def test_lossless_tiff_holds_the_rendered_pixels_and_area_mean_levels(tiff_slide: Path, tiff_spec, tiff_truth) -> None:
    slide = open_slide(tiff_slide)
    rendered = render_region(tiff_spec, tiff_truth, 0, 0, 1536, 1024)
    np.testing.assert_array_equal(slide.read_region((0, 0), 0, (1536, 1024)), rendered)
    np.testing.assert_array_equal(slide.read_region((0, 0), 1, (384, 256)), block_mean(rendered, 4))


def test_jpeg_svs_is_close_to_the_rendered_pixels(svs_slide: Path, svs_spec, svs_truth) -> None:
    region = open_slide(svs_slide).read_region((512, 256), 0, (512, 512)).astype(int)
    rendered = render_region(svs_spec, svs_truth, 512, 256, 512, 512).astype(int)
    assert np.abs(region - rendered).mean() < 4.0


@pytest.mark.parametrize("backend", ["openslide", "tiffslide", "image"])
def test_regions_outside_the_slide_are_white(no_mpp_tiff: Path, backend: str) -> None:
    slide = open_slide(no_mpp_tiff, backend=backend)
    inner = slide.read_region((0, 0), 0, (60, 40))
    straddle = slide.read_region((-20, -10), 0, (80, 50))
    np.testing.assert_array_equal(straddle[10:, 20:], inner)
    assert (straddle[:10] == 255).all() and (straddle[:, :20] == 255).all()
    corner = slide.read_region((500, 370), 0, (30, 30))
    assert (corner[14:] == 255).all() and (corner[:, 12:] == 255).all()
    assert (slide.read_region((5000, 5000), 0, (8, 8)) == 255).all()
    assert slide.read_region((0, 0), 0, (0, 5)).shape == (5, 0, 3)


def test_rgba_regions_composite_onto_white(tmp_path: Path) -> None:
    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:, 32:, 3] = 255  # left half transparent
    rgba[:, 16:32, 3] = 128
    path = tmp_path / "rgba.png"
    from PIL import Image

    Image.fromarray(rgba).save(path)
    region = open_slide(path).read_region((0, 0), 0, (64, 64))
    assert (region[:, :16] == 255).all()
    np.testing.assert_array_equal(region[0, 40], [200, 0, 0])
    np.testing.assert_array_equal(region[0, 20], [(200 * 128 + 255 * 127 + 127) // 255, 127, 127])


def test_png_is_one_level_without_mpp_and_mpp_can_be_given(png_image: Path, png_spec, png_truth) -> None:
    slide = open_slide(png_image)
    props = slide.properties
    assert (props.reader, props.vendor, props.level_count, props.mpp) == ("image", "image", 1, None)
    np.testing.assert_array_equal(
        slide.read_region((0, 0), 0, (768, 512)), render_region(png_spec, png_truth, 0, 0, 768, 512)
    )
    assert open_slide(png_image, mpp=0.5).properties.mpp == (0.5, 0.5)
    with pytest.raises(ValueError, match="level 1"):
        slide.read_region((0, 0), 1, (4, 4))


def test_image_reader_takes_mpp_from_tiff_resolution_in_cm_or_inch(tmp_path: Path) -> None:
    pixels = np.full((32, 48, 3), 90, np.uint8)
    cm, dpi72, none = tmp_path / "cm.tif", tmp_path / "dpi.tif", tmp_path / "none.tif"
    tifffile.imwrite(cm, pixels, photometric="rgb", resolution=(1e4 / 0.4, 1e4 / 0.4), resolutionunit="CENTIMETER")
    tifffile.imwrite(dpi72, pixels, photometric="rgb", resolution=(72, 72), resolutionunit="INCH")
    tifffile.imwrite(none, pixels, photometric="rgb")
    assert ImageReader(cm).properties.mpp == pytest.approx((0.4, 0.4))
    assert ImageReader(dpi72).properties.mpp is None
    assert ImageReader(none).properties.mpp is None
    assert tiff_resolution_mpp(
        {"XResolution": (254000, 10), "YResolution": (254000, 10), "ResolutionUnit": 2}
    ) == pytest.approx((1.0, 1.0))
    np.testing.assert_array_equal(ImageReader(cm).read_region((0, 0), 0, (48, 32)), pixels)


def test_tiffslide_location_maps_back_to_the_level_pixel() -> None:
    for ds in (1.0, 4.0, 4.000237, 3.99971, 16.5):
        for v in (0, 1, 7, 1000, 12345):
            loc = l0_for_level_px(v, ds)
            assert int(loc / ds) == v


# --- missing mpp ------------------------------------------------------------------------


def test_missing_mpp_is_not_an_error_until_required(no_mpp_tiff: Path) -> None:
    slide = open_slide(no_mpp_tiff)
    assert slide.properties.mpp is None
    assert slide.properties.size_l0 == (512, 384)
    with pytest.raises(MissingMppError, match="--mpp") as info:
        require_mpp(slide.properties)
    assert str(no_mpp_tiff) in str(info.value) and "\n" not in str(info.value)
    assert require_mpp(open_slide(no_mpp_tiff, mpp=0.5).properties) == (0.5, 0.5)


def test_mpp_override_replaces_the_file_value(svs_slide: Path) -> None:
    assert open_slide(svs_slide, mpp=0.2525).properties.mpp == (0.2525, 0.2525)
    with pytest.raises(ValueError, match="--mpp"):
        open_slide(svs_slide, mpp=0.0)


# --- bad input --------------------------------------------------------------------------


@pytest.fixture
def bad_inputs(
    tmp_path: Path, text_as_svs: Path, truncated_slide: Path
) -> dict[str, tuple[Path, type[SlideError], str]]:
    directory = tmp_path / "folder.svs"
    directory.mkdir()
    empty = tmp_path / "empty.svs"
    empty.write_bytes(b"")
    czi = tmp_path / "slide.czi"
    czi.write_bytes(b"ZISRAWFILE" + bytes(100))
    broken_png = tmp_path / "broken.png"
    from PIL import Image

    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(broken_png)
    broken_png.write_bytes(broken_png.read_bytes()[:60])
    return {
        "missing": (tmp_path / "nope.svs", SlideError, "no such file"),
        "directory": (directory, SlideError, "directory"),
        "empty": (empty, SlideError, "empty"),
        "text": (text_as_svs, UnsupportedSlideError, "openslide: .*tiffslide: "),
        "truncated": (truncated_slide, SlideError, "truncated"),
        "unsupported": (czi, UnsupportedSlideError, "unsupported file type .czi"),
        "broken png": (broken_png, UnsupportedSlideError, "image: "),
    }


@pytest.mark.parametrize("case", ["missing", "directory", "empty", "text", "truncated", "unsupported", "broken png"])
def test_bad_input_gives_one_line_naming_the_file(bad_inputs, case: str) -> None:
    path, error, pattern = bad_inputs[case]
    with pytest.raises(error, match=pattern) as info:
        open_slide(path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message


def test_truncation_check_reads_the_tiff_structure(
    svs_slide: Path, tiff_slide: Path, text_as_svs: Path, tmp_path: Path
) -> None:
    for path in (svs_slide, tiff_slide):
        assert tiff_data_end(path) == path.stat().st_size
    assert tiff_data_end(text_as_svs) is None
    data = tiff_slide.read_bytes()
    for fraction in (0.1, 0.5, 0.999):
        cut = tmp_path / f"cut{fraction}.tif"
        cut.write_bytes(data[: int(len(data) * fraction)])
        assert tiff_data_end(cut) > cut.stat().st_size


def test_unknown_backend_name_is_rejected(svs_slide: Path) -> None:
    with pytest.raises(ValueError, match="unknown reader backend 'nope'"):
        open_slide(svs_slide, backend="nope")


# --- backend choice and fallback -----------------------------------------------------------


class _Broken:
    def __init__(self, path: Path, *, mpp: float | None = None) -> None:
        raise RuntimeError("cannot decode this")


def test_failing_backend_falls_back_to_the_next(monkeypatch, svs_slide: Path, caplog) -> None:
    monkeypatch.setitem(BACKENDS, "broken", Backend("broken", (".svs",), 1000, (), _Broken))
    monkeypatch.setitem(BACKENDS, "absent", Backend("absent", (".svs",), 900, ("wsiseg_no_such_module",), _Broken))
    with caplog.at_level(logging.INFO, logger="wsiseg.readers.registry"):
        slide = open_slide(svs_slide)
    assert slide.properties.reader == "openslide"
    assert "broken: cannot decode this" in caplog.text and "absent: cannot import" in caplog.text


def test_missing_openslide_falls_back_to_tiffslide(monkeypatch, svs_slide: Path) -> None:
    crippled = dataclasses.replace(BACKENDS["openslide"], requires=("wsiseg_no_such_module",))
    monkeypatch.setitem(BACKENDS, "openslide", crippled)
    assert open_slide(svs_slide).properties.reader == "tiffslide"
    statuses = {s.name: s for s in list_backends()}
    assert not statuses["openslide"].available and "wsiseg_no_such_module" in statuses["openslide"].detail


def test_when_every_backend_fails_the_error_lists_them(monkeypatch, text_as_svs: Path) -> None:
    monkeypatch.setitem(BACKENDS, "broken", Backend("broken", (".svs",), 1000, (), _Broken))
    with pytest.raises(UnsupportedSlideError, match=r"broken: cannot decode this; openslide: .*; tiffslide: "):
        open_slide(text_as_svs)


def test_list_backends_reports_priority_order_and_versions() -> None:
    rows = list_backends()
    assert [r.name for r in rows][:3] == ["openslide", "tiffslide", "image"]
    assert all(r.available for r in rows)
    assert "openslide" in rows[0].detail and ".svs" in rows[0].extensions


def test_registration_rejects_duplicates_and_bad_extensions() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_backend("openslide", (".svs",), 1)(_Broken)
    with pytest.raises(ValueError, match="lower-case"):
        Backend("x", ("SVS",), 1, (), _Broken)


# --- pickling, thumbnails -----------------------------------------------------------------


@pytest.mark.parametrize("backend", ["openslide", "tiffslide"])
def test_readers_pickle_by_path_and_reopen(svs_slide: Path, backend: str) -> None:
    slide = open_slide(svs_slide, backend=backend, mpp=0.5)
    slide.read_region((0, 0), 0, (64, 64))
    data = pickle.dumps(slide)
    assert len(data) < 1000
    clone = pickle.loads(data)
    assert clone.properties == slide.properties
    np.testing.assert_array_equal(
        clone.read_region((300, 200), 0, (50, 40)), slide.read_region((300, 200), 0, (50, 40))
    )


def test_image_reader_pickles_without_its_pixels(png_image: Path) -> None:
    slide = open_slide(png_image, mpp=0.5)
    slide.read_region((0, 0), 0, (768, 512))
    clone = pickle.loads(pickle.dumps(slide))
    assert len(pickle.dumps(slide)) < 1000 and clone.properties.mpp == (0.5, 0.5)
    np.testing.assert_array_equal(clone.read_region((10, 10), 0, (5, 5)), slide.read_region((10, 10), 0, (5, 5)))


def test_thumbnail_fits_and_matches_the_slide(svs_slide: Path) -> None:
    slide = open_slide(svs_slide)
    thumb, downsample = slide.thumbnail(256)
    assert thumb.shape == (192, 256, 3) and thumb.dtype == np.uint8
    assert downsample == pytest.approx(8.0)
    level1 = slide.read_region((0, 0), 1, (512, 384))
    assert np.abs(thumb.astype(int) - block_mean(level1, 2)).mean() < 2.0


def test_thumbnail_of_an_oversized_level_is_built_in_blocks(monkeypatch, tiff_slide: Path) -> None:
    slide = open_slide(tiff_slide)
    whole, ds_whole = read_thumbnail(slide, 192)
    monkeypatch.setattr(scaled_module, "THUMBNAIL_WHOLE_LEVEL_PX", 1000)
    blocks, ds_blocks = read_thumbnail(slide, 192)
    assert blocks.shape == whole.shape == (128, 192, 3) and ds_blocks == ds_whole == pytest.approx(8.0)
    assert np.abs(blocks.astype(int) - whole.astype(int)).mean() < 1.0
    small, _ = read_thumbnail(slide, 5000)  # never upsamples
    assert small.shape == (1024, 1536, 3)
