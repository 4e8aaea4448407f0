"""Inputs a run must either read right or refuse in one line naming the fix: GeoJSON frames,
implausible resolutions, OME-TIFF series, small and greyscale images, non-square pixels,
non-brightfield pixels and folders of slides.  Never a plausible-looking wrong answer."""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import shapely
import tifffile
from click.testing import CliRunner
from PIL import Image
from scipy.spatial import cKDTree

import wsiseg.readers
from wsiseg.cli.main import main
from wsiseg.pipeline import RunConfig, run_slide
from wsiseg.readers import (
    BACKENDS,
    MissingMppError,
    NotBrightfieldError,
    ScaledSlide,
    UnsupportedSlideError,
    find_slides,
    open_slide,
    require_mpp,
)
from wsiseg.readers.ome_tiff_reader import ome_reading
from wsiseg.scheduling import SchedulerConfig
from wsiseg.synthetic import SyntheticSpec, make_nuclei, render_region, write_generic_tiff
from wsiseg.tissue import NotBrightfieldImageError, RoiError, detect_tissue, roi_for_slide
from wsiseg.writers.zarr_store import open_nuclei

SYNC = SchedulerConfig(scheduler="synchronous")


def _config(**kw: Any) -> RunConfig:
    return RunConfig(model="classical", scheduler=SYNC, write_labels=False, **kw)


def _centroids(result: Any) -> np.ndarray:
    return np.asarray(open_nuclei(result.zarr).column("centroid"), np.float64).reshape(-1, 2)


def _write_roi(path: Path, box: tuple[float, float, float, float], **members: Any) -> Path:
    feature = {
        "type": "Feature",
        "geometry": shapely.geometry.mapping(shapely.box(*box)),
        "properties": {"objectType": "annotation"},
    }
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [feature], **members}))
    return path


def _write_png(path: Path, spec: SyntheticSpec, *, grey: bool = False) -> Any:
    truth = make_nuclei(spec)
    rgb = render_region(spec, truth, 0, 0, spec.width, spec.height)
    if grey:  # ITU-R BT.601 luma, as image editors convert to greyscale
        Image.fromarray(np.rint(rgb @ np.array([0.299, 0.587, 0.114])).astype(np.uint8), "L").save(path)
    else:
        Image.fromarray(rgb).save(path)
    return truth


def _write_svs(path: Path, description_tail: str, size: int = 512) -> Path:
    pixels = np.full((size, size, 3), 200, np.uint8)
    head = f"Aperio Image Library v12.0.15 \r\n{size}x{size} [0,0 {size}x{size}] (256x256) JPEG Q=90"
    tifffile.imwrite(
        path, pixels, tile=(256, 256), photometric="rgb", compression="jpeg", metadata=None,
        description=head + description_tail,
    )  # fmt: skip
    return path


# --- 1. GeoJSON frames -------------------------------------------------------------------------


class _WithBounds:
    """A reader whose properties claim openslide.bounds (as a Leica SCN's main image)."""

    def __init__(self, reader: Any, bounds_l0: tuple[int, int, int, int]) -> None:
        self._reader = reader
        self.properties = replace(reader.properties, bounds_l0=bounds_l0)

    def read_region(self, *args: Any) -> np.ndarray:
        return self._reader.read_region(*args)

    def thumbnail(self, max_size: int) -> tuple[np.ndarray, float]:
        return self._reader.thumbnail(max_size)

    def close(self) -> None:
        self._reader.close()


def test_roi_from_qupath_is_read_in_qupath_frame_on_a_slide_with_bounds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = SyntheticSpec(1024, 768, mpp=0.5, seed=11, tissue_fraction=1.0)
    slide = tmp_path / "scn-like.tif"
    truth = write_generic_tiff(slide, spec, levels=(1, 4))
    bounds = (256, 192, 768, 576)
    real_open = wsiseg.readers.open_slide
    monkeypatch.setattr(wsiseg.readers, "open_slide", lambda p, **kw: _WithBounds(real_open(p, **kw), bounds))
    roi = _write_roi(tmp_path / "left-half.geojson", (0, 0, 384, 576))  # QuPath frame: left half of the image
    result = run_slide(slide, tmp_path / "out", _config(roi=roi))

    x0, y0, x1, y1 = 256, 192, 256 + 384, 192 + 576  # the same box in level 0
    centres = truth.centers_l0
    expected = int(np.sum((centres[:, 0] >= x0) & (centres[:, 0] < x1) & (centres[:, 1] >= y0) & (centres[:, 1] < y1)))
    found = _centroids(result)
    assert expected > 100
    assert abs(len(found) - expected) <= 0.1 * expected
    margin = 12  # a nucleus radius (5 µm at 0.5 µm/px) plus rounding
    assert found[:, 0].min() >= x0 - margin and found[:, 0].max() <= x1 + margin
    assert found[:, 1].min() >= y0 - margin and found[:, 1].max() <= y1 + margin
    # ... and the GeoJSON written for QuPath is back in the file's frame.
    import gzip

    doc = json.loads(gzip.decompress(result.geojson.read_bytes()))
    xy = np.concatenate([np.asarray(f["geometry"]["coordinates"][0]) for f in doc["features"]])
    assert xy[:, 0].min() >= -margin and xy[:, 0].max() <= 384 + margin


def test_roi_maps_by_the_bounds_offset(tmp_path: Path) -> None:
    roi = _write_roi(tmp_path / "box.geojson", (0, 0, 512, 768))
    region = roi_for_slide(roi, (3072, 2560), (1000, 600, 1024, 768))
    assert region.bounds == (1000.0, 600.0, 1512.0, 1368.0)
    assert roi_for_slide(roi, (3072, 2560), None).bounds == (0.0, 0.0, 512.0, 768.0)


@pytest.mark.parametrize(
    "box, bounds",
    [
        ((5000, 5000, 5100, 5100), None),  # beyond level 0
        ((1100, 0, 1200, 100), (1000, 600, 1024, 768)),  # on level 0, but outside the bounds image QuPath shows
    ],
)
def test_roi_that_misses_the_slide_is_one_line_error(tmp_path: Path, box: Any, bounds: Any) -> None:
    roi = _write_roi(tmp_path / "far.geojson", box)
    with pytest.raises(RoiError, match="outside the slide image") as info:
        roi_for_slide(roi, (3072, 2560), bounds)
    assert str(roi) in str(info.value) and "\n" not in str(info.value)


def test_roi_written_for_another_slide_is_refused(tmp_path: Path) -> None:
    roi = _write_roi(tmp_path / "other.geojson", (0, 0, 100, 100), coordinate_frame={"offset_l0": [10, 20]})
    with pytest.raises(RoiError, match="another|written for a slide"):
        roi_for_slide(roi, (3072, 2560), (1000, 600, 1024, 768))
    assert roi_for_slide(roi, (3072, 2560), (10, 20, 1024, 768)).bounds == (10.0, 20.0, 110.0, 120.0)


def test_no_tissue_warning_does_not_suggest_roi_when_one_was_given(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    glass = tmp_path / "glass.png"
    Image.fromarray(np.full((256, 256, 3), 243, np.uint8)).save(glass)
    roi = _write_roi(tmp_path / "roi.geojson", (0, 0, 128, 128))
    with caplog.at_level(logging.WARNING):
        result = run_slide(glass, tmp_path / "out", _config(mpp=0.5, roi=roi))
    assert result.n_nuclei == 0
    warning = " ".join(r.getMessage() for r in caplog.records if "no tissue" in r.getMessage())
    assert "--roi region" in warning and "give the region with --roi" not in warning


def test_prompt_file_whose_points_all_miss_the_slide_is_an_error(tmp_path: Path) -> None:
    image = tmp_path / "tile.png"
    _write_png(image, SyntheticSpec(256, 256, mpp=0.5, seed=3, tissue_fraction=1.0))
    points = tmp_path / "points.csv"
    points.write_text("x,y\n5000,5000\n5100,5020\n")  # from another, larger slide
    with pytest.raises(ValueError, match="none of its 2 points lies on the slide"):
        run_slide(image, tmp_path / "out", _config(mpp=0.5, prompts_file=points))


def test_help_states_the_geojson_frame_rule() -> None:
    text = " ".join(CliRunner().invoke(main, ["run", "--help"]).output.split())
    assert "QuPath's frame: level-0 px minus the slide's openslide.bounds-x/y" in text
    assert "GeoJSON in QuPath's frame" in text  # --prompts follows the same rule


# --- 3. implausible resolution -----------------------------------------------------------------


def test_svs_whose_mpp_disagrees_with_its_objective_is_refused_naming_mpp(tmp_path: Path) -> None:
    svs = _write_svs(tmp_path / "mpp10.svs", "|AppMag = 20|MPP = 10|Filename = x")
    props = open_slide(svs).properties
    assert props.mpp is None and props.objective_power == 20.0
    with pytest.raises(MissingMppError) as info:
        require_mpp(props)
    message = str(info.value)
    assert "--mpp" in message and "objective power 20x" in message and "no resolution metadata" not in message
    assert open_slide(svs, mpp=0.5).properties.mpp == (0.5, 0.5)  # an explicit --mpp is trusted
    # The command refuses it before any work, exit code 1, one line.
    result = CliRunner().invoke(
        main, ["run", str(svs), "-o", str(tmp_path / "out"), "--model", "classical", "--scheduler", "synchronous", "-q"]
    )
    errors = [ln for ln in result.output.splitlines() if ln.startswith("error:")]
    assert result.exit_code == 1 and len(errors) == 1 and "--mpp" in errors[0]


@pytest.mark.parametrize(
    "tail, mpp, why",
    [
        ("|AppMag = 20|MPP = 0.25|Filename = x", (0.25, 0.25), None),  # a 20x scan at 40x resolution: fine
        ("|AppMag = 40|MPP = 0.2527|Filename = x", (0.2527, 0.2527), None),
        ("|MPP = 4|Filename = x", None, "implausibly coarse"),  # too coarse for nuclei, no objective stated
        ("|AppMag = 40|MPP = abc|Filename = x", None, "not a number"),
    ],
)
def test_svs_mpp_is_checked_for_plausibility(tmp_path: Path, tail: str, mpp: Any, why: str | None) -> None:
    props = open_slide(_write_svs(tmp_path / "s.svs", tail)).properties
    assert props.mpp == (pytest.approx(mpp) if mpp else None)
    assert (props.mpp_problem is None) if why is None else (why in (props.mpp_problem or ""))


@pytest.mark.parametrize(
    "options, description, mpp, why",
    [
        ({"resolution": (72, 72), "resolutionunit": "INCH"}, None, None, "implausible"),  # 72 dpi editor default
        ({"resolution": (4e4, 4e4), "resolutionunit": "NONE"}, None, None, "unknown unit"),
        ({"resolution": (4.0, 4.0), "resolutionunit": "NONE"}, "ImageJ=1.54f\nunit=micron\n", (0.25, 0.25), None),
    ],
)
def test_tiff_resolution_tags_say_why_they_are_refused(
    tmp_path: Path, options: dict[str, Any], description: str | None, mpp: Any, why: str | None
) -> None:
    path = tmp_path / "tags.tif"
    pixels = np.full((512, 512, 3), 200, np.uint8)
    tifffile.imwrite(path, pixels, tile=(256, 256), photometric="rgb", description=description, metadata=None,
                     **options)  # fmt: skip
    props = open_slide(path).properties
    assert props.mpp == (pytest.approx(mpp) if mpp else None)
    if why is not None:
        with pytest.raises(MissingMppError, match=why) as info:
            require_mpp(props)
        assert "no resolution metadata" not in str(info.value) and "--mpp" in str(info.value)


# --- 4. OME-TIFF series ------------------------------------------------------------------------


def _write_ome(path: Path, rgb: np.ndarray | None, *, unit: str = "nm", size: float = 250.0) -> None:
    labels = (np.arange(512 * 512) % 97).reshape(512, 512).astype(np.uint16)
    with tifffile.TiffWriter(path, ome=True) as tif:
        tif.write(labels, tile=(256, 256), subifds=1, metadata={"axes": "YX", "Name": "labels"})
        tif.write(labels[::2, ::2], tile=(256, 256), subfiletype=1)
        if rgb is not None:
            meta = {"axes": "YXS", "Name": "H&E", "PhysicalSizeX": size, "PhysicalSizeXUnit": unit,
                    "PhysicalSizeY": size, "PhysicalSizeYUnit": unit}  # fmt: skip
            tif.write(rgb, tile=(256, 256), subifds=2, photometric="rgb", metadata=meta)
            for d in (2, 4):
                tif.write(rgb[::d, ::d], tile=(256, 256), subfiletype=1, photometric="rgb")


def test_ome_tiff_reads_its_rgb_series_not_the_label_image_first(tmp_path: Path) -> None:
    spec = SyntheticSpec(1024, 768, mpp=0.25, seed=12, tissue_fraction=1.0)
    truth = make_nuclei(spec)
    rgb = render_region(spec, truth, 0, 0, spec.width, spec.height)
    path = tmp_path / "two-series.ome.tiff"
    _write_ome(path, rgb)
    slide = open_slide(path)
    props = slide.properties
    assert props.reader == "ome-tiff" and props.extra["ome.series"] == "1"
    assert props.level_dimensions == ((1024, 768), (512, 384), (256, 192))  # the SubIFD pyramid
    assert props.mpp == pytest.approx((0.25, 0.25))  # 250 nm from the OME-XML
    np.testing.assert_array_equal(slide.read_region((100, 40), 0, (64, 32)), rgb[40:72, 100:164])
    np.testing.assert_array_equal(slide.read_region((200, 80), 1, (16, 8)), rgb[::2, ::2][40:48, 100:116])
    result = run_slide(path, tmp_path / "out", _config())
    assert abs(result.n_nuclei - len(truth)) <= 0.1 * len(truth)


def test_ome_tiff_without_an_rgb_series_is_refused_listing_its_series(tmp_path: Path) -> None:
    path = tmp_path / "labels-only.ome.tif"
    _write_ome(path, None)
    with pytest.raises(NotBrightfieldError, match="'labels' 512x512 uint16 YX") as info:
        open_slide(path)
    assert "brightfield" in str(info.value) and "\n" not in str(info.value)


def test_ome_pixel_size_in_an_unknown_unit_is_a_reason_not_a_guess(tmp_path: Path) -> None:
    path = tmp_path / "pixel-unit.ome.tif"
    _write_ome(path, np.full((512, 512, 3), 200, np.uint8), unit="pixel", size=1.0)
    props = open_slide(path).properties
    assert props.mpp is None and "unknown unit" in (props.mpp_problem or "")


def test_every_reader_keeps_the_files_own_resolution_beside_an_override(
    tmp_path: Path, svs_slide: Path, no_mpp_tiff: Path
) -> None:
    """`check` warns about an --mpp far from the file's own from `file_mpp`, without a second open."""
    ome = tmp_path / "he.ome.tif"
    _write_ome(ome, np.full((512, 512, 3), 200, np.uint8), size=250.0)
    png_tif = tmp_path / "cm.tif"
    tifffile.imwrite(png_tif, np.full((32, 48, 3), 90, np.uint8), photometric="rgb",
                     resolution=(1e4 / 0.4, 1e4 / 0.4), resolutionunit="CENTIMETER")
    cases = [(svs_slide, "openslide"), (svs_slide, "tiffslide"), (ome, None), (png_tif, None)]
    for path, backend in cases:
        own = open_slide(path, backend=backend).properties
        assert own.mpp is not None and own.file_mpp == own.mpp, path
        replaced = open_slide(path, backend=backend, mpp=1.0).properties
        assert replaced.mpp == (1.0, 1.0) and replaced.file_mpp == pytest.approx(own.mpp), (path, backend)
    assert open_slide(no_mpp_tiff, mpp=0.5).properties.file_mpp is None  # the file states none


def test_ome_pixel_size_is_checked_against_the_objective() -> None:
    xml = (
        '<OME xmlns="http://www.openmicroscopy.org/Schemas/OME/2016-06"><Instrument ID="Instrument:0">'
        '<Objective ID="Objective:0" NominalMagnification="40"/></Instrument><Image ID="Image:0" Name="he">'
        '<ObjectiveSettings ID="Objective:0"/><Pixels SizeX="100" SizeY="80" PhysicalSizeX="{0}" PhysicalSizeY="{0}"/>'
        "</Image></OME>"
    )
    good, power = ome_reading(xml.format(0.26), 0, "he", (100, 80))
    assert good.mpp == pytest.approx((0.26, 0.26)) and power == 40.0
    bad, _ = ome_reading(xml.format(1.5), 0, "he", (100, 80))
    assert bad.mpp is None and "objective power 40x" in (bad.problem or "")


# --- 5. small and greyscale images -------------------------------------------------------------


def test_small_tile_that_is_all_tissue_is_tissue(tmp_path: Path) -> None:
    spec = SyntheticSpec(256, 256, mpp=0.25, seed=5, tissue_fraction=1.0)
    tile = tmp_path / "pannuke-size.png"
    truth = _write_png(tile, spec)
    rgb = np.asarray(Image.open(tile))
    assert detect_tissue(rgb, 1.0, mpp_l0=0.25).area_l0 >= 0.95 * 256 * 256
    result = run_slide(tile, tmp_path / "out", _config(mpp=0.25))
    assert len(truth) >= 5 and result.n_nuclei >= 0.8 * len(truth)


def test_greyscale_h_and_e_is_segmented_with_tissue_detection(tmp_path: Path) -> None:
    spec = SyntheticSpec(768, 512, mpp=0.5, seed=6, tissue_fraction=0.6)
    grey = tmp_path / "grey.png"
    truth = _write_png(grey, spec, grey=True)
    detected = run_slide(grey, tmp_path / "detected", _config(mpp=0.5))
    everywhere = run_slide(grey, tmp_path / "everywhere", _config(mpp=0.5, tissue_detection=False))
    assert everywhere.n_nuclei >= 0.8 * len(truth)
    assert detected.n_nuclei >= 0.95 * everywhere.n_nuclei


def test_fluorescence_like_image_is_refused_by_tissue_detection() -> None:
    dark = np.zeros((300, 300, 3), np.uint8)
    dark[100:110, 100:110] = (40, 60, 230)  # a bright stained nucleus on black
    with pytest.raises(NotBrightfieldImageError, match="brightfield"):
        detect_tissue(dark, 1.0, mpp_l0=0.5)
    scanner_black = np.full((300, 300, 3), 243, np.uint8)
    scanner_black[:, :200] = 0  # a brightfield scan with an unscanned black margin still has glass
    assert detect_tissue(scanner_black, 1.0, mpp_l0=0.5).is_empty


# --- 6. non-square pixels ----------------------------------------------------------------------


def test_non_square_pixels_are_resampled_per_axis_and_measured_in_square_microns(tmp_path: Path) -> None:
    # a synthetic slide scanned at 0.25 x 0.5 µm/px: every second row of a 0.25 µm/px render
    spec = SyntheticSpec(768, 768, mpp=0.25, seed=21, tissue_fraction=1.0)
    truth = make_nuclei(spec)
    square = render_region(spec, truth, 0, 0, 768, 768)
    pixels = ((square[0::2].astype(np.uint16) + square[1::2]) // 2).astype(np.uint8)
    path = tmp_path / "anisotropic.tif"
    cm = {"tile": (256, 256), "photometric": "rgb", "resolutionunit": "CENTIMETER"}
    tifffile.imwrite(path, pixels, resolution=(4e4, 2e4), **cm)
    slide = open_slide(path)
    assert slide.properties.mpp == pytest.approx((0.25, 0.5))
    scaled = ScaledSlide(slide, 0.5)
    assert scaled.scale_xy == pytest.approx((2.0, 1.0)) and scaled.size_px == (384, 384)
    np.testing.assert_allclose(scaled.to_l0([[10.0, 10.0]]), [[20.0, 10.0]])

    out = tmp_path / "out"
    config = RunConfig(model="classical", tissue_detection=False, scheduler=SchedulerConfig(scheduler="synchronous"))
    table = open_nuclei(run_slide(path, out, config).zarr).table()
    centres = truth.centers_l0 * np.array([1.0, 0.5])  # the true centres in this slide's level 0
    inside = (centres[:, 0] > 12) & (centres[:, 0] < 756) & (centres[:, 1] > 6) & (centres[:, 1] < 378)
    distance, _ = cKDTree(table.centroid_l0).query(centres[inside])
    assert np.mean(distance < 4) > 0.9  # found where they are, in the anisotropic frame
    # areas in µm²: each axis' own scale (an averaged mpp would give 0.375² per px, +12.5 %)
    a, b = truth.semi_axes_l0[inside].T * spec.mpp
    true_area = np.median(np.pi * a * b)
    assert np.median(table.measurements["area_um2"]) == pytest.approx(true_area, rel=0.12)
    square_path = tmp_path / "square.tif"
    tifffile.imwrite(square_path, square, resolution=(4e4, 4e4), **cm)
    square_table = open_nuclei(run_slide(square_path, tmp_path / "sq", config).zarr).table()
    assert np.median(table.measurements["area_um2"]) == pytest.approx(
        np.median(square_table.measurements["area_um2"]), rel=0.06)
    assert abs(len(table) - len(square_table)) <= 0.05 * len(square_table)


# --- 11. non-brightfield pixels ----------------------------------------------------------------


@pytest.mark.parametrize(
    "pixels, extra, what",
    [
        (np.zeros((512, 512), np.uint16), {}, "uint16 pixels, 1 channel"),  # fluorescence channel
        (np.zeros((512, 512, 3), np.float32), {"photometric": "rgb"}, "float32 pixels"),  # OpenSlide opens it
        (np.zeros((512, 512, 6), np.uint8), {"planarconfig": "contig"}, "6 channels"),  # multiplexed
        (np.zeros((512, 512, 2), np.uint8), {"planarconfig": "contig"}, "two channels, not grey + alpha"),
    ],
)
def test_non_brightfield_tiff_is_refused_at_open_time(
    tmp_path: Path, pixels: np.ndarray, extra: Any, what: str
) -> None:
    path = tmp_path / "channels.tif"
    tifffile.imwrite(path, pixels, tile=(256, 256), metadata=None, **extra)
    with pytest.raises(NotBrightfieldError) as info:
        open_slide(path)
    message = str(info.value)
    assert what in message and "only 8-bit" in message and "brightfield H&E" in message
    assert str(path) in message and "\n" not in message


def test_sixteen_bit_png_is_refused_as_not_brightfield(tmp_path: Path) -> None:
    path = tmp_path / "deep.png"
    Image.fromarray(np.zeros((64, 64), np.uint16)).save(path)
    with pytest.raises(NotBrightfieldError, match="brightfield H&E"):
        open_slide(path)


# --- folders of slides -------------------------------------------------------------------------


def test_folder_search_finds_nested_slides_and_one_slide_per_dicom_folder_or_mrxs(tmp_path: Path) -> None:
    root = tmp_path / "cohort"
    (root / "site-a" / "case-1").mkdir(parents=True)
    (root / "site-a" / "case-1" / "slide.svs").write_bytes(b"x")
    dicom = root / "site-b" / "dicom-case"
    dicom.mkdir(parents=True)
    for level in range(3):
        (dicom / f"level-{level}.dcm").write_bytes(b"x")
    (root / "mirax.mrxs").write_bytes(b"x")
    (root / "mirax").mkdir()
    (root / "mirax" / "Slidedat.ini").write_text("[GENERAL]")
    (root / "mirax" / "Data0000.dat").write_bytes(b"x")
    (root / "mirax" / "preview.jpg").write_bytes(b"x")  # part of the MRXS, not a slide
    (root / "old.zarr").mkdir()
    (root / "old.zarr" / "thumb.png").write_bytes(b"x")
    (root / "notes.txt").write_text("not a slide")
    assert find_slides(root) == sorted([root / "mirax.mrxs", root / "site-a" / "case-1" / "slide.svs", dicom])


def test_dicom_folder_without_a_dicom_reader_names_the_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dicom = tmp_path / "dicom-case"
    dicom.mkdir()
    for level in range(2):
        (dicom / f"level-{level}.dcm").write_bytes(b"DICM")
    missing = replace(BACKENDS["openslide"], requires=("wsiseg_no_such_module",))
    monkeypatch.setitem(BACKENDS, "openslide", missing)
    with pytest.raises(UnsupportedSlideError, match="openslide-python openslide-bin") as info:
        open_slide(dicom)
    assert "\n" not in str(info.value)
