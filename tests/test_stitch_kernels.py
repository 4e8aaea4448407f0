"""The compiled stitching kernels give OpenCV's numbers bit for bit (wsiseg.stitch_kernels)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import shapely
from scipy import ndimage as ndi

from wsiseg import stitch_kernels as kernels
from wsiseg.stitching import trace_outline


def _random_masks(n: int, seed: int) -> list[np.ndarray]:
    """Sparse noise (many parts, holes and corner-only contacts), smooth blobs and dense noise."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        h, w = (int(v) for v in rng.integers(1, 28, 2))
        if i % 3 == 0:
            m = rng.random((h, w)) < rng.uniform(0.3, 0.8)
        elif i % 3 == 1:
            m = ndi.gaussian_filter(rng.random((h, w)), rng.uniform(0.5, 2)) > rng.uniform(0.45, 0.55)
        else:
            m = rng.random((h, w)) < 0.9
        out.append(m)
    return out


def _kernel_part(m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The kernel's largest part of m as a bool mask, and its runs."""
    h, w = m.shape
    runs = np.empty((h * (w + 1) // 2 + 2, 6), np.int64)
    n = kernels._largest_part(m.astype(np.int32), 1, 0, 0, h, w, runs)
    part = np.zeros((h, w), bool)
    for r, c0, c1 in runs[:n, :3]:
        part[r, c0:c1] = True
    return part, runs[:n, :3].copy()


def test_largest_part_is_opencvs_largest_4_connected_component_first_of_equals() -> None:
    checked = 0
    for m in _random_masks(1500, seed=1):
        part, _ = _kernel_part(m)
        n, lab, stats, _ = cv2.connectedComponentsWithStats(m.view(np.uint8), connectivity=4)
        if n < 2:
            assert not part.any()
            continue
        expected = lab == 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
        assert np.array_equal(part, expected)
        checked += 1
    assert checked > 1000


def _corner_contacts(part: np.ndarray) -> set[tuple[int, int]]:
    """Vertices (x, y) where two cells of `part` touch only at that corner."""
    p = np.pad(part, 1)
    a, b, c, d = p[:-1, :-1], p[:-1, 1:], p[1:, :-1], p[1:, 1:]
    ys, xs = np.nonzero((a & d & ~b & ~c) | (b & c & ~a & ~d))
    return {(int(x), int(y)) for x, y in zip(xs, ys)}


def test_outline_moments_hull_and_mean_equal_opencv_and_shapely_bit_for_bit() -> None:
    rng = np.random.default_rng(2)
    pinches = 0
    for m in _random_masks(1500, seed=3):
        part, runs = _kernel_part(m)
        if not part.any():
            continue
        h, w = m.shape
        ring = np.empty((2 * (h + 1) * (w + 1) + 4, 2), np.int64)
        k = kernels._trace(part.view(np.uint8), 1, h, w, int(runs[0, 1]), int(runs[0, 0]), ring)
        expected = trace_outline(part)
        assert np.array_equal(ring[:k], expected)
        pinches += _corner_contacts(part) & {tuple(p) for p in expected.tolist()} != set()
        got = kernels._moments(ring, k)
        mo = cv2.moments(expected.astype(np.float32))
        assert got == (mo["m00"], mo["mu20"], mo["mu11"], mo["mu02"])
        hull = kernels._hull_area(ring, k, np.empty(2 * len(ring) + 2, np.int64))
        assert hull == shapely.convex_hull(shapely.Polygon(expected)).area
        # the density mean: a double sum in raster order times 1 / count, as cv2.mean
        od = (rng.random((h, w)) * 3).astype(np.float32)
        total = 0.0
        for v in od[part]:
            total += float(v)
        assert total * (1.0 / part.sum()) == cv2.mean(od, part.view(np.uint8))[0]
    assert pinches > 20  # outlines passing corner-only contacts (the walk's one choice) were compared too


def _absorb_reference(canvas: np.ndarray) -> None:
    """The rule by SciPy and OpenCV: for each label in order, 4-connected components of the
    other cells of its padded box; labelled cells not joined to the padding take the label."""
    for j, sl in enumerate(ndi.find_objects(canvas), start=1):
        if sl is None:
            continue
        crop = canvas[sl]
        not_j = np.ones((crop.shape[0] + 2, crop.shape[1] + 2), np.uint8)
        not_j[1:-1, 1:-1] = crop != j
        _, lab = cv2.connectedComponents(not_j, connectivity=4)
        crop[(lab[1:-1, 1:-1] != lab[0, 0]) & (crop > 0) & (crop != j)] = j


@pytest.mark.parametrize("seed", range(4))
def test_absorb_enclosed_equals_the_reference_rule_on_random_canvases(seed: int) -> None:
    rng = np.random.default_rng(seed)
    merged = 0
    for _ in range(60):
        h, w = (int(v) for v in rng.integers(8, 40, 2))
        canvas = np.zeros((h, w), np.int32)
        boxes = []
        for i in range(int(rng.integers(1, 9))):
            x0, y0 = int(rng.integers(0, w - 2)), int(rng.integers(0, h - 2))
            x1, y1 = int(rng.integers(x0 + 1, w + 1)), int(rng.integers(y0 + 1, h + 1))
            shape = rng.random((y1 - y0, x1 - x0)) < 0.8
            if rng.random() < 0.5 and min(x1 - x0, y1 - y0) >= 3:  # a ring: room for others in its hole
                shape[1:-1, 1:-1] &= rng.random((y1 - y0 - 2, x1 - x0 - 2)) < 0.2
            canvas[y0:y1, x0:x1][shape] = i + 1
            boxes.append((x0, y0, x1, y1))
        expected = canvas.copy()
        _absorb_reference(expected)
        got = canvas.copy()
        kernels.absorb_enclosed(got, np.array(boxes, np.int32))
        assert np.array_equal(got, expected)
        merged += int((expected != canvas).any())
    assert merged > 3


def test_paint_masks_puts_later_masks_on_top() -> None:
    canvas = np.zeros((6, 6), np.int32)
    a, b = np.ones((4, 4), bool), np.array([[True, False], [True, True]])
    bbox = np.array([[0, 0, 4, 4], [3, 3, 5, 5]], np.int32)
    flat = np.concatenate([a.ravel(), b.ravel()])
    offsets = np.array([0, 16], np.int64)
    kernels.paint_masks(canvas, bbox, flat, offsets, np.array([0, 1]))
    assert canvas[3, 3] == 2 and canvas[3, 4] == 0 and canvas[4, 4] == 2 and canvas[0, 0] == 1
    canvas[:] = 0
    kernels.paint_masks(canvas, bbox, flat, offsets, np.array([1, 0]))
    assert canvas[3, 3] == 1 and canvas[4, 4] == 2
