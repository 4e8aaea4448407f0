"""Run report: atomic JSON with what a reader needs, and a self-contained HTML page a pathologist
can read (tissue outline, density in nuclei per mm² with a colour bar, full-resolution crops with
outlines, histograms and counts per class, warnings, provenance)."""

from __future__ import annotations

import base64
import io
import json
import math
import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import shapely
from PIL import Image

from wsiseg.models.protocols import NucleusClass
from wsiseg.nuclei import MEASUREMENTS, NucleusTable
from wsiseg.writers.report import (
    ReportSlide,
    density_map,
    record_run,
    report_warnings,
    write_report,
    write_report_html,
)
from wsiseg.writers.report_crops import crop_side_l0, pick_crop_boxes, render_crops
from wsiseg.writers.report_images import density_grid
from wsiseg.writers.zarr_store import NucleiStore, ZarrWriter, open_nuclei

CLASSES = [NucleusClass(0, "Tumor", (255, 0, 0)), NucleusClass(1, "Immune", (0, 0, 255))]
MPP = 0.5
WIDTH, HEIGHT = 1200, 900
TISSUE = shapely.box(50, 50, 1150, 850)  # level-0 px: 550 x 400 µm = 0.22 mm²
BACKGROUND, STROMA, NUCLEUS_RGB = (255, 255, 255), (232, 178, 204), (70, 35, 120)
# 36 tumour nuclei packed at (150..250, 150..250), 12 sparse immune nuclei to the lower right
DENSE = [(150 + 20 * i, 150 + 20 * j) for i in range(6) for j in range(6)]
SPARSE = [(700 + 110 * i, 500 + 110 * j) for i in range(4) for j in range(3)]


def sample_report() -> dict[str, Any]:
    return {
        "slide": "/data/slides/case-01.svs",
        "reader": "tiffslide",
        "vendor": "aperio",
        "mpp": np.float32(MPP),
        "counts": {"nuclei": np.int64(48), "nuclei_touching_tile_edge": 1, "tile_px": 256},
        "timings_s": {"read": 1.5, "prompter": 6.0, "segmentor": 2.5, "total": 10.0},
        "parameters": {
            "model": "wsiseg-tiny", "prompter": None, "tile_size_px": None, "overlap_px": 64, "mpp": None,
            "roi": None, "min_score": None, "on_bad_tile": "skip", "note": "<script>alert(1)</script>",
        },
        "models": [{"role": "model", "name": "wsiseg-tiny", "version": "1.2", "sha256": "ab" * 32}],
        "model": {"segmentor": "wsiseg-tiny", "prompter": "wsiseg-tiny", "min_score": 0.3},
        "command_line": "wsiseg run case-01.svs -o out",
        "created": "2025-06-01T10:20:30+0200",
        "unreadable_tiles": [],
        "warnings": [],
    }


def _slide_pixels() -> np.ndarray:
    img = np.full((HEIGHT, WIDTH, 3), BACKGROUND, np.uint8)
    img[50:850, 50:1150] = STROMA
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH]
    for x, y in DENSE + SPARSE:
        img[(xx + 0.5 - x) ** 2 + (yy + 0.5 - y) ** 2 <= 36] = NUCLEUS_RGB
    return img


PIXELS = _slide_pixels()


def read_l0(x: int, y: int, w: int, h: int) -> np.ndarray:
    return PIXELS[y : y + h, x : x + w].copy()


def _table() -> NucleusTable:
    centres = DENSE + SPARSE
    polys = [shapely.Point(x, y).buffer(6.0, 8) for x, y in centres]
    n = len(polys)
    meas = {m: np.ones(n, np.float32) for m in MEASUREMENTS}
    meas["score"] = np.array([0.9] * len(DENSE) + [0.3] * len(SPARSE), np.float32)  # 25 % below 0.5
    meas["area_um2"] = np.array([shapely.area(p) * MPP * MPP for p in polys], np.float32)  # ~28 µm²
    meas["hematoxylin_od_mean"] = np.linspace(0.4, 1.2, n).astype(np.float32)
    edge = np.zeros(n, bool)
    edge[-1] = True
    return NucleusTable.from_polygons(polys, np.array([0] * len(DENSE) + [1] * len(SPARSE)), meas, edge)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> NucleiStore:
    path = tmp_path_factory.mktemp("report") / "case.zarr"
    writer = ZarrWriter(path, width=WIDTH, height=HEIGHT, classes=CLASSES, write_labels=False, tile_size_l0=256)
    writer.write(_table())
    writer.close()
    return open_nuclei(path)


def thumbnail() -> tuple[np.ndarray, float]:
    return PIXELS[::4, ::4].copy(), 4.0


def report_slide(**changes: Any) -> ReportSlide:
    thumb, downsample = thumbnail()
    args: dict[str, Any] = {"thumbnail_rgb": thumb, "downsample": downsample, "size_l0": (WIDTH, HEIGHT),
                            "mpp": MPP, "tissue_l0": TISSUE, "read_l0": read_l0}
    args.update(changes)
    return ReportSlide(**args)


class Page(HTMLParser):
    """Visible text (no attribute values, no image data) and every <img> as its attributes."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text: list[str] = []
        self.images: list[dict[str, str]] = []
        self._skip = False
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._skip = tag in ("style", "title")
        if tag == "img":
            self.images.append({k: v or "" for k, v in attrs})

    def handle_endtag(self, tag: str) -> None:
        self._skip = False

    def handle_data(self, data: str) -> None:
        if not self._skip:
            self.text.append(data)

    @property
    def visible(self) -> str:
        return " ".join(" ".join(self.text).split())

    def picture(self, img: dict[str, str]) -> np.ndarray:
        head, data = img["src"].split(",", 1)
        assert head == "data:image/png;base64"
        return np.asarray(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB"))


def write_page(tmp_path: Path, store: NucleiStore | None, report: dict[str, Any] | None = None, **slide: Any) -> Page:
    path = write_report_html(tmp_path / "case.report.html", report or sample_report(), report_slide(**slide), store)
    return Page(path.read_text(encoding="utf-8"))


# ---------------------------------------------------------------------------------- JSON


def test_json_report_is_atomic_and_strict_json(tmp_path: Path) -> None:
    report = {**sample_report(), "nan_value": float("nan"), "array": np.arange(3), "shape": (2, 3), "out": Path("/o")}
    path = write_report(tmp_path / "out" / "case.report.json", report)
    data = json.loads(path.read_text())  # strict: NaN would have been written as a bare token
    assert data["counts"]["nuclei"] == 48 and data["mpp"] == pytest.approx(MPP)
    assert data["nan_value"] is None and data["array"] == [0, 1, 2] and data["shape"] == [2, 3]
    assert data["out"] == "/o"
    assert [p.name for p in path.parent.iterdir()] == ["case.report.json"]


def test_record_run_adds_tissue_area_command_line_software_and_outputs() -> None:
    report: dict[str, Any] = {"counts": {}}
    record_run(report, command_line=["wsiseg", "run", "my slide.svs"], tissue_l0=TISSUE, mpp=MPP,
               outputs={"geojson": Path("/o/a.geojson.gz")}, models=[{"role": "model", "name": "m"}])
    assert report["tissue_area_mm2"] == pytest.approx(1100 * 800 * MPP * MPP / 1e6)
    assert report["command_line"] == "wsiseg run 'my slide.svs'"  # quoted so it can be pasted back
    assert report["working_directory"] and re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", report["created"])
    assert report["software"]["wsiseg"] and report["software"]["python"]
    assert report["outputs"] == {"geojson": "/o/a.geojson.gz"} and report["models"][0]["name"] == "m"
    kept = record_run({"tissue_area_mm2": 1.5}, tissue_l0=TISSUE, mpp=MPP)
    assert kept["tissue_area_mm2"] == 1.5


# ---------------------------------------------------------------------------------- pictures


def test_density_grid_is_nuclei_per_mm2_of_tissue() -> None:
    # 100 µm cells at 0.5 µm/px are 200 px; 10 nuclei in cell (0, 0), 5 in cell (0, 1)
    pts = np.array([[20.0 + i, 30.0] for i in range(10)] + [[250.0 + i, 30.0] for i in range(5)])
    full = density_grid(pts, (400, 400), MPP, shapely.box(0, 0, 400, 400))
    assert full.cell_um == 100 and full.counts.shape == (2, 2)
    assert full.per_mm2[0, 0] == pytest.approx(10 / 0.01) and full.per_mm2[0, 1] == pytest.approx(5 / 0.01)
    half = density_grid(pts, (400, 400), MPP, shapely.box(0, 0, 300, 400))  # cell (0, 1) is half tissue
    assert half.per_mm2[0, 1] == pytest.approx(5 / 0.005, rel=0.02)
    sliver = density_grid(pts, (400, 400), MPP, shapely.box(0, 0, 220, 400))  # 10 % tissue: no value
    assert math.isnan(sliver.per_mm2[0, 1]) and sliver.per_mm2[0, 0] == pytest.approx(1000)


def test_density_map_counts_points_per_bin() -> None:
    pts = np.array([[1, 1], [2, 3], [9, 1], [15.9, 15.9], [-1, 3], [16, 0], [np.nan, 2]])
    grid = density_map(pts, (16, 16), bin_px=8)
    assert grid.tolist() == [[2, 1], [0, 1]]
    with pytest.raises(ValueError, match="bin_px"):
        density_map(pts, (16, 16), bin_px=0)


def test_crops_show_the_densest_and_sparsest_tissue_and_do_not_overlap(store: NucleiStore) -> None:
    centroids = store.column("centroid")
    grid = density_grid(centroids, (WIDTH, HEIGHT), MPP, TISSUE)
    side = crop_side_l0(MPP)
    assert side == 128  # 64 µm at 0.5 µm/px
    boxes = pick_crop_boxes(centroids, grid, (WIDTH, HEIGHT), side, touches_edge=store.column("touches_edge"))
    assert 4 <= len(boxes) <= 6 and [b.label for b in boxes] == list("ABCDEF"[: len(boxes)])
    densest, sparsest = boxes[0], boxes[1]
    assert "densest" in densest.reason
    assert densest.x0 <= 200 <= densest.x0 + side and densest.y0 <= 200 <= densest.y0 + side
    assert sparsest.reason == "sparsest tissue away from its edges (0 nuclei/mm²)"  # says which cells compete
    sx, sy = sparsest.x0 + side / 2, sparsest.y0 + side / 2
    assert TISSUE.contains(shapely.box(sx - 100, sy - 100, sx + 100, sy + 100))  # deep inside tissue
    assert any("edge" in b.reason for b in boxes)
    for i, a in enumerate(boxes):
        for b in boxes[i + 1 :]:
            assert not shapely.box(*a.bounds_l0).intersection(shapely.box(*b.bounds_l0)).area


def test_crop_is_the_level0_pixels_with_every_outline_in_its_class_colour(store: NucleiStore) -> None:
    centroids = store.column("centroid")
    grid = density_grid(centroids, (WIDTH, HEIGHT), MPP, TISSUE)
    box = pick_crop_boxes(centroids, grid, (WIDTH, HEIGHT), crop_side_l0(MPP))[0]
    (crop,) = render_crops([box], read_l0, store, {c.id: c.color for c in CLASSES}, mpp=MPP)
    assert crop.magnify == 4 and crop.image_rgb.shape == (512, 512, 3)
    source = np.repeat(np.repeat(read_l0(box.x0, box.y0, box.width, box.height), 4, axis=0), 4, axis=1)
    changed = (crop.image_rgb != source).any(axis=2)
    assert 0.02 < changed.mean() < 0.4  # outlines on real pixels, not a redrawn picture
    drawn = {tuple(p) for p in crop.image_rgb[changed]}
    assert (255, 0, 0) in drawn and drawn <= {(255, 0, 0), (0, 0, 255), (0, 0, 0), (255, 255, 255)}
    assert crop.n_nuclei == len(store.query(*box.bounds_l0)) > 20


# ---------------------------------------------------------------------------------- the page


def test_page_is_self_contained_and_never_says_none(tmp_path: Path, store: NucleiStore) -> None:
    page = write_page(tmp_path, store)
    raw = (tmp_path / "case.report.html").read_text()
    assert "http://" not in raw and "https://" not in raw and "<script" not in raw and "<link" not in raw
    assert all(img["src"].startswith("data:image/png;base64,") for img in page.images)
    assert "&lt;script&gt;" in raw  # report values are escaped
    assert "None" not in page.visible and "null" not in page.visible


def test_page_shows_tissue_outline_density_colour_bar_and_crops(tmp_path: Path, store: NucleiStore) -> None:
    page = write_page(tmp_path, store)
    by_alt = {img["alt"]: img for img in page.images}
    overview = page.picture(by_alt["slide thumbnail with tissue outline"])
    assert overview.shape == (225, 300, 3)
    assert ((overview == (0, 170, 70)).all(axis=2)).sum() > 100  # the tissue outline is drawn
    assert page.picture(by_alt["nuclei density map"]).shape == overview.shape
    bar = page.picture(by_alt["colour scale of the density map"])
    assert bar.shape[1] > 100 and not (bar[0, 0] == bar[0, -1]).all()
    assert "Nuclei per mm² of tissue, in squares of 100 µm" in page.visible
    ticks = re.findall(r"≥ ([\d,]+)", page.visible)
    # densest cell: 9 nuclei on 0.75 x 0.75 of a 100 µm square of tissue = 1,600 per mm²; the scale
    # ends at a round value at its 99th percentile, so that one cell does not wash out the others
    assert len(ticks) == 1 and 1000 <= int(ticks[0].replace(",", "")) <= 1600 and ticks[0].endswith("00")
    crops = [img for img in page.images if img["alt"].startswith("crop ")]
    assert 4 <= len(crops) <= 6 and "crop A: densest region" in crops[0]["alt"]
    assert all(page.picture(c).shape == (512, 512, 3) for c in crops)
    assert "64 × 64 µm at x" in page.visible and "pixels shown ×4" in page.visible


def test_page_tells_slide_facts_counts_per_class_and_histograms(tmp_path: Path, store: NucleiStore) -> None:
    page = write_page(tmp_path, store)
    text = page.visible
    assert "case-01.svs" in text and "0.5 µm/px (from the slide file)" in text
    assert "Tissue area 0.22 mm²" in text and "48 (218 per mm² of tissue)" in text
    assert re.search(r"Tumor 36 75\.0 % 164 ", text) and re.search(r"Immune 12 25\.0 % 55 ", text)
    raw = (tmp_path / "case.report.html").read_text()
    assert raw.count('<svg class="hist"') == 3
    assert "nucleus area (µm²)" in text and "score" in text and "mean haematoxylin optical density" in text
    assert 'stroke="rgb(255,0,0)"' in raw and 'stroke="rgb(0,0,255)"' in raw  # one line per class


def test_page_states_provenance_and_parameters_cleanly(tmp_path: Path, store: NucleiStore) -> None:
    text = write_page(tmp_path, store).visible
    assert "Command line wsiseg run case-01.svs -o out" in text and "Date 2025-06-01 10:20:30+0200" in text
    assert "wsiseg-tiny 1.2 " + "ab" * 32 in text
    assert "Tile size (px, working resolution) model default (256)" in text
    assert "Minimum score model default (0.3)" in text and "Prompter the model's own" in text
    assert "override" not in text and "Region of interest" not in text  # unset and meaningless: left out
    assert "read as background and listed (skip)" in text


def test_page_names_the_precision_the_network_ran_at(tmp_path: Path, store: NucleiStore) -> None:
    report = sample_report()
    ran = write_page(tmp_path / "bf16", store, {**report, "parameters": {**report["parameters"], "precision": "bf16"}})
    assert "Network arithmetic (--precision) bf16" in ran.visible
    none = write_page(tmp_path / "none", store, {**report, "parameters": {**report["parameters"], "precision": None}})
    assert "Network arithmetic" not in none.visible  # a model without a network: no such row


def test_page_warns_of_edge_nuclei_low_scores_and_unreadable_tiles(tmp_path: Path, store: NucleiStore) -> None:
    report = {**sample_report(), "unreadable_tiles": [
        {"level": 0, "x_l0": 0, "y_l0": 0, "width_l0": 256, "height_l0": 256, "reason": "JPEG error"}]}
    text = write_page(tmp_path, store, report).visible
    assert "1 nucleus (2.1 %) reached the outer edge of its tile" in text
    assert "25 % of nuclei score below 0.5" in text
    assert "1 tile of the slide file could not be decoded" in text and "Unreadable tiles" in text
    assert "JPEG error" in text


def test_page_warns_when_the_resolution_is_implausible(tmp_path: Path, store: NucleiStore) -> None:
    text = write_page(tmp_path, store, mpp=5.0).visible
    assert "The resolution, 5 µm/px, is outside what scanners give for nuclei" in text
    assert "rerun with --mpp" in text


def test_nuclei_of_implausible_size_point_at_a_wrong_resolution() -> None:
    def warn(area: float, n: int = 100) -> list[str]:
        return report_warnings({}, n_nuclei=n, n_edge=0, low_score_share=0.0, median_area_um2=area, mpp=0.25)

    assert warn(40.0) == [] and warn(700.0, n=5) == []  # usual nuclei; too few to judge
    (line,) = warn(700.0)
    assert "median nucleus area is 700.0 µm²" in line and "0.25 µm/px" in line and "--mpp" in line
    assert warn(3.0)


def test_page_without_nuclei_or_pixels_still_reads_well(tmp_path: Path) -> None:
    page = write_page(tmp_path, None, read_l0=None, tissue_l0=None)
    text = page.visible
    assert "No nuclei were found" in text and "No crops" in text and "None" not in text
    assert "tissue outline not available" in text


def test_report_slide_rejects_a_bad_thumbnail() -> None:
    with pytest.raises(ValueError, match="thumbnail_rgb"):
        report_slide(thumbnail_rgb=np.zeros((4, 4, 5), np.uint8))
    with pytest.raises(ValueError, match="downsample"):
        report_slide(downsample=0.0)


@pytest.mark.parametrize(("slide_mpp", "warned"), [(0.25, False), (0.5, False), (0.6, True), (1.0, True)])
def test_report_and_check_warn_alike_about_upsampling(slide_mpp: float, warned: bool) -> None:
    from wsiseg.preflight import _resolution_warnings
    from wsiseg.writers.report import report_warnings

    report = {"model": {"segmentor": "wsiseg-tiny", "mpp": 0.25}}
    in_report = [w for w in report_warnings(report, n_nuclei=100, n_edge=0, low_score_share=None,
                                            median_area_um2=None, mpp=slide_mpp) if "coarser" in w]
    in_check = _resolution_warnings(slide_mpp, 0.25)
    assert len(in_report) == len(in_check) == int(warned)  # a 20x slide on the 40x model: no warning
    if warned:
        assert in_report[0].lower().startswith(in_check[0].lower())
        assert f"{slide_mpp / 0.25:.1f}x coarser" in in_check[0]
