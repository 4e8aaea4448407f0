"""From one segmentor tile's masks to finished nuclei: overlap resolution, polygons, measurements.

The owner rule: where masks claim the same pixel, the higher predicted IoU wins (ties go to
the lower global prompt index, i.e. the higher prompter score).  Context prompts (owned by a
neighbouring tile) take part in that contest but are not emitted here; their owner emits them.
A mask lying in a hole of another mask (a nucleolus seeded as a nucleus of its own) is merged
into the mask around it, so no polygon ever lies inside another.
Polygons trace pixel edges (pixel (i, j) covers [j, j+1) x [i, i+1)), so a polygon's area
equals its pixel count; level-0 polygons are clipped to the slide (and its bounds box).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import shapely
from scipy import ndimage as ndi

from wsiseg.models.protocols import TileMasks
from wsiseg.nuclei import NucleusTable

_EMPTY_RING = np.zeros((0, 2), np.int64)


@dataclass(frozen=True)
class FrameTransform:
    """Working frame -> level-0: l0 = (tile_origin + px) * scale, scale one number or (x, y)
    per axis (a slide with non-square pixels); mpp of a (square) working pixel; clip_l0:
    (x0, y0, x1, y1) level-0 box polygons are clipped to (the slide, or its bounds box), None
    for no clipping."""

    scale: float | tuple[float, float]
    mpp: float
    clip_l0: tuple[float, float, float, float] | None = None


def trace_outline(mask: np.ndarray) -> np.ndarray:
    """Pixel-edge outline of the largest 8-connected blob of a 2-D bool or uint8 mask.

    Returns (k, 2) int64 vertices (x, y) in the mask's pixel-edge frame, not closed, corners
    only; holes are not traced (the outline encloses them).  Uses a 2x nearest upsampling so
    that OpenCV's centre-based border following lands on pixel edges: with one pixel of
    padding, an upsampled index u maps to the edge u // 2.
    """
    h, w = mask.shape
    up = np.zeros((2 * h + 2, 2 * w + 2), np.uint8)
    up[1:-1, 1:-1] = cv2.resize(mask.view(np.uint8), (2 * w, 2 * h), interpolation=cv2.INTER_NEAREST)
    contours, _ = cv2.findContours(up, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        return _EMPTY_RING
    c = contours[0] if len(contours) == 1 else max(contours, key=cv2.contourArea)
    xy = c[:, 0, :].astype(np.int64) // 2
    xy = xy[(xy != np.concatenate([xy[1:], xy[:1]])).any(axis=1)]  # consecutive duplicates
    if len(xy) < 3:
        return xy
    prev, nxt = np.concatenate([xy[-1:], xy[:-1]]), np.concatenate([xy[1:], xy[:1]])
    straight = ((prev[:, 0] == xy[:, 0]) & (xy[:, 0] == nxt[:, 0])) | ((prev[:, 1] == xy[:, 1]) & (xy[:, 1] == nxt[:, 1]))
    return xy[~straight]


def resolve_overlaps(
    tile_size: tuple[int, int], masks: TileMasks, priority: np.ndarray
) -> np.ndarray:
    """Paint masks into an int32 (h, w) canvas, lowest priority first; values are mask index + 1."""
    canvas = np.zeros(tile_size, np.int32)
    for i in np.argsort(priority, kind="stable"):
        x0, y0, x1, y1 = masks.bbox_px[i]
        if x1 <= x0 or y1 <= y0:
            continue
        region = canvas[y0:y1, x0:x1]
        region[masks.masks[i]] = i + 1
    return canvas


def absorb_enclosed(canvas: np.ndarray) -> None:
    """Merge every mask lying in a hole of another mask into that mask, in place.

    canvas: (h, w) int32 label canvas (0 background).  A hole of mask j is a set of pixels
    not in j that no 4-connected path of non-j pixels joins to the outside of j's bounding box
    (the dual of the 8-connected outline `trace_outline` follows, which fills holes).  Labelled
    pixels in such a hole take label j; background pixels stay 0 (the outline covers them).
    """
    slices = ndi.find_objects(canvas)
    for j, sl in enumerate(slices, start=1):
        if sl is None:
            continue
        crop = canvas[sl]
        not_j = np.ones((crop.shape[0] + 2, crop.shape[1] + 2), np.uint8)
        not_j[1:-1, 1:-1] = crop != j
        n, lab = cv2.connectedComponents(not_j, connectivity=4)
        if n <= 2:  # background plus the single outside component: no hole
            continue
        hole = (lab[1:-1, 1:-1] != lab[0, 0]) & (crop > 0) & (crop != j)
        crop[hole] = j


def stitch_tile(
    *,
    tile_origin_px: tuple[int, int],
    tile_shape: tuple[int, int],
    masks: TileMasks,
    n_owned: int,
    prompt_ids: np.ndarray,
    prompt_score: np.ndarray,
    prompt_class: np.ndarray,
    hematoxylin_od: np.ndarray,
    transform: FrameTransform,
    min_area_px: int = 1,
    image_size_px: tuple[int, int] | None = None,
) -> NucleusTable:
    """Finished nuclei for the first `n_owned` prompts of a tile.

    tile_origin_px: (x0, y0) of the tile in the working frame.  masks: one per prompt (owned
    first, then context).  prompt_ids/score/class: (P,) global index, prompter score, class.
    hematoxylin_od: (h, w) float32 haematoxylin optical density of the tile.
    min_area_px: nuclei left with fewer working pixels after overlap resolution are dropped.
    image_size_px: (width, height) of the working frame; mask pixels outside it (where the
        tile holds mirrored content) are not part of any nucleus.
    Returns a NucleusTable in level-0 coordinates, rows in owned-prompt order, empty masks dropped.
    """
    if n_owned == 0:
        return NucleusTable.empty()
    # Higher IoU wins; among equals the lower global index (the higher prompter score).
    order = np.lexsort((-prompt_ids, masks.iou))
    priority = np.empty(len(order), np.int64)
    priority[order] = np.arange(len(order))
    canvas = resolve_overlaps(tile_shape, masks, priority)
    if image_size_px is not None:
        _clear_outside(canvas, tile_origin_px, image_size_px)
    absorb_enclosed(canvas)
    h, w = tile_shape
    ox, oy = tile_origin_px
    rings: list[np.ndarray] = []
    rows: list[int] = []
    moments: list[tuple[float, float, float, float]] = []
    touches: list[bool] = []
    for i in range(n_owned):
        x0, y0, x1, y1 = masks.bbox_px[i]
        if x1 <= x0 or y1 <= y0:
            continue
        own = (canvas[y0:y1, x0:x1] == i + 1).view(np.uint8)
        n, lab, stats, _ = cv2.connectedComponentsWithStats(own, connectivity=4)
        if n < 2:
            continue  # every pixel went to higher-priority neighbours
        if n > 2:  # split by a neighbour: keep the largest 4-connected part
            own = (lab == 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))).view(np.uint8)
        ring = trace_outline(own)  # the outline encloses any holes: filled
        if len(ring) < 4:
            continue
        m = cv2.moments(ring.astype(np.float32))  # of the filled polygon
        if m["m00"] < min_area_px:
            continue
        moments.append(_shape_moments(m) + (cv2.mean(hematoxylin_od[y0:y1, x0:x1], own)[0],))
        rings.append(ring + np.array([x0 + ox, y0 + oy]))
        rows.append(i)
        touches.append(bool(x0 == 0 or y0 == 0 or x1 == w or y1 == h))
    if not rows:
        return NucleusTable.empty()
    idx = np.asarray(rows)
    s = np.broadcast_to(np.asarray(transform.scale, np.float64), (2,))
    polys_w, polys_l0 = _polygons(rings, (1.0, s))
    if transform.clip_l0 is not None:
        box = np.asarray(transform.clip_l0, np.float64)
        polys_w, polys_l0 = _clip(polys_w, box / np.tile(s, 2)), _clip(polys_l0, box)
        keep = ~shapely.is_empty(polys_l0)
        if not keep.all():
            polys_w, polys_l0, idx, mom = polys_w[keep], polys_l0[keep], idx[keep], np.asarray(moments)[keep]
            touches = list(np.asarray(touches)[keep])
            moments = [tuple(m) for m in mom]
            if not len(idx):
                return NucleusTable.empty()
    mom = np.asarray(moments, np.float64)
    area_w = shapely.area(polys_w)
    hull_area = shapely.area(shapely.convex_hull(polys_w))
    mpp = transform.mpp
    measurements = {
        "score": prompt_score[idx],
        "iou": masks.iou[idx],
        "area_um2": area_w * mpp * mpp,
        "perimeter_um": shapely.length(polys_w) * mpp,
        "solidity": np.where(hull_area > 0, area_w / np.maximum(hull_area, 1e-9), 0.0),
        "eccentricity": mom[:, 0],
        "major_axis_um": mom[:, 1] * mpp,
        "minor_axis_um": mom[:, 2] * mpp,
        "hematoxylin_od_mean": mom[:, 3],
    }
    return NucleusTable.from_polygons(polys_l0, prompt_class[idx], measurements, np.asarray(touches))


def _clear_outside(canvas: np.ndarray, origin: tuple[int, int], image_size: tuple[int, int]) -> None:
    """Zero the canvas where the tile lies beyond the image."""
    ox, oy = origin
    w, h = image_size
    canvas[:, : max(0, -ox)] = 0
    canvas[: max(0, -oy)] = 0
    canvas[:, max(0, w - ox) :] = 0
    canvas[max(0, h - oy) :] = 0


def _clip(polys: np.ndarray, box: np.ndarray) -> np.ndarray:
    """Polygons clipped to box (x0, y0, x1, y1); only those crossing it are touched.  A polygon
    the box cuts in two keeps its largest part; one wholly outside becomes empty."""
    b = shapely.bounds(polys)
    out = (b[:, 0] < box[0]) | (b[:, 1] < box[1]) | (b[:, 2] > box[2]) | (b[:, 3] > box[3])
    if not out.any():
        return polys
    polys = polys.copy()
    clipped = shapely.clip_by_rect(polys[out], *box)
    for k, geom in zip(np.flatnonzero(out), clipped):
        if geom.geom_type == "MultiPolygon" or geom.geom_type == "GeometryCollection":
            parts = [g for g in geom.geoms if g.geom_type == "Polygon"]
            geom = max(parts, key=lambda g: g.area) if parts else shapely.Polygon()
        polys[k] = geom if geom.area > 0 else shapely.Polygon()
    return polys


def _polygons(rings: list[np.ndarray], scales: tuple[Any, ...]) -> list[np.ndarray]:
    """Closed single-ring shapely Polygons from open vertex rings, once per scale factor."""
    lengths = np.array([len(r) + 1 for r in rings])
    ring_offsets = np.concatenate([[0], np.cumsum(lengths)])
    coords = np.concatenate([np.concatenate([r, r[:1]]) for r in rings]).astype(np.float64)
    geom_offsets = np.arange(len(rings) + 1)
    return [
        shapely.from_ragged_array(shapely.GeometryType.POLYGON, coords * scale, (ring_offsets, geom_offsets))
        for scale in scales
    ]


def _shape_moments(m: dict[str, float]) -> tuple[float, float, float]:
    """Eccentricity, major and minor axis (px; 4*sqrt of the covariance eigenvalues, as for an
    ellipse) from the moments of a filled polygon."""
    n = m["m00"]
    cxx, cyy, cxy = m["mu20"] / n, m["mu02"] / n, m["mu11"] / n
    half_tr, det = (cxx + cyy) / 2, cxx * cyy - cxy * cxy
    root = float(np.sqrt(max(half_tr * half_tr - det, 0.0)))
    l1, l2 = half_tr + root, max(half_tr - root, 0.0)
    ecc = float(np.sqrt(1 - l2 / l1)) if l1 > 0 else 0.0
    return ecc, 4 * float(np.sqrt(l1)), 4 * float(np.sqrt(l2))
