"""Which polygons are certainly valid, without GEOS: pixel-edge outlines checked in one compiled pass.

The GeoJSON writer must know which polygons GEOS (`shapely.is_valid`) rejects or measures with
zero area after rounding, and repair those.  Edge-traced nuclei are rectilinear rings with
integer vertices; for them an exact test is cheap: a closed ring whose segments alternate
between horizontal and vertical, all of non-zero length, is simple exactly when no two
non-adjacent segments meet (an axis-parallel segment is its own bounding box, so two meet
exactly when their boxes do; adjacent perpendicular segments share only their common end).
A simple ring with at least four corners is a valid polygon (OGC simple features: a simple,
closed ring of at least four positions), and with integer vertices its shoelace area is exact
in float64, so at least 1.  Every other polygon (holes, diagonal or non-integer edges, huge
rings) is left to GEOS.
"""

from __future__ import annotations

import numpy as np

from wsiseg.compiled import compiled

__all__ = ["certainly_valid"]

#: Rings with more corners are left to GEOS (the pairwise test is quadratic in the corners).
MAX_CORNERS = 4096
#: Largest |coordinate| and ring extent (px) for which the exactness argument holds.
_MAX_COORD = 2.0**31
_MAX_EXTENT = 2.0**20


def certainly_valid(coords: np.ndarray, ring_offsets: np.ndarray, geom_offsets: np.ndarray) -> np.ndarray:
    """(N,) bool: True where the polygon is certainly valid with positive area for GEOS.

    coords: (M, 2) float64 vertices; ring_offsets (R + 1,) and geom_offsets (N + 1,) int64:
    GeoArrow polygons, rings closed.  True only for a single-ring polygon whose ring is a
    simple rectilinear ring with integer vertices (see the module docstring); False says
    nothing (GEOS decides).
    """
    return _certainly_valid(
        np.ascontiguousarray(coords, np.float64),
        np.ascontiguousarray(ring_offsets, np.int64),
        np.ascontiguousarray(geom_offsets, np.int64),
    )


@compiled
def _certainly_valid(coords: np.ndarray, ring_offsets: np.ndarray, geom_offsets: np.ndarray) -> np.ndarray:
    n = geom_offsets.shape[0] - 1
    out = np.zeros(n, np.bool_)
    boxes = np.empty((64, 4), np.float64)  # scratch: one box per segment, grown as needed
    for p in range(n):
        if geom_offsets[p + 1] - geom_offsets[p] != 1:
            continue  # holes: GEOS
        r = geom_offsets[p]
        k = ring_offsets[r + 1] - ring_offsets[r] - 1
        if boxes.shape[0] < k:
            boxes = np.empty((max(k, 2 * boxes.shape[0]), 4), np.float64)
        out[p] = _simple_rectilinear(coords, ring_offsets[r], ring_offsets[r + 1], boxes)
    return out


@compiled
def _simple_rectilinear(coords: np.ndarray, start: int, end: int, boxes: np.ndarray) -> bool:
    """Whether coords[start:end] (closed: last == first) is a simple rectilinear ring with
    integer vertices, alternating horizontal and vertical segments of non-zero length.
    boxes: scratch of at least end - start - 1 rows."""
    k = end - start - 1  # segments (= corners)
    if k < 4 or k > MAX_CORNERS or k % 2:
        return False
    if coords[start, 0] != coords[end - 1, 0] or coords[start, 1] != coords[end - 1, 1]:
        return False
    x_lo = x_hi = coords[start, 0]
    y_lo = y_hi = coords[start, 1]
    for i in range(start, end - 1):
        x, y = coords[i, 0], coords[i, 1]
        if not (abs(x) < _MAX_COORD and abs(y) < _MAX_COORD) or x != np.floor(x) or y != np.floor(y):
            return False
        x_lo, x_hi, y_lo, y_hi = min(x_lo, x), max(x_hi, x), min(y_lo, y), max(y_hi, y)
    if x_hi - x_lo > _MAX_EXTENT or y_hi - y_lo > _MAX_EXTENT:
        return False
    # segment s joins corner start + s to start + s + 1; horizontal ones alternate with vertical
    first_horizontal = coords[start, 1] == coords[start + 1, 1]
    for s in range(k):
        a, b = start + s, start + s + 1
        horizontal = coords[a, 1] == coords[b, 1]
        vertical = coords[a, 0] == coords[b, 0]
        if horizontal == vertical:  # diagonal, or of zero length
            return False
        if horizontal != (first_horizontal == (s % 2 == 0)):
            return False
        boxes[s, 0], boxes[s, 1] = min(coords[a, 0], coords[b, 0]), min(coords[a, 1], coords[b, 1])
        boxes[s, 2], boxes[s, 3] = max(coords[a, 0], coords[b, 0]), max(coords[a, 1], coords[b, 1])
    # no two non-adjacent segments meet (segments s and s + 1, and the last and the first, are adjacent)
    for s in range(k - 2):
        sx0, sy0, sx1, sy1 = boxes[s, 0], boxes[s, 1], boxes[s, 2], boxes[s, 3]
        for t in range(s + 2, k - 1 if s == 0 else k):
            if boxes[t, 2] >= sx0 and boxes[t, 0] <= sx1 and boxes[t, 3] >= sy0 and boxes[t, 1] <= sy1:
                return False
    return True
