"""The compiled validity certificate never vouches for a polygon GEOS would reject."""

from __future__ import annotations

import numpy as np
import shapely
from scipy import ndimage as ndi

from wsiseg.stitching import trace_outline
from wsiseg.writers.simple_rings import certainly_valid


def _ragged(polys: list[shapely.Polygon]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    _, coords, (ring_offsets, geom_offsets) = shapely.to_ragged_array(np.array(polys, dtype=object))
    return coords, ring_offsets, geom_offsets


def _traced_outlines(rng: np.random.Generator, n: int) -> list[np.ndarray]:
    """Pixel-edge outlines of random blobs (simple rings: the traced part is 4-connected and its
    holes are filled, so it never touches itself)."""
    rings = []
    while len(rings) < n:
        m = ndi.binary_opening(rng.random((12, 12)) < 0.6) | (rng.random((12, 12)) < 0.08)
        lab, k = ndi.label(m)
        if k == 0:
            continue
        part = lab == 1 + int(np.argmax(ndi.sum(m, lab, range(1, k + 1))))
        ring = trace_outline(part)
        if len(ring) >= 4:
            rings.append(ring + rng.integers(-50, 5000, 2))
    return rings


def _mutated(rng: np.random.Generator, ring: np.ndarray) -> np.ndarray:
    """The ring with one random change: an edge shifted across (still rectilinear, maybe crossing
    or touching another edge, or of zero length), a moved, repeated, inserted or fractional vertex."""
    ring = ring.astype(np.float64)
    i = int(rng.integers(len(ring)))
    kind = int(rng.integers(6)) if rng.random() < 0.5 else 5
    if kind == 5:
        j = (i + 1) % len(ring)
        axis = 1 if ring[i, 1] == ring[j, 1] else 0  # a horizontal edge moves in y, a vertical one in x
        ring[[i, j], axis] += rng.integers(-4, 5)
    elif kind == 0:
        ring[i] += rng.integers(-2, 3, 2)  # diagonal edges, crossings, or nothing
    elif kind == 1:
        ring = np.insert(ring, i, ring[i], axis=0)  # a repeated vertex
    elif kind == 2:
        ring = np.insert(ring, i, (ring[i] + ring[i - 1]) / 2, axis=0)  # a straight-through vertex
    elif kind == 3:
        ring[i] += 0.25  # off the integer grid
    else:
        ring[i] = ring[(i + 2) % len(ring)]  # a spike or a zero-length edge
    return ring


def _rectilinear(poly: shapely.Polygon) -> bool:
    xy = np.asarray(poly.exterior.coords)
    step = np.diff(xy, axis=0)
    return bool(((step[:, 0] == 0) ^ (step[:, 1] == 0)).all() and (xy == np.round(xy)).all())


def test_a_vouched_polygon_is_valid_with_positive_area_for_geos() -> None:
    rng = np.random.default_rng(0)
    outlines = _traced_outlines(rng, 400)
    polys = [shapely.Polygon(r) for r in outlines] + [shapely.Polygon(_mutated(rng, r)) for r in outlines]
    polys += [shapely.box(0, 0, 8, 8).difference(shapely.box(2, 2, 4, 4)), shapely.box(1, 1, 2, 2)]  # a hole; 1 px
    sure = certainly_valid(*_ragged(polys))
    geos = shapely.is_valid(np.array(polys)) & (shapely.area(np.array(polys)) > 0)
    assert not (sure & ~geos).any()
    # it vouches for every traced outline, and the changed ones include polygons GEOS rejects
    traced = np.arange(len(polys)) < len(outlines)
    assert sure[traced].all() and geos[traced].all()
    assert (~geos[~traced]).sum() > 50 and (sure[~traced] & geos[~traced]).sum() > 50
    rectilinear_invalid = ~traced & ~geos & np.array([_rectilinear(p) for p in polys])
    assert rectilinear_invalid.sum() > 20  # crossings and contacts the pairwise test must find
    assert not sure[-2] and sure[-1]


def test_rings_with_holes_fractions_or_slants_are_left_to_geos() -> None:
    polys = [
        shapely.Polygon([(0, 0), (4, 0), (4, 4), (0, 4)], [[(1, 1), (2, 1), (2, 2), (1, 2)]]),
        shapely.Polygon([(0, 0), (4.5, 0), (4.5, 4), (0, 4)]),
        shapely.Polygon([(0, 0), (4, 0), (0, 4)]),
        shapely.Polygon([(0, 0), (4, 0), (4, 4), (0, 4)]),
    ]
    assert certainly_valid(*_ragged(polys)).tolist() == [False, False, False, True]


def test_a_figure_eight_is_refused_whichever_vertex_its_ring_starts_at() -> None:
    # one crossing, at (2, 2): with 6 edges it pairs edges (0, 3), (1, 4) or (2, 5), the last
    # (closing) edge included
    ring = [(2, 0), (0, 0), (0, 2), (4, 2), (4, 4), (2, 4)]
    polys = [shapely.Polygon(ring[k:] + ring[:k]) for k in range(len(ring))]
    assert not shapely.is_valid(np.array(polys)).any()
    assert not certainly_valid(*_ragged(polys)).any()
