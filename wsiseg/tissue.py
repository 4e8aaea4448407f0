"""Where the tissue is: detection on a thumbnail, user regions from GeoJSON, fast point tests.

Every coordinate is level-0 pixels, pixel-edge frame (pixel (row i, column j) covers
[j, j+1) x [i, i+1)).  A `TissueMask` holds the tissue as shapely polygons (the truth)
plus a coarse raster that answers most point and box queries without shapely: each
raster cell is inside, outside, or on the border (only border cells ask the polygons).

Detection (`detect_tissue`) works on an RGB thumbnail: tissue is what is coloured
(HSV saturation above an Otsu threshold clamped to sane bounds) and neither white glass,
near-black scanner background, nor pen ink (blue/green ink has more green than red, which
H&E stains never have; black ink is dark and grey).  An image without colour (a greyscale
scan) is thresholded on darkness instead, and a mostly dark image without glass is refused
as not brightfield (fluorescence).  Specks smaller than `min_area_um2` (or 1 % of the
image, whichever is smaller, so a small image that is all tissue stays tissue) are
dropped, holes smaller than `max_hole_um2` filled, and the result grown by `dilate_um` so
the edge of the tissue is kept.  Red ink looks like eosin and is not removed.

`--roi FILE` regions (`roi_for_slide`): the file is in QuPath's frame, like every GeoJSON
wsiseg reads or writes for a slide (`GEOJSON_FRAME`); a region that misses the slide is an
error.  The pipeline intersects them with the detected tissue (`TissueMask.restrict_to`);
with `--no-tissue-detection` the region replaces detection, since
`TissueMask.full(...).restrict_to(roi)` is the region itself (`tissue_for_slide`).
"""

from __future__ import annotations

import gzip
import json
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import shapely

log = logging.getLogger(__name__)

#: Longest side (cells) of the lookup raster built for polygons given without one.
MAX_RASTER_PX = 2048

_OUTSIDE, _INSIDE, _BORDER = 0, 1, 2


class RoiError(ValueError):
    """A region file cannot be used; the message names the file and the fix."""


class NotBrightfieldImageError(ValueError):
    """The thumbnail does not look like a brightfield scan (dark background, no glass)."""


#: The frame rule of every GeoJSON file wsiseg reads or writes for a slide (--roi, --prompts, outputs).
GEOJSON_FRAME = (
    "GeoJSON coordinates are QuPath's image pixels: level-0 pixels minus the slide's "
    "openslide.bounds-x/y (as QuPath exports them and wsiseg writes them)"
)


def _polygon_parts(geom: shapely.Geometry) -> list[shapely.Polygon]:
    if isinstance(geom, shapely.Polygon):
        return [] if geom.is_empty else [geom]
    if isinstance(geom, (shapely.MultiPolygon, shapely.GeometryCollection)):
        return [p for g in geom.geoms for p in _polygon_parts(g)]
    return []


def _as_multipolygon(geom: shapely.Geometry | None) -> shapely.MultiPolygon:
    """The polygonal part of `geom` as one valid MultiPolygon (possibly empty)."""
    if geom is None or geom.is_empty:
        return shapely.MultiPolygon()
    if not geom.is_valid:
        geom = shapely.make_valid(geom)
    parts = _polygon_parts(geom)
    if len(parts) > 1:
        parts = _polygon_parts(shapely.union_all(parts))
    return shapely.MultiPolygon(parts)


def _rings(geom: shapely.MultiPolygon) -> Iterator[tuple[np.ndarray, bool]]:
    """(coords (k, 2), is_exterior) for every ring."""
    for poly in geom.geoms:
        yield np.asarray(poly.exterior.coords), True
        for hole in poly.interiors:
            yield np.asarray(hole.coords), False


def _raster_states(geom: shapely.MultiPolygon, shape: tuple[int, int], downsample: float) -> np.ndarray:
    """(h, w) uint8: _INSIDE / _OUTSIDE for cells the boundary misses, _BORDER for the rest."""
    import cv2

    shift = 4  # fractional bits for cv2's polygon drawing
    scale = float(1 << shift)
    inside = np.zeros(shape, np.uint8)
    border = np.zeros(shape, np.uint8)
    for coords, exterior in _rings(geom):
        # Cell centres sit at integer cv2 coordinates: level-0 x -> x / downsample - 0.5.
        pts = np.round((coords / downsample - 0.5) * scale).astype(np.int32).reshape(-1, 1, 2)
        cv2.fillPoly(inside, [pts], 1 if exterior else 0, lineType=cv2.LINE_8, shift=shift)
        cv2.polylines(border, [pts], True, 1, thickness=1, lineType=cv2.LINE_8, shift=shift)
    # A ring can clip a cell corner that the drawn line misses: widen the band by one cell.
    widened = cv2.dilate(border, np.ones((3, 3), np.uint8))
    states: np.ndarray = np.where(widened > 0, np.uint8(_BORDER), inside).astype(np.uint8)
    return states


@dataclass(frozen=True, eq=False)
class TissueMask:
    """Tissue regions of a slide.

    polygons_l0: valid MultiPolygon, level-0 px (edge frame); the authoritative region.
    mask: (h, w) bool, the tissue raster at `downsample` (thumbnail resolution for detection).
    downsample: level-0 px per mask cell.
    size_l0: (width, height) of level 0; queries outside it are False.
    """

    polygons_l0: shapely.MultiPolygon
    mask: np.ndarray
    downsample: float
    size_l0: tuple[int, int]
    _states: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.downsample > 0:
            raise ValueError(f"TissueMask.downsample must be > 0, got {self.downsample}")
        if self.mask.ndim != 2 or self.mask.dtype != bool:
            raise ValueError(f"TissueMask.mask must be a 2-D bool array, got {self.mask.shape} {self.mask.dtype}")
        if len(self.size_l0) != 2 or min(self.size_l0) <= 0:
            raise ValueError(f"TissueMask.size_l0 must be (width, height) > 0, got {self.size_l0}")
        object.__setattr__(self, "polygons_l0", _as_multipolygon(self.polygons_l0))
        shapely.prepare(self.polygons_l0)
        object.__setattr__(self, "_states", _raster_states(self.polygons_l0, self.mask.shape, self.downsample))

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_polygons(
        cls, polygons_l0: shapely.Geometry, width: int, height: int, *, max_raster_px: int = MAX_RASTER_PX
    ) -> TissueMask:
        """A mask of exactly `polygons_l0` (clipped to the slide), e.g. a --roi region."""
        if width <= 0 or height <= 0:
            raise ValueError(f"slide size must be > 0, got {width} x {height}")
        geom = _as_multipolygon(shapely.intersection(_as_multipolygon(polygons_l0), shapely.box(0, 0, width, height)))
        downsample = max(1.0, max(width, height) / max_raster_px)
        shape = (max(1, math.ceil(height / downsample)), max(1, math.ceil(width / downsample)))
        mask = _raster_states(geom, shape, downsample) != _OUTSIDE
        return cls(geom, mask, downsample, (int(width), int(height)))

    @classmethod
    def full(cls, width: int, height: int) -> TissueMask:
        """The whole slide (for --no-tissue-detection)."""
        return cls.from_polygons(shapely.box(0, 0, width, height), width, height, max_raster_px=64)

    def restrict_to(self, polygons_l0: shapely.Geometry) -> TissueMask:
        """This tissue intersected with a region (level-0 polygons), at the same raster resolution."""
        geom = _as_multipolygon(shapely.intersection(self.polygons_l0, _as_multipolygon(polygons_l0)))
        region = _raster_states(_as_multipolygon(polygons_l0), self.mask.shape, self.downsample) != _OUTSIDE
        return TissueMask(geom, self.mask & region, self.downsample, self.size_l0)

    # ------------------------------------------------------------------ queries
    @property
    def is_empty(self) -> bool:
        return bool(self.polygons_l0.is_empty)

    @property
    def area_l0(self) -> float:
        """Tissue area in level-0 px^2."""
        return float(self.polygons_l0.area)

    def contains_points_l0(self, xy: np.ndarray) -> np.ndarray:
        """(N, 2) x, y level-0 px -> (N,) bool: inside the tissue (boundary counts as inside)."""
        xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
        out = np.zeros(len(xy), bool)
        if not len(xy) or self.is_empty:
            return out
        h, w = self._states.shape
        with np.errstate(invalid="ignore"):
            cx = np.floor(xy[:, 0] / self.downsample)
            cy = np.floor(xy[:, 1] / self.downsample)
        ok = (cx >= 0) & (cy >= 0) & (cx < w) & (cy < h)
        ok &= (xy[:, 0] <= self.size_l0[0]) & (xy[:, 1] <= self.size_l0[1])
        state = np.full(len(xy), _OUTSIDE, np.uint8)
        state[ok] = self._states[cy[ok].astype(np.int64), cx[ok].astype(np.int64)]
        out[state == _INSIDE] = True
        check = np.flatnonzero(state == _BORDER)
        if len(check):
            out[check] = shapely.intersects_xy(self.polygons_l0, xy[check, 0], xy[check, 1])
        return out

    def intersects_box_l0(self, x0: float, y0: float, x1: float, y1: float) -> bool:
        """Whether the box [x0, x1] x [y0, y1] (level-0 px) touches tissue."""
        if self.is_empty or x1 < x0 or y1 < y0:
            return False
        h, w = self._states.shape
        c0 = max(math.floor(x0 / self.downsample), 0)
        r0 = max(math.floor(y0 / self.downsample), 0)
        c1 = min(math.floor(x1 / self.downsample) + 1, w)
        r1 = min(math.floor(y1 / self.downsample) + 1, h)
        if c1 <= c0 or r1 <= r0:
            return False
        cells = self._states[r0:r1, c0:c1]
        if (cells == _INSIDE).any():
            return True
        if not (cells == _BORDER).any():
            return False
        return bool(shapely.intersects(self.polygons_l0, shapely.box(x0, y0, x1, y1)))


# ---------------------------------------------------------------------- detection


@dataclass(frozen=True)
class TissueDetectionConfig:
    """Thresholds of `detect_tissue` (saturation and value in [0, 1], areas in µm^2).

    saturation_bounds: the Otsu threshold on HSV saturation is clamped to this range.
    black_value: pixels darker than this (max channel / 255) are scanner background.
    pen_green_excess: pen ink has green above red by more than this (of 255) ...
    pen_blue_excess: ... and its larger of green/blue above red by more than this.
    black_ink_value, black_ink_saturation: dark and grey pixels are black ink.
    darkness_bounds: images without colour: the Otsu threshold on darkness (1 - value) is
        clamped to this range.
    colourless_fraction: an image is without colour when fewer pixels than this fraction
        have channels differing by more than `colour_delta` (of 255).
    small_image_fraction: pieces of at least this fraction of the image are never specks.
    """

    saturation_bounds: tuple[float, float] = (0.05, 0.15)
    darkness_bounds: tuple[float, float] = (0.08, 0.2)
    colour_delta: int = 12
    colourless_fraction: float = 1e-4
    small_image_fraction: float = 0.01
    black_value: float = 0.12
    pen_green_excess: int = 8
    pen_blue_excess: int = 25
    black_ink_value: float = 0.35
    black_ink_saturation: float = 0.3
    max_hole_um2: float = 20_000.0
    dilate_um: float = 20.0

    def __post_init__(self) -> None:
        for key in ("saturation_bounds", "darkness_bounds"):
            lo, hi = getattr(self, key)
            if not 0 <= lo <= hi <= 1:
                raise ValueError(f"{key} must satisfy 0 <= low <= high <= 1, got {getattr(self, key)}")
        fractions = ("black_value", "black_ink_value", "black_ink_saturation", "colourless_fraction", "small_image_fraction")
        for key in fractions:
            if not 0 <= getattr(self, key) <= 1:
                raise ValueError(f"TissueDetectionConfig.{key} must be in [0, 1], got {getattr(self, key)}")
        for key in ("pen_green_excess", "pen_blue_excess", "max_hole_um2", "dilate_um", "colour_delta"):
            if getattr(self, key) < 0:
                raise ValueError(f"TissueDetectionConfig.{key} must be >= 0, got {getattr(self, key)}")


def _otsu(values: np.ndarray) -> float:
    """Otsu threshold of values in [0, 1] (256 bins)."""
    # clipped before the cast (same bins as after it, truncating toward zero): uint8, not int64
    hist = np.bincount(np.clip(values * 255, 0, 255).astype(np.uint8), minlength=256).astype(np.float64)
    total = hist.sum()
    if total == 0:
        return 0.0
    w0 = np.cumsum(hist)
    m0 = np.cumsum(hist * np.arange(256))
    w1 = total - w0
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (m0[-1] * w0 / total - m0) ** 2 / (w0 * w1)
    between[~np.isfinite(between)] = -1
    return (int(np.argmax(between)) + 0.5) / 255.0


def _pen_mask(rgb: np.ndarray, value: np.ndarray, saturation: np.ndarray, cfg: TissueDetectionConfig) -> np.ndarray:
    """Blue/green ink (green above red: never so for haematoxylin or eosin) and black ink."""
    r, g, b = (rgb[..., i].astype(np.int16) for i in range(3))
    coloured = (g - r > cfg.pen_green_excess) & (np.maximum(g, b) - r > cfg.pen_blue_excess)
    black = (value < cfg.black_ink_value) & (saturation < cfg.black_ink_saturation)
    return coloured | black


def detect_tissue(
    thumbnail_rgb: np.ndarray,
    downsample: float,
    *,
    mpp_l0: float | None = None,
    min_area_um2: float = 10_000.0,
    exclude_pen: bool = True,
    slide_size_l0: tuple[int, int] | None = None,
    config: TissueDetectionConfig = TissueDetectionConfig(),
) -> TissueMask:
    """Tissue regions from an RGB thumbnail.

    thumbnail_rgb: (h, w, 3) uint8 of the whole slide; downsample: level-0 px per thumbnail px.
    mpp_l0: µm per level-0 px; without it, areas fall back to thumbnail-pixel rules
        (specks < 0.01% of the thumbnail dropped, holes < 0.05% filled, 1 px growth).
    min_area_um2: tissue pieces smaller than this, and than 1% of the image
        (`config.small_image_fraction`), are debris and dropped.
    Raises NotBrightfieldImageError for a dark image without glass (fluorescence).
    exclude_pen: remove blue, green and black ink.
    slide_size_l0: (width, height) of level 0; default thumbnail size x downsample.
    """
    import cv2
    from scipy import ndimage as ndi

    rgb = np.asarray(thumbnail_rgb)
    if rgb.ndim != 3 or rgb.shape[-1] != 3 or rgb.dtype != np.uint8 or min(rgb.shape[:2]) == 0:
        raise ValueError(f"thumbnail must be a non-empty (h, w, 3) uint8 RGB image, got {rgb.shape} {rgb.dtype}")
    if not downsample > 0:
        raise ValueError(f"thumbnail downsample must be > 0, got {downsample}")
    if mpp_l0 is not None and not mpp_l0 > 0:
        raise ValueError(f"mpp_l0 must be > 0 µm per pixel, got {mpp_l0}")
    h, w = rgb.shape[:2]
    # the channel maximum and minimum by elementwise pairs: several times faster than reducing
    # over the last axis of length 3
    hi = np.maximum(np.maximum(rgb[..., 0], rgb[..., 1]), rgb[..., 2]).astype(np.float32)
    lo = np.minimum(np.minimum(rgb[..., 0], rgb[..., 1]), rgb[..., 2]).astype(np.float32)
    value = hi / 255.0
    with np.errstate(divide="ignore", invalid="ignore"):
        saturation = np.where(hi > 0, (hi - lo) / hi, 0.0).astype(np.float32)

    colourless = np.count_nonzero(hi - lo > config.colour_delta) < config.colourless_fraction * h * w
    _check_brightfield(value, saturation)
    excluded = value < config.black_value
    if colourless:  # greyscale: tissue is what is darker than the glass; no ink can be told apart
        signal, (s_lo, s_hi) = 1.0 - value, config.darkness_bounds
    else:
        if exclude_pen:
            pen = _pen_mask(rgb, value, saturation, config)
            excluded |= cv2.dilate(pen.view(np.uint8), np.ones((3, 3), np.uint8)).view(bool)
        signal, (s_lo, s_hi) = saturation, config.saturation_bounds
    candidates = signal[~excluded]
    threshold = float(np.clip(_otsu(candidates), s_lo, s_hi)) if candidates.size else s_hi
    tissue = (signal > threshold) & ~excluded

    if mpp_l0 is not None:
        px_um2 = (mpp_l0 * downsample) ** 2
        # A piece that is a sizeable part of the image is tissue, however small the image.
        min_area_px = min(min_area_um2 / px_um2, config.small_image_fraction * h * w)
        max_hole_px = config.max_hole_um2 / px_um2
        grow_px = max(1, round(config.dilate_um / (mpp_l0 * downsample)))
    else:
        min_area_px, max_hole_px, grow_px = 1e-4 * h * w, 5e-4 * h * w, 1
    # Close one-pixel gaps, then drop specks and fill small holes.
    tissue = cv2.morphologyEx(tissue.view(np.uint8), cv2.MORPH_CLOSE, np.ones((3, 3), np.uint8)).view(bool)
    tissue &= ~excluded
    tissue = _drop_small(tissue, min_area_px)
    holes = ndi.binary_fill_holes(tissue) & ~tissue
    tissue |= _drop_small(holes, max_hole_px, keep_small=True)
    if grow_px:
        disc = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * grow_px + 1, 2 * grow_px + 1))
        tissue = cv2.dilate(tissue.view(np.uint8), disc).view(bool)
    polygons = _trace(tissue)
    polygons_l0 = shapely.transform(polygons, lambda c: c * downsample)
    if slide_size_l0 is None:
        slide_size_l0 = (max(1, math.ceil(w * downsample)), max(1, math.ceil(h * downsample)))
    kind = "darkness" if colourless else "saturation"
    log.debug("tissue: %s threshold %.3f, %d regions", kind, threshold, len(polygons.geoms))
    size = (int(slide_size_l0[0]), int(slide_size_l0[1]))
    polygons_l0 = shapely.intersection(polygons_l0, shapely.box(0, 0, size[0], size[1]))
    return TissueMask(polygons_l0, tissue, float(downsample), size)


#: A brightfield thumbnail shows glass; one whose median brightness is below this and whose
#: glass (bright, grey) covers under GLASS_FRACTION is a fluorescence or dark-field image.
DARK_MEDIAN_VALUE = 0.25
GLASS_FRACTION = 0.01


def _check_brightfield(value: np.ndarray, saturation: np.ndarray) -> None:
    """Raise NotBrightfieldImageError for a mostly dark thumbnail without glass."""
    median = float(np.median(value))
    if median >= DARK_MEDIAN_VALUE:
        return
    glass = float(np.mean((value > 0.8) & (saturation < 0.1)))
    if glass < GLASS_FRACTION:
        raise NotBrightfieldImageError(
            f"the image is dark with no bright glass (median brightness {median:.0%}), as in fluorescence: "
            "wsiseg segments nuclei in brightfield H&E scans (run with --no-tissue-detection to process it anyway)"
        )


def _drop_small(mask: np.ndarray, min_area_px: float, *, keep_small: bool = False) -> np.ndarray:
    """Connected components (8-connected) of at least min_area_px, or below it with keep_small."""
    import cv2

    _, labels, stats, _ = cv2.connectedComponentsWithStats(mask.view(np.uint8), connectivity=8)
    area = stats[:, cv2.CC_STAT_AREA]
    keep = area < min_area_px if keep_small else area >= min_area_px
    keep[0] = False
    return keep[labels]


def _trace(mask: np.ndarray) -> shapely.MultiPolygon:
    """Outline of a bool raster (cell = unit square, edge frame), within half a pixel on diagonals."""
    import cv2

    contours, hierarchy = cv2.findContours(mask.view(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        return shapely.MultiPolygon()
    outers: list[shapely.Geometry] = []
    holes: list[shapely.Geometry] = []
    for contour, (_, _, _, parent) in zip(contours, hierarchy[0]):
        pts = contour.reshape(-1, 2).astype(np.float64) + 0.5  # boundary pixel centres
        if parent < 0:
            line = shapely.Polygon(pts) if len(pts) >= 3 else shapely.LineString(pts) if len(pts) == 2 else shapely.Point(pts[0])
            # Centres -> edges: grow by half a pixel with square corners.
            grown = shapely.buffer(line, 0.5, cap_style="square", join_style="mitre")
            outers.append(grown)
        elif len(pts) >= 3:
            holes.append(shapely.buffer(shapely.Polygon(pts), -0.5, join_style="mitre"))
    shape = shapely.union_all(outers)
    if holes:
        shape = shapely.difference(shape, shapely.union_all(holes))
    return _as_multipolygon(shape)


# ---------------------------------------------------------------------- regions from files


def roi_from_geojson(
    path: str | Path, *, offset_l0: tuple[float, float] = (0.0, 0.0), class_name: str | None = None
) -> shapely.MultiPolygon:
    """Polygons of a GeoJSON / QuPath annotation file as one MultiPolygon, shifted by offset_l0.

    Accepts a FeatureCollection, a list of Features, a Feature or a bare geometry
    (.geojson, .json, optionally gzipped).  Polygon and MultiPolygon geometries are used,
    others skipped.  class_name: keep only features classified so (QuPath classification).
    offset_l0: added to every coordinate; for a slide, `roi_for_slide` applies the frame
    rule (GEOJSON_FRAME) instead of taking an offset.
    """
    path = Path(path)
    return _shifted(_region(_read_geojson(path), path, class_name), offset_l0)


def roi_for_slide(
    path: str | Path,
    size_l0: tuple[int, int],
    bounds_l0: tuple[int, int, int, int] | None,
    *,
    class_name: str | None = None,
) -> shapely.MultiPolygon:
    """A --roi file's polygons in the slide's level-0 frame, read by the GEOJSON_FRAME rule.

    size_l0: (width, height) of level 0; bounds_l0: the slide's (x, y, width, height)
    non-empty region (openslide.bounds-*), or None.  File coordinates + (bounds x, y) =
    level 0.  Raises RoiError when the file records a coordinate_frame offset other than
    this slide's (written for another slide) or when no part of the region lies on the
    slide image (the bounds box where there is one).
    """
    path = Path(path)
    data = _read_geojson(path)
    region = _region(data, path, class_name)
    bx, by, bw, bh = bounds_l0 if bounds_l0 is not None else (0, 0, int(size_l0[0]), int(size_l0[1]))
    recorded = (data.get("coordinate_frame") or {}).get("offset_l0") if isinstance(data, dict) else None
    if recorded is not None and not np.allclose(np.asarray(recorded, np.float64), (bx, by)):
        raise RoiError(
            f"region file {path} was written for a slide whose QuPath offset is {list(recorded)}, "
            f"this slide's is [{bx}, {by}]; export the region from this slide"
        )
    image = shapely.box(0, 0, bw, bh)  # the slide image as QuPath shows it
    inside = shapely.intersection(region, image)
    if inside.is_empty or inside.area == 0:
        x0, y0, x1, y1 = region.bounds
        raise RoiError(
            f"region file {path} ({x0:.0f}-{x1:.0f} x {y0:.0f}-{y1:.0f} px) lies outside the slide image "
            f"({bw} x {bh} px in QuPath's frame); export the region from this slide in QuPath"
        )
    if inside.area < 0.5 * region.area:
        outside = 100 * (1 - inside.area / region.area)
        log.warning("%s: %.0f%% of the region lies outside the slide image", path, outside)
    return _shifted(_as_multipolygon(inside), (bx, by))


def tissue_for_slide(
    reader: Any, *, mpp_l0: float | None, detect: bool = True, roi: str | Path | None = None
) -> TissueMask:
    """The region a run processes: detected tissue (or the whole slide), within --roi.

    reader: an open SlideReader (its properties and `thumbnail`); mpp_l0: µm per level-0 px.
    """
    props = reader.properties
    w, h = props.size_l0
    if detect:
        thumb, downsample = reader.thumbnail(2048)
        mask = detect_tissue(thumb, downsample, mpp_l0=mpp_l0, slide_size_l0=(w, h))
    else:
        mask = TissueMask.full(w, h)
    if roi is not None:
        mask = mask.restrict_to(roi_for_slide(roi, (w, h), props.bounds_l0))
    return mask


def no_tissue_advice(*, roi_given: bool, detect: bool) -> str:
    """What to tell a user whose run found no tissue (one line, no file name)."""
    if roi_given and detect:
        return (
            "no tissue found inside the --roi region, so no nuclei; if the region does hold tissue, "
            "run with --no-tissue-detection"
        )
    if roi_given:
        return "the --roi region holds no part of the slide, so no nuclei"
    return (
        "no tissue found, so no nuclei; if the slide does hold tissue, run with --no-tissue-detection "
        "or give the region with --roi"
    )


def _read_geojson(path: Path) -> Any:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise RoiError(f"cannot read region file {path}: {exc.strerror or exc}; check the --roi path") from exc
    try:
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
        return json.loads(raw.decode("utf-8"))
    except (OSError, EOFError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RoiError(f"region file {path} is not GeoJSON ({exc}); export the annotations from QuPath as GeoJSON") from exc


def _region(data: Any, path: Path, class_name: str | None) -> shapely.MultiPolygon:
    """The polygonal part of a parsed GeoJSON document, in the file's coordinates."""
    geoms: list[shapely.Geometry] = []
    skipped = 0
    try:
        for geom_dict in _geometries(data, class_name):
            geom = shapely.geometry.shape(geom_dict)
            if geom.geom_type in ("Polygon", "MultiPolygon"):
                geoms.append(geom)
            elif geom.geom_type == "GeometryCollection":
                parts = [g for g in shapely.get_parts(geom) if g.geom_type in ("Polygon", "MultiPolygon")]
                skipped += len(shapely.get_parts(geom)) - len(parts)
                geoms.extend(parts)
            else:
                skipped += 1
    except (KeyError, TypeError, ValueError, AttributeError, shapely.errors.GEOSException) as exc:
        raise RoiError(f"region file {path} has a malformed geometry ({exc}); re-export it as GeoJSON") from exc
    if skipped:
        log.warning("%s: skipped %d non-polygon geometries", path, skipped)
    parts = [_as_multipolygon(g) for g in geoms]  # each made valid before the union
    region = _as_multipolygon(shapely.union_all(parts)) if parts else shapely.MultiPolygon()
    if region.is_empty:
        which = f" classified {class_name!r}" if class_name else ""
        raise RoiError(f"region file {path} has no Polygon or MultiPolygon{which}; draw an area annotation and export it")
    return region


def _shifted(region: shapely.MultiPolygon, offset: tuple[float, float]) -> shapely.MultiPolygon:
    dx, dy = float(offset[0]), float(offset[1])
    if dx or dy:
        region = _as_multipolygon(shapely.transform(region, lambda c: c + np.array([dx, dy])))
    return region


def _geometries(data: Any, class_name: str | None) -> Iterator[dict[str, Any]]:
    """Geometry dicts of a parsed GeoJSON document (features filtered by class name)."""
    if isinstance(data, list):
        for item in data:
            yield from _geometries(item, class_name)
        return
    if not isinstance(data, dict):
        raise TypeError(f"expected a GeoJSON object, got {type(data).__name__}")
    kind = data.get("type")
    if kind == "FeatureCollection":
        yield from _geometries(data.get("features") or [], class_name)
    elif kind == "Feature":
        if class_name is not None and _class_of(data) != class_name:
            return
        if data.get("geometry") is not None:
            yield data["geometry"]
    elif kind in ("Polygon", "MultiPolygon", "GeometryCollection", "Point", "MultiPoint", "LineString", "MultiLineString"):
        if class_name is None:
            yield data
    else:
        raise ValueError(f"unknown GeoJSON type {kind!r}")


def _class_of(feature: dict[str, Any]) -> str | None:
    cls = (feature.get("properties") or {}).get("classification")
    if isinstance(cls, str):
        return cls
    if isinstance(cls, dict):
        name = cls.get("name")
        if name is None and isinstance(cls.get("names"), list):
            name = ": ".join(str(n) for n in cls["names"])
        return None if name is None else str(name)
    return None
