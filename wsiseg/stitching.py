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
from typing import Sequence

import cv2
import numpy as np
import shapely

from wsiseg import stitch_kernels as kernels
from wsiseg.models.protocols import TileMasks
from wsiseg.nuclei import NucleusTable
from wsiseg.stain import hematoxylin_tables

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


def absorb_enclosed(canvas: np.ndarray, bbox_px: np.ndarray) -> None:
    """Merge every mask lying in a hole of another mask into that mask, in place.

    canvas: (h, w) int32 label canvas (0 background).  A hole of mask j is a set of pixels
    not in j that no 4-connected path of non-j pixels joins to the outside of j's bounding box
    (the dual of the 8-connected outline `trace_outline` follows, which fills holes).  Labelled
    pixels in such a hole take label j; background pixels stay 0 (the outline covers them).
    Masks are visited in increasing label order.  bbox_px: (P, 4) int32 boxes (x0, y0, x1,
    y1) holding every pixel of label i + 1 (`TileMasks.bbox_px`).
    """
    kernels.absorb_enclosed(canvas, np.ascontiguousarray(bbox_px, np.int32))


@dataclass(frozen=True)
class TileOutlines:
    """One tile's owned nuclei before polygons: what `tile_outlines` hands to `finish_nuclei`.

    corners: (M, 2) int64 outline corners (x, y) in the working frame, ring i ending (exclusive)
    at ends[i]; values: (K, 7) float64 m00, mu20, mu11, mu02, perimeter, hull area (working
    px) and mean haematoxylin density; touches, score, iou, class_id: (K,) per nucleus.
    """

    corners: np.ndarray
    ends: np.ndarray
    values: np.ndarray
    touches: np.ndarray
    score: np.ndarray
    iou: np.ndarray
    class_id: np.ndarray


@dataclass(frozen=True)
class TileInput:
    """One segmentor tile as `batch_outlines` takes it.

    origin_px: (x0, y0) of the tile in the working frame.  masks: one per prompt, owned first,
    then context.  n_owned: how many prompts the tile owns.  prompt_ids, prompt_score,
    prompt_class: (P,) global prompt index (int64), prompter score and class of each prompt.
    """

    origin_px: tuple[int, int]
    masks: TileMasks
    n_owned: int
    prompt_ids: np.ndarray
    prompt_score: np.ndarray
    prompt_class: np.ndarray


def tile_outlines(
    *,
    tile_origin_px: tuple[int, int],
    tile_shape: tuple[int, int],
    masks: TileMasks,
    n_owned: int,
    prompt_ids: np.ndarray,
    prompt_score: np.ndarray,
    prompt_class: np.ndarray,
    image: np.ndarray,
    min_area_px: int = 1,
    image_size_px: tuple[int, int] | None = None,
) -> TileOutlines | None:
    """The outlines and pixel measurements of a tile's first `n_owned` prompts (see
    `stitch_tile` for the arguments); None when none is left."""
    return batch_outlines(
        [TileInput((int(tile_origin_px[0]), int(tile_origin_px[1])), masks, n_owned, prompt_ids, prompt_score,
                   prompt_class)],
        np.asarray(image)[None], min_area_px=min_area_px, image_size_px=image_size_px,
    )


def batch_outlines(
    tiles: Sequence[TileInput],
    images: np.ndarray,
    *,
    min_area_px: int = 1,
    image_size_px: tuple[int, int] | None = None,
) -> TileOutlines | None:
    """The owned nuclei of a batch of tiles, in tile order, as one TileOutlines (the rows of
    `tile_outlines` of each tile, one after another); None when none is left.

    images: (T, h, w, 3) uint8, the tiles' RGB pixels (every tile h x w px).  One compiled
    call does the whole batch (`stitch_kernels.batch_nuclei`); the owner rule per tile:
    higher IoU wins, among equals the lower global prompt index (the higher prompter score).
    Raises ValueError when a mask's box leaves its tile or its shape is not its box's.
    """
    images = np.asarray(images)
    h, w = images.shape[1:3]
    work = [k for k, t in enumerate(tiles) if t.n_owned > 0]
    if not work:
        return None
    todo = [tiles[k] for k in work]
    counts = np.array([len(t.masks.masks) for t in todo], np.int64)
    first = np.zeros(len(todo) + 1, np.int64)
    np.cumsum(counts, out=first[1:])
    tile_of = np.repeat(np.arange(len(todo)), counts)
    bbox = np.concatenate([t.masks.bbox_px for t in todo]).astype(np.int32)
    iou = np.concatenate([t.masks.iou for t in todo])
    masks = [m for t in todo for m in t.masks.masks]
    sizes = np.array([m.size for m in masks], np.int64)
    box = bbox.astype(np.int64)
    used = (box[:, 2] > box[:, 0]) & (box[:, 3] > box[:, 1])
    outside = used & ((box[:, 0] < 0) | (box[:, 1] < 0) | (box[:, 2] > w) | (box[:, 3] > h))
    wrong = used & (sizes != (box[:, 2] - box[:, 0]) * (box[:, 3] - box[:, 1]))
    if outside.any() or wrong.any():
        i = int(np.flatnonzero(outside | wrong)[0])
        raise ValueError(
            f"segmentor mask {i - first[tile_of[i]]}: box {box[i].tolist()} must lie in the {w}x{h} tile and the "
            f"mask's shape {masks[i].shape} must be its (height, width)"
        )
    sizes[~used] = 0  # empty boxes paint nothing
    bbox[~used] = 0  # and are skipped by every kernel, whatever their corners
    offsets = np.zeros(len(sizes), np.int64)
    np.cumsum(sizes[:-1], out=offsets[1:])
    flat = np.concatenate([m.ravel() for m, u in zip(masks, used) if u] or [np.zeros(0, bool)])
    # paint order: lowest priority first, per tile (lexsort is stable; the tile is its first key)
    prompt_ids = np.concatenate([np.asarray(t.prompt_ids, np.int64) for t in todo])
    order = np.lexsort((-prompt_ids, iou, tile_of)) - np.repeat(first[:-1], counts)
    origins = np.array([t.origin_px for t in todo], np.int64).reshape(-1, 2)
    rows, ends, corners, values, touches = kernels.batch_nuclei(
        np.array([h, w], np.int64), origins, np.array(image_size_px or (-1, -1), np.int64), bbox, first,
        np.array([t.n_owned for t in todo], np.int64), flat.view(np.bool_), offsets, order,
        np.ascontiguousarray(images[work] if len(work) < len(tiles) else images), hematoxylin_tables(),
        float(min_area_px),
    )
    if not len(rows):
        return None
    score = np.concatenate([t.prompt_score for t in todo])[rows]
    class_id = np.concatenate([t.prompt_class for t in todo])[rows]
    return TileOutlines(corners, ends, values, touches, score, iou[rows], class_id)


def finish_nuclei(tiles: Sequence[TileOutlines | None], transform: FrameTransform) -> NucleusTable:
    """Level-0 polygons and measurements of the nuclei of `tiles`, in their order, as one table
    (the same rows as `NucleusTable.concat` of each tile's own)."""
    parts = [t for t in tiles if t is not None]
    if not parts:
        return NucleusTable.empty()
    base = np.cumsum([0] + [len(t.corners) for t in parts[:-1]])
    ends = np.concatenate([t.ends + b for t, b in zip(parts, base)])
    corners = np.concatenate([t.corners for t in parts])
    values = np.concatenate([t.values for t in parts])
    touches = np.concatenate([t.touches for t in parts])
    score, iou, class_id = (np.concatenate([getattr(t, k) for t in parts]) for k in ("score", "iou", "class_id"))
    starts = np.concatenate([[0], ends[:-1]])
    s = np.broadcast_to(np.asarray(transform.scale, np.float64), (2,))
    # closed rings, working frame and level 0 (GeoArrow: one ring per polygon)
    coords_w = np.insert(corners, ends, corners[starts], axis=0).astype(np.float64)
    coords_l0 = coords_w * s
    ring_offsets = np.concatenate([[0], ends + np.arange(1, len(ends) + 1)])
    geom_offsets = np.arange(len(ends) + 1)
    # pixel-edge outlines: area, perimeter and hull area are exact from the kernel; an outline
    # the slide's box cuts is measured again by shapely
    area_w, perimeter_w, hull_area = values[:, 0].copy(), values[:, 4].copy(), values[:, 5].copy()
    bounds_l0 = _ring_bounds(coords_l0, ring_offsets)
    polys_l0 = _from_rings(coords_l0, ring_offsets)
    clipped = False
    if transform.clip_l0 is not None:
        clip = np.asarray(transform.clip_l0, np.float64)
        box_w = clip / np.tile(s, 2)
        if _beyond(_ring_bounds(coords_w, ring_offsets), box_w).any():
            polys_w, cut = _clip(_from_rings(coords_w, ring_offsets), box_w)
            area_w[cut] = shapely.area(polys_w[cut])
            perimeter_w[cut] = shapely.length(polys_w[cut])
            hull_area[cut] = shapely.area(shapely.convex_hull(polys_w[cut]))
        if _beyond(bounds_l0, clip).any():
            clipped = True
            polys_l0, _ = _clip(polys_l0, clip)
            keep = ~shapely.is_empty(polys_l0)
            if not keep.all():
                polys_l0, values, touches = polys_l0[keep], values[keep], touches[keep]
                score, iou, class_id = score[keep], iou[keep], class_id[keep]
                area_w, perimeter_w, hull_area = area_w[keep], perimeter_w[keep], hull_area[keep]
                if not len(values):
                    return NucleusTable.empty()
    ecc, major, minor = _shape_moments(values[:, :4])
    mpp = transform.mpp
    measurements = {
        "score": score,
        "iou": iou,
        "area_um2": area_w * mpp * mpp,
        "perimeter_um": perimeter_w * mpp,
        "solidity": np.where(hull_area > 0, area_w / np.maximum(hull_area, 1e-9), 0.0),
        "eccentricity": ecc,
        "major_axis_um": major * mpp,
        "minor_axis_um": minor * mpp,
        "hematoxylin_od_mean": values[:, 6],
    }
    if clipped:
        return NucleusTable.from_polygons(polys_l0, class_id, measurements, touches)
    # nothing clipped: the rings are the table's (what from_polygons would read back from shapely)
    centroid = shapely.get_coordinates(shapely.centroid(polys_l0))
    return NucleusTable(
        coords_l0, ring_offsets, geom_offsets, centroid, bounds_l0, class_id, shapely.area(polys_l0), measurements,
        touches,
    )


def stitch_tile(
    *,
    tile_origin_px: tuple[int, int],
    tile_shape: tuple[int, int],
    masks: TileMasks,
    n_owned: int,
    prompt_ids: np.ndarray,
    prompt_score: np.ndarray,
    prompt_class: np.ndarray,
    image: np.ndarray,
    transform: FrameTransform,
    min_area_px: int = 1,
    image_size_px: tuple[int, int] | None = None,
) -> NucleusTable:
    """Finished nuclei for the first `n_owned` prompts of a tile.

    tile_origin_px: (x0, y0) of the tile in the working frame.  masks: one per prompt (owned
    first, then context).  prompt_ids/score/class: (P,) global index, prompter score, class.
    image: (h, w, 3) uint8 RGB tile; a nucleus' `hematoxylin_od_mean` is the mean of
        `wsiseg.stain.hematoxylin_od` over its pixels.
    min_area_px: nuclei left with fewer working pixels after overlap resolution are dropped.
    image_size_px: (width, height) of the working frame; mask pixels outside it (where the
        tile holds mirrored content) are not part of any nucleus.
    Returns a NucleusTable in level-0 coordinates, rows in owned-prompt order, empty masks dropped.
    """
    outlines = tile_outlines(
        tile_origin_px=tile_origin_px, tile_shape=tile_shape, masks=masks, n_owned=n_owned, prompt_ids=prompt_ids,
        prompt_score=prompt_score, prompt_class=prompt_class, image=image, min_area_px=min_area_px,
        image_size_px=image_size_px,
    )
    return finish_nuclei([outlines], transform)


def warm_up() -> None:
    """Load the compiled stitching and label-raster kernels (numba's disk cache; compiled on a
    fresh install) by stitching one tiny tile, so the first real tile does not wait for them.
    wsiseg calls it in a background thread when a process loads its models."""
    from wsiseg.writers.labels import rasterize_polygons

    masks = TileMasks(np.array([[2, 2, 6, 6]], np.int32), [np.ones((4, 4), bool)], np.ones(1, np.float32))
    table = stitch_tile(
        tile_origin_px=(0, 0), tile_shape=(8, 8), masks=masks, n_owned=1, prompt_ids=np.zeros(1, np.int64),
        prompt_score=np.ones(1, np.float32), prompt_class=np.zeros(1, np.int16), image=np.zeros((8, 8, 3), np.uint8),
        transform=FrameTransform(1.0, 1.0),
    )
    rasterize_polygons(np.zeros((8, 8), np.uint32), table.coords, table.ring_offsets, table.geom_offsets, np.ones(1))


def _clip(polys: np.ndarray, box: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Polygons clipped to box (x0, y0, x1, y1), and which of them reach beyond it (only
    those are touched).  A polygon the box cuts in two keeps its largest part; one wholly
    outside becomes empty."""
    b = shapely.bounds(polys)
    out = (b[:, 0] < box[0]) | (b[:, 1] < box[1]) | (b[:, 2] > box[2]) | (b[:, 3] > box[3])
    if not out.any():
        return polys, out
    polys = polys.copy()
    clipped = shapely.clip_by_rect(polys[out], *box)
    for k, geom in zip(np.flatnonzero(out), clipped):
        if geom.geom_type == "MultiPolygon" or geom.geom_type == "GeometryCollection":
            parts = [g for g in geom.geoms if g.geom_type == "Polygon"]
            geom = max(parts, key=lambda g: g.area) if parts else shapely.Polygon()
        polys[k] = geom if geom.area > 0 else shapely.Polygon()
    return polys, out


def _from_rings(coords: np.ndarray, ring_offsets: np.ndarray) -> np.ndarray:
    """Single-ring shapely Polygons from closed rings coords[ring_offsets[i]:ring_offsets[i + 1]]."""
    geom_offsets = np.arange(len(ring_offsets))
    return shapely.from_ragged_array(shapely.GeometryType.POLYGON, coords, (ring_offsets, geom_offsets))


def _ring_bounds(coords: np.ndarray, ring_offsets: np.ndarray) -> np.ndarray:
    """(R, 4) xmin, ymin, xmax, ymax of every ring (the values `shapely.bounds` gives)."""
    at = ring_offsets[:-1]
    return np.concatenate([np.minimum.reduceat(coords, at, axis=0), np.maximum.reduceat(coords, at, axis=0)], axis=1)


def _beyond(bounds: np.ndarray, box: np.ndarray) -> np.ndarray:
    """Which (N, 4) bounds reach beyond box (x0, y0, x1, y1)."""
    return (bounds[:, 0] < box[0]) | (bounds[:, 1] < box[1]) | (bounds[:, 2] > box[2]) | (bounds[:, 3] > box[3])


def _shape_moments(mom: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Eccentricity, major and minor axis (px; 4*sqrt of the covariance eigenvalues, as for an
    ellipse) from (K, 4) moments m00, mu20, mu11, mu02 of filled polygons."""
    n = mom[:, 0]
    cxx, cxy, cyy = mom[:, 1] / n, mom[:, 2] / n, mom[:, 3] / n
    half_tr, det = (cxx + cyy) / 2, cxx * cyy - cxy * cxy
    root = np.sqrt(np.maximum(half_tr * half_tr - det, 0.0))
    l1, l2 = half_tr + root, np.maximum(half_tr - root, 0.0)
    ecc = np.sqrt(1 - l2 / np.where(l1 > 0, l1, 1.0))
    return np.where(l1 > 0, ecc, 0.0), 4 * np.sqrt(l1), 4 * np.sqrt(l2)
