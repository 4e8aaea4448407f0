from __future__ import annotations

import gzip
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import shapely

from wsiseg.tissue import RoiError, TissueMask, detect_tissue, roi_from_geojson

DOWNSAMPLE = 32.0
MPP_L0 = 0.25  # 8 µm per thumbnail pixel


def _thumbnail() -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """A 400 x 600 slide thumbnail with known regions (bool masks, thumbnail px)."""
    rng = np.random.default_rng(0)
    h, w = 400, 600
    img = (np.array([242, 240, 245]) + rng.integers(-3, 4, (h, w, 3))).astype(np.uint8)
    a, b, lumen, hole, specks, blue, green, black, strip = (np.zeros((h, w), np.uint8) for _ in range(9))
    cv2.ellipse(a, (190, 200), (120, 90), 0, 0, 360, 1, -1)
    cv2.ellipse(b, (430, 200), (110, 150), 20, 0, 360, 1, -1)
    cv2.circle(lumen, (440, 210), 40, 1, -1)
    cv2.circle(hole, (170, 190), 3, 1, -1)
    for x, y in ((320, 40), (330, 360), (560, 380), (60, 30)):
        cv2.circle(specks, (x, y), 2, 1, -1)
    cv2.line(blue, (40, 330), (300, 270), 1, 10)  # crosses blob A's lower edge
    cv2.line(green, (480, 20), (590, 120), 1, 8)
    cv2.circle(black, (80, 360), 12, 1, -1)
    strip[:, :14] = 1
    tex = rng.integers(-12, 13, (h, w, 1))
    pink = np.clip(np.array([225, 160, 205]) + tex, 0, 255)
    purple = np.clip(np.array([185, 115, 175]) + tex, 0, 255)
    img[a > 0] = pink[a > 0]
    img[b > 0] = purple[b > 0]
    img[(lumen > 0) | (hole > 0)] = (243, 241, 246)
    img[specks > 0] = (150, 90, 140)
    img[blue > 0] = (35, 70, 165)
    img[green > 0] = (40, 135, 70)
    img[black > 0] = (45, 45, 52)
    img[strip > 0] = (6, 6, 6)
    tissue = ((a > 0) | (b > 0)) & ~(lumen > 0)
    regions = {
        "tissue": tissue,
        "lumen": lumen > 0,
        "hole": hole > 0,
        "specks": specks > 0,
        "pen": (blue > 0) | (green > 0) | (black > 0),
        "strip": strip > 0,
    }
    return img, regions


def _centres_l0(mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    return (np.stack([xs, ys], axis=1) + 0.5) * DOWNSAMPLE


def _erode(mask: np.ndarray, r: int) -> np.ndarray:
    k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
    return cv2.erode(mask.astype(np.uint8), k).astype(bool)


def _dilate(mask: np.ndarray, r: int) -> np.ndarray:
    k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
    return cv2.dilate(mask.astype(np.uint8), k).astype(bool)


@pytest.fixture(scope="module")
def detected() -> tuple[TissueMask, dict[str, np.ndarray]]:
    img, regions = _thumbnail()
    return detect_tissue(img, DOWNSAMPLE, mpp_l0=MPP_L0), regions


def test_tissue_polygons_cover_the_tissue(detected: tuple[TissueMask, dict[str, np.ndarray]]) -> None:
    mask, regions = detected
    inner = _erode(regions["tissue"], 2) & ~_dilate(regions["pen"], 3)
    assert mask.contains_points_l0(_centres_l0(inner)).all()
    assert mask.mask.shape == regions["tissue"].shape
    assert mask.polygons_l0.is_valid and not mask.is_empty
    truth_area = (regions["tissue"] & ~regions["pen"]).sum() * DOWNSAMPLE**2
    assert abs(mask.area_l0 - truth_area) / truth_area < 0.15


def test_background_pen_debris_and_scanner_border_are_not_tissue(
    detected: tuple[TissueMask, dict[str, np.ndarray]],
) -> None:
    mask, regions = detected
    near_tissue = _dilate(regions["tissue"], 4)
    for name in ("specks", "pen", "strip"):
        away = regions[name] & ~near_tissue
        assert away.any()
        assert not mask.contains_points_l0(_centres_l0(away)).any(), name
    background = ~_dilate(regions["tissue"] | regions["pen"] | regions["specks"], 4) & ~regions["strip"]
    assert not mask.contains_points_l0(_centres_l0(background)).any()
    # Pen drawn over the tissue is removed as well.
    inked_tissue = _erode(regions["pen"], 2) & regions["tissue"]
    assert inked_tissue.any()
    assert not mask.contains_points_l0(_centres_l0(inked_tissue)).any()


def test_small_holes_are_filled_and_lumens_kept(detected: tuple[TissueMask, dict[str, np.ndarray]]) -> None:
    mask, regions = detected
    assert mask.contains_points_l0(_centres_l0(regions["hole"])).all()
    assert not mask.contains_points_l0(_centres_l0(_erode(regions["lumen"], 5))).any()


def test_pen_is_kept_when_asked() -> None:
    img, regions = _thumbnail()
    with_pen = detect_tissue(img, DOWNSAMPLE, mpp_l0=MPP_L0, exclude_pen=False)
    blue_green = regions["pen"] & ~_dilate(regions["tissue"], 4) & (img[..., 1].astype(int) > img[..., 0])
    assert with_pen.contains_points_l0(_centres_l0(_erode(blue_green, 1))).mean() > 0.9


def test_detection_without_mpp_uses_pixel_rules() -> None:
    img, regions = _thumbnail()
    mask = detect_tissue(img, DOWNSAMPLE)
    assert mask.contains_points_l0(_centres_l0(_erode(regions["tissue"], 3) & ~_dilate(regions["pen"], 3))).all()
    assert not mask.contains_points_l0(_centres_l0(regions["specks"])).any()


def test_blank_slide_has_no_tissue() -> None:
    white = np.full((100, 150, 3), 244, np.uint8)
    mask = detect_tissue(white, 64.0, mpp_l0=0.5)
    assert mask.is_empty and mask.area_l0 == 0
    assert not mask.contains_points_l0(np.array([[10.0, 10.0], [5000.0, 3000.0]])).any()
    assert not mask.intersects_box_l0(0, 0, 9600, 6400)


def test_intersects_box_agrees_with_detection(detected: tuple[TissueMask, dict[str, np.ndarray]]) -> None:
    mask, _ = detected
    assert mask.intersects_box_l0(190 * DOWNSAMPLE, 200 * DOWNSAMPLE, 191 * DOWNSAMPLE, 201 * DOWNSAMPLE)
    assert not mask.intersects_box_l0(300 * DOWNSAMPLE, 20 * DOWNSAMPLE, 310 * DOWNSAMPLE, 30 * DOWNSAMPLE)


@pytest.mark.parametrize(
    ("thumb", "downsample", "match"),
    [
        (np.zeros((10, 10, 3), np.float32), 4.0, "uint8"),
        (np.zeros((10, 10), np.uint8), 4.0, "uint8"),
        (np.zeros((10, 10, 3), np.uint8), 0.0, "downsample"),
    ],
)
def test_detect_tissue_rejects_bad_input(thumb: np.ndarray, downsample: float, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        detect_tissue(thumb, downsample)


# ---------------------------------------------------------------------- masks from polygons


def _region() -> shapely.MultiPolygon:
    hole = [(300, 250), (500, 260), (420, 420)]
    ring = shapely.Polygon([(100, 80), (900, 150), (700, 650), (150, 500)], holes=[hole])
    return shapely.MultiPolygon([ring, shapely.Polygon([(950, 700), (990, 705), (970, 760)])])


def test_point_queries_match_shapely_exactly() -> None:
    region = _region()
    mask = TissueMask.from_polygons(region, 1000, 800, max_raster_px=40)  # coarse: many border cells
    rng = np.random.default_rng(3)
    xy = rng.uniform([-50, -50], [1050, 850], (20000, 2))
    expected = shapely.intersects_xy(region, xy[:, 0], xy[:, 1])
    assert np.array_equal(mask.contains_points_l0(xy), expected)


def test_box_queries_match_shapely() -> None:
    region = _region()
    mask = TissueMask.from_polygons(region, 1000, 800, max_raster_px=40)
    rng = np.random.default_rng(4)
    for _ in range(500):
        x0, y0 = rng.uniform(-20, 1000, 2)
        x1, y1 = x0 + rng.uniform(0, 60), y0 + rng.uniform(0, 60)
        assert mask.intersects_box_l0(x0, y0, x1, y1) == shapely.intersects(region, shapely.box(x0, y0, x1, y1))


def test_full_mask_covers_exactly_the_slide() -> None:
    mask = TissueMask.full(1000, 600)
    rng = np.random.default_rng(5)
    inside = rng.uniform([0, 0], [1000, 600], (5000, 2))
    assert mask.contains_points_l0(inside).all()
    outside = np.array([[-0.5, 10], [10, -0.1], [1000.5, 5], [5, 600.5], [np.nan, 3.0]])
    assert not mask.contains_points_l0(outside).any()
    assert mask.intersects_box_l0(990, 590, 1200, 900)
    assert not mask.intersects_box_l0(1001, 0, 1200, 100)
    assert mask.area_l0 == pytest.approx(600_000)


def test_restrict_to_intersects_and_roi_alone_replaces_detection() -> None:
    region = _region()
    full = TissueMask.full(1000, 800)
    roi_only = full.restrict_to(region)
    assert roi_only.area_l0 == pytest.approx(region.area)
    left = shapely.box(0, 0, 400, 800)
    both = roi_only.restrict_to(left)
    rng = np.random.default_rng(6)
    xy = rng.uniform([0, 0], [1000, 800], (5000, 2))
    expected = shapely.intersects_xy(region.intersection(left), xy[:, 0], xy[:, 1])
    assert np.array_equal(both.contains_points_l0(xy), expected)
    assert both.mask.shape == roi_only.mask.shape


def test_polygons_are_clipped_to_the_slide() -> None:
    mask = TissueMask.from_polygons(shapely.box(-100, -100, 50, 50), 200, 100)
    assert mask.area_l0 == pytest.approx(2500)
    assert not mask.contains_points_l0(np.array([[-10.0, 10.0]])).any()


# ---------------------------------------------------------------------- GeoJSON regions


def _feature(geometry: dict, cls: str | None = None) -> dict:
    props: dict = {"objectType": "annotation"}
    if cls:
        props["classification"] = {"name": cls, "color": [255, 0, 0]}
    return {"type": "Feature", "geometry": geometry, "properties": props}


SQUARE = {"type": "Polygon", "coordinates": [[[0, 0], [100, 0], [100, 100], [0, 100], [0, 0]]]}
TWO = {
    "type": "MultiPolygon",
    "coordinates": [
        [[[200, 0], [260, 0], [260, 50], [200, 50], [200, 0]]],
        [[[300, 300], [310, 300], [310, 310], [300, 300]]],
    ],
}
POINT = {"type": "Point", "coordinates": [5, 5]}


def _write(path: Path, data: object, *, gz: bool = False) -> Path:
    raw = json.dumps(data).encode()
    path.write_bytes(gzip.compress(raw) if gz else raw)
    return path


def test_roi_reads_a_qupath_feature_collection(tmp_path: Path) -> None:
    doc = {"type": "FeatureCollection", "features": [_feature(SQUARE), _feature(TWO), _feature(POINT)]}
    region = roi_from_geojson(_write(tmp_path / "roi.geojson", doc))
    assert isinstance(region, shapely.MultiPolygon)
    assert region.area == pytest.approx(100 * 100 + 60 * 50 + 50)
    assert region.contains(shapely.Point(50, 50)) and not region.contains(shapely.Point(150, 50))


@pytest.mark.parametrize(
    "doc",
    [_feature(SQUARE), SQUARE, [_feature(SQUARE)], {"type": "GeometryCollection", "geometries": [SQUARE, POINT]}],
)
def test_roi_accepts_features_geometries_and_lists(tmp_path: Path, doc: object) -> None:
    assert roi_from_geojson(_write(tmp_path / "roi.json", doc)).area == pytest.approx(10_000)


def test_roi_reads_gzip_applies_offset_and_repairs(tmp_path: Path) -> None:
    bowtie = {"type": "Polygon", "coordinates": [[[0, 0], [10, 10], [10, 0], [0, 10], [0, 0]]]}
    doc = {"type": "FeatureCollection", "features": [_feature(SQUARE), _feature(bowtie)]}
    region = roi_from_geojson(_write(tmp_path / "roi.geojson.gz", doc, gz=True), offset_l0=(1000, 500))
    assert region.is_valid
    assert region.bounds == pytest.approx((1000, 500, 1100, 600))


def test_roi_filters_by_class(tmp_path: Path) -> None:
    doc = {"type": "FeatureCollection", "features": [_feature(SQUARE, "Tumor"), _feature(TWO, "Stroma")]}
    path = _write(tmp_path / "roi.geojson", doc)
    assert roi_from_geojson(path, class_name="Stroma").area == pytest.approx(3050)
    with pytest.raises(RoiError, match="classified 'Other'"):
        roi_from_geojson(path, class_name="Other")


def test_roi_errors_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.geojson"
    with pytest.raises(RoiError, match="nope.geojson"):
        roi_from_geojson(missing)
    bad = tmp_path / "bad.geojson"
    bad.write_text("{not json")
    with pytest.raises(RoiError, match="bad.geojson.*not GeoJSON"):
        roi_from_geojson(bad)
    points = _write(tmp_path / "points.geojson", {"type": "FeatureCollection", "features": [_feature(POINT)]})
    with pytest.raises(RoiError, match="points.geojson.*no Polygon"):
        roi_from_geojson(points)
    broken = _write(tmp_path / "broken.geojson", _feature({"type": "Polygon", "coordinates": "abc"}))
    with pytest.raises(RoiError, match="broken.geojson"):
        roi_from_geojson(broken)
    unknown = _write(tmp_path / "unknown.geojson", {"type": "Banana"})
    with pytest.raises(RoiError, match="unknown.geojson"):
        roi_from_geojson(unknown)
