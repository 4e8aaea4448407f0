"""Compiled (numba) kernels behind `wsiseg.stitching.batch_outlines` and `stitch_tile`.

One call per batch of tiles (`batch_nuclei`) does, tile after tile, what used to be several
OpenCV and NumPy calls per nucleus: paint the masks into the tile's label canvas, merge masks
lying in holes of others, and, for every owned mask, keep its largest 4-connected part, trace
its pixel-edge outline, take the outline's area moments and the mean haematoxylin density
under the mask.

Each kernel gives the same numbers, bit for bit, as the OpenCV call it replaces; the tests
compare them on random masks (tests/test_stitch_kernels.py):
- outlines: `cv2.findContours` (8-connected border following) on the 2x upsampled mask, as
  `wsiseg.stitching.trace_outline` does;
- parts: `cv2.connectedComponentsWithStats` (4-connectivity), parts numbered in raster order
  of their first pixel, the first of equal largest parts kept;
- moments: `cv2.moments` of the outline (see `_moments`);
- the mean: `cv2.mean` with a mask (a double sum in raster order, times 1 / count).
Compiled on first use and cached on disk (`wsiseg.compiled`); they release the GIL, so a
stitching thread runs beside the model for real.
"""

from __future__ import annotations

import numpy as np

from wsiseg.compiled import compiled as _compiled

# Directions of a step along pixel edges, in left-turn order: down, right, up, left (image
# frame, y down).  Walking this way the traced region is on the walker's left.
_DX = np.array([0, 1, 0, -1], np.int64)
_DY = np.array([1, 0, -1, 0], np.int64)
# The cell on the left of a step leaving vertex (x, y) in each direction is (y + _LY, x + _LX);
# the cell on the right is (y + _RY, x + _RX).
_LX = np.array([0, 0, -1, -1], np.int64)
_LY = np.array([0, -1, -1, 0], np.int64)
_RX = np.array([-1, 0, 0, -1], np.int64)
_RY = np.array([0, 0, -1, -1], np.int64)


@_compiled
def paint_masks(canvas: np.ndarray, bbox: np.ndarray, flat: np.ndarray, offsets: np.ndarray, order: np.ndarray) -> None:
    """Paint masks into `canvas` (int32, (h, w)) in `order`, later ones on top; value = index + 1.

    bbox: (P, 4) int32 x0, y0, x1, y1 (tile px, end exclusive).  flat: every mask's bool
    pixels, row-major, one after another; offsets: (P,) int64 start of mask i in `flat`.
    """
    for k in range(order.shape[0]):
        i = order[k]
        x0, y0, x1, y1 = bbox[i, 0], bbox[i, 1], bbox[i, 2], bbox[i, 3]
        if x1 <= x0 or y1 <= y0:
            continue
        w = x1 - x0
        start = offsets[i]
        for r in range(y1 - y0):
            row = start + r * w
            for c in range(w):
                if flat[row + c]:
                    canvas[y0 + r, x0 + c] = i + 1


@_compiled
def absorb_enclosed(canvas: np.ndarray, bbox: np.ndarray) -> None:
    """Merge every mask lying in a hole of another mask into that mask, in place.

    canvas: (h, w) int32 labels (mask index + 1); bbox: (P, 4) int32 x0, y0, x1, y1 boxes of
    the masks, each holding every pixel of its label.  See `wsiseg.stitching.absorb_enclosed`
    for the rule.  Labels are visited in increasing order; the holes of label j are the cells
    of its box that no 4-connected path of cells other than j joins to the box's outside.
    A box larger than the label's pixels finds the same holes: every cell outside the label's
    own extent is reachable from outside.
    """
    h, w = canvas.shape
    size = 0
    for j in range(bbox.shape[0]):
        size = max(size, (bbox[j, 3] - bbox[j, 1] + 2) * (bbox[j, 2] - bbox[j, 0] + 2))
    reached = np.zeros(size, np.uint8)
    stack = np.empty(size, np.int64)
    for j0 in range(bbox.shape[0]):
        j = j0 + 1
        bx, by = max(bbox[j0, 0], 0), max(bbox[j0, 1], 0)
        bw, bh = min(bbox[j0, 2], w) - bx, min(bbox[j0, 3], h) - by
        if bh < 3 or bw < 3:
            continue  # a hole needs a ring of j around it
        # only labelled cells of other masks, off the box's rim, can change
        candidate = False
        for r in range(1, bh - 1):
            for c in range(1, bw - 1):
                v = canvas[by + r, bx + c]
                if v > 0 and v != j:
                    candidate = True
                    break
            if candidate:
                break
        if not candidate:
            continue
        ph, pw = bh + 2, bw + 2
        reached[: ph * pw] = 0
        reached[0] = 1
        stack[0] = 0
        top = 1
        while top > 0:
            top -= 1
            p = stack[top]
            py, px = p // pw, p % pw
            for q in range(4):
                qy = py + (1 if q == 0 else -1 if q == 1 else 0)
                qx = px + (1 if q == 2 else -1 if q == 3 else 0)
                if qy < 0 or qx < 0 or qy >= ph or qx >= pw or reached[qy * pw + qx]:
                    continue
                if 0 < qy < ph - 1 and 0 < qx < pw - 1 and canvas[by + qy - 1, bx + qx - 1] == j:
                    continue
                reached[qy * pw + qx] = 1
                stack[top] = qy * pw + qx
                top += 1
        for r in range(bh):
            for c in range(bw):
                if not reached[(r + 1) * pw + c + 1]:
                    v = canvas[by + r, bx + c]
                    if v > 0 and v != j:
                        canvas[by + r, bx + c] = j


@_compiled
def _find(parent: np.ndarray, i: int) -> int:
    root = i
    while parent[root] != root:
        root = parent[root]
    while parent[i] != root:  # path compression
        parent[i], i = root, parent[i]
    return root


@_compiled
def _largest_part(canvas: np.ndarray, value: int, x0: int, y0: int, h: int, w: int, runs: np.ndarray) -> int:
    """The largest 4-connected part of (canvas == value) in the box at (x0, y0), h x w.

    Parts are numbered in raster order of their first pixel and the first of equally large
    ones wins (as `cv2.connectedComponentsWithStats` numbers them).  The part's runs are left
    in runs[:n] as (row, first column, end column), in raster order; returns n (0: no part).
    runs: scratch of at least h * (w + 1) // 2 + 1 rows and 6 columns (the 4th to 6th are
    used for union-find parents, row starts and part numbers).
    """
    n_runs = 0
    for r in range(h):
        runs[r, 4] = n_runs  # first run of row r
        c = 0
        while c < w:
            if canvas[y0 + r, x0 + c] != value:
                c += 1
                continue
            c0 = c
            while c < w and canvas[y0 + r, x0 + c] == value:
                c += 1
            runs[n_runs, 0], runs[n_runs, 1], runs[n_runs, 2], runs[n_runs, 3] = r, c0, c, n_runs
            n_runs += 1
    if n_runs == 0:
        return 0
    runs[h, 4] = n_runs
    parent = runs[:, 3]
    for r in range(1, h):  # join runs of consecutive rows that share a column
        i, i_end = runs[r - 1, 4], runs[r, 4]
        j, j_end = runs[r, 4], runs[r + 1, 4]
        while i < i_end and j < j_end:
            if runs[i, 1] < runs[j, 2] and runs[j, 1] < runs[i, 2]:
                a, b = _find(parent, i), _find(parent, j)
                if a != b:
                    parent[max(a, b)] = min(a, b)
            if runs[i, 2] < runs[j, 2]:
                i += 1
            else:
                j += 1
    best_root, best_area = -1, 0
    area = runs[:, 5]
    area[:n_runs] = 0
    for i in range(n_runs):
        root = _find(parent, i)
        area[root] += runs[i, 2] - runs[i, 1]
    for i in range(n_runs):  # roots are each part's first run: raster order
        if parent[i] == i and area[i] > best_area:
            best_root, best_area = i, area[i]
    n = 0
    for i in range(n_runs):
        if _find(parent, i) == best_root:
            runs[n, 0], runs[n, 1], runs[n, 2] = runs[i, 0], runs[i, 1], runs[i, 2]
            n += 1
    return n


@_compiled
def _cell(labels: np.ndarray, part: int, h: int, w: int, y: int, x: int) -> bool:
    return 0 <= y < h and 0 <= x < w and labels[y, x] == part


@_compiled
def _trace(labels: np.ndarray, part: int, h: int, w: int, sx: int, sy: int, out: np.ndarray) -> int:
    """Corners of the outer pixel-edge outline of part `part` of labels[:h, :w] into out (k, 2)
    int64 (x, y); returns k.  (sx, sy): the part's first pixel in raster order; the walk
    starts at its top-left corner and goes down first (the region on the left); where two
    cells of the part touch only at a corner, the walk joins them (8-connected, as OpenCV's
    border following)."""
    x, y, d = sx, sy, 0
    k = 0
    out[k, 0], out[k, 1] = x, y
    k += 1
    while True:
        x += _DX[d]
        y += _DY[d]
        # right turn first: a cell of the part ahead on the right joins it across a corner
        nd = (d + 3) % 4
        for _ in range(3):
            if _cell(labels, part, h, w, y + _LY[nd], x + _LX[nd]) and not _cell(
                labels, part, h, w, y + _RY[nd], x + _RX[nd]
            ):
                break
            nd = (nd + 1) % 4
        if x == sx and y == sy and nd == 0:
            break
        if nd != d:
            out[k, 0], out[k, 1] = x, y
            k += 1
        d = nd
    return k


@_compiled
def _cross(ring: np.ndarray, a: int, b: int, c: int) -> int:
    """z of (ring[b] - ring[a]) x (ring[c] - ring[a]): > 0 when a, b, c turn left (exact in int64)."""
    return (ring[b, 0] - ring[a, 0]) * (ring[c, 1] - ring[a, 1]) - (ring[b, 1] - ring[a, 1]) * (ring[c, 0] - ring[a, 0])


@_compiled
def _hull_area(ring: np.ndarray, k: int, dq: np.ndarray) -> float:
    """Area of the convex hull of the simple polygon ring[:k] (integer vertices), by Melkman's
    algorithm (A. Melkman, "On-line construction of the convex hull of a simple polyline",
    Information Processing Letters 25, 1987): a deque of vertex indices, no sorting.  dq:
    int64 scratch of at least 2 k + 1.  The cross products and the shoelace sum are exact."""
    s = 0
    while s < k and _cross(ring, s, (s + 1) % k, (s + 2) % k) == 0:
        s += 1  # start where three vertices turn (an outline's corners always do)
    if s == k:
        return 0.0
    i0, i1, i2 = s, (s + 1) % k, (s + 2) % k
    bot = top = k
    if _cross(ring, i0, i1, i2) > 0:
        dq[bot], dq[bot + 1], dq[bot + 2], dq[bot + 3] = i2, i0, i1, i2
    else:
        dq[bot], dq[bot + 1], dq[bot + 2], dq[bot + 3] = i2, i1, i0, i2
    top = bot + 3
    for t in range(3, k):
        v = (s + t) % k
        if _cross(ring, dq[bot], dq[bot + 1], v) > 0 and _cross(ring, dq[top - 1], dq[top], v) > 0:
            continue  # inside the hull so far
        while _cross(ring, dq[bot], dq[bot + 1], v) <= 0:
            bot += 1
        bot -= 1
        dq[bot] = v
        while _cross(ring, dq[top - 1], dq[top], v) <= 0:
            top -= 1
        top += 1
        dq[top] = v
    twice = 0
    for i in range(bot, top):
        p, q = dq[i], dq[i + 1]
        twice += ring[p, 0] * ring[q, 1] - ring[q, 0] * ring[p, 1]
    return abs(twice) * 0.5


@_compiled
def _moments(ring: np.ndarray, k: int) -> tuple[float, float, float, float]:
    """m00, mu20, mu11, mu02 of the polygon ring[:k] (integer vertices), as `cv2.moments` of
    the contour gives them.  Green's theorem: with c_i = x_{i-1} y_i - x_i y_{i-1},
    2 m00 = sum c_i, 6 m10 = sum c_i (x_{i-1} + x_i), 12 m20 = sum c_i (x_{i-1}^2 + x_{i-1} x_i
    + x_i^2), 24 m11 = sum c_i (2 x_{i-1} y_{i-1} + x_{i-1} y_i + x_i y_{i-1} + 2 x_i y_i)
    (Steger, "On the calculation of arbitrary moments of polygons", 1996).  The sums are
    exact (integers below 2**53); the divisions are multiplications by the rounded reciprocals
    and the central moments mu20 = m20 - m10 * (m10 / m00), ..., which is how OpenCV rounds."""
    xp, yp = float(ring[k - 1, 0]), float(ring[k - 1, 1])
    a00 = a10 = a01 = a20 = a11 = a02 = 0.0
    for i in range(k):
        x, y = float(ring[i, 0]), float(ring[i, 1])
        c = xp * y - x * yp
        a00 += c
        a10 += c * (xp + x)
        a01 += c * (yp + y)
        a20 += c * (xp * xp + xp * x + x * x)
        a11 += c * (2.0 * xp * yp + xp * y + x * yp + 2.0 * x * y)
        a02 += c * (yp * yp + yp * y + y * y)
        xp, yp = x, y
    if a00 == 0.0:
        return 0.0, 0.0, 0.0, 0.0
    if a00 < 0:  # clockwise: the same polygon, the sums negated
        a00, a10, a01, a20, a11, a02 = -a00, -a10, -a01, -a20, -a11, -a02
    m00 = a00 * 0.5
    m10, m01 = a10 * (1.0 / 6), a01 * (1.0 / 6)
    m20, m11, m02 = a20 * (1.0 / 12), a11 * (1.0 / 24), a02 * (1.0 / 12)
    inv = 1.0 / m00
    cx, cy = m10 * inv, m01 * inv
    return m00, m20 - m10 * cx, m11 - m10 * cy, m02 - m01 * cy


@_compiled
def owned_nuclei(
    canvas: np.ndarray,
    bbox: np.ndarray,
    n_owned: int,
    rgb: np.ndarray,
    od_tables: np.ndarray,
    min_area_px: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Outline and measurements of each owned mask left on the resolved canvas.

    canvas: (h, w) int32 labels (mask index + 1).  bbox: (P, 4) int32 boxes of the masks.
    rgb: (h, w, 3) uint8 tile; od_tables: (3, 256) float32 per-channel haematoxylin tables
    (`wsiseg.stain.hematoxylin_tables`).
    Returns rows (K,) int64 of the masks kept, ring_ends (K,) int64 cumulative corner
    counts, corners (sum, 2) int64 (x, y) relative to each mask's box, and (K, 7) float64
    m00, mu20, mu11, mu02 (`cv2.moments` of the outline), perimeter and convex hull area
    (px) of the outline, and the mean haematoxylin density of the part's pixels (as
    `cv2.mean`: a double sum in raster order times 1 / count).
    """
    rows = np.empty(n_owned, np.int64)
    ends = np.empty(n_owned, np.int64)
    values = np.empty((n_owned, 7), np.float64)
    corners = np.empty((4096, 2), np.int64)
    side = 1
    for i in range(n_owned):
        side = max(side, bbox[i, 3] - bbox[i, 1], bbox[i, 2] - bbox[i, 0])
    labels = np.zeros((side, side), np.uint8)
    runs = np.empty((side * (side + 1) // 2 + 2, 6), np.int64)
    ring = np.empty((2 * (side + 1) * (side + 1) + 4, 2), np.int64)
    dq = np.empty(2 * ring.shape[0] + 2, np.int64)
    used = 0
    kept = 0
    zero = np.float32(0.0)
    for i in range(n_owned):
        x0, y0, x1, y1 = bbox[i, 0], bbox[i, 1], bbox[i, 2], bbox[i, 3]
        if x1 <= x0 or y1 <= y0:
            continue
        bh, bw = y1 - y0, x1 - x0
        n_runs = _largest_part(canvas, i + 1, x0, y0, bh, bw, runs)
        if n_runs == 0:
            continue
        for t in range(n_runs):
            labels[runs[t, 0], runs[t, 1] : runs[t, 2]] = 1
        k = _trace(labels, 1, bh, bw, runs[0, 1], runs[0, 0], ring)
        for t in range(n_runs):
            labels[runs[t, 0], runs[t, 1] : runs[t, 2]] = 0
        if k < 4:
            continue
        m00, mu20, mu11, mu02 = _moments(ring, k)
        if m00 < min_area_px:
            continue
        perimeter = 0.0
        for t in range(k):
            u = (t + 1) % k
            perimeter += abs(ring[u, 0] - ring[t, 0]) + abs(ring[u, 1] - ring[t, 1])
        total, count = 0.0, 0
        for t in range(n_runs):  # raster order
            y = y0 + runs[t, 0]
            for x in range(x0 + runs[t, 1], x0 + runs[t, 2]):
                od = od_tables[0, rgb[y, x, 0]] + od_tables[1, rgb[y, x, 1]]
                od = od + od_tables[2, rgb[y, x, 2]]
                total += max(od, zero)
                count += 1
        while used + k > corners.shape[0]:
            grown = np.empty((2 * corners.shape[0], 2), np.int64)
            grown[:used] = corners[:used]
            corners = grown
        corners[used : used + k] = ring[:k]
        used += k
        rows[kept] = i
        ends[kept] = used
        values[kept, 0], values[kept, 1], values[kept, 2], values[kept, 3] = m00, mu20, mu11, mu02
        values[kept, 4] = perimeter
        values[kept, 5] = _hull_area(ring, k, dq)
        values[kept, 6] = total * (1.0 / count)
        kept += 1
    return rows[:kept], ends[:kept], corners[:used], values[:kept]


@_compiled
def _clear_outside(canvas: np.ndarray, ox: int, oy: int, width: int, height: int) -> None:
    """Zero the cells of a tile at (ox, oy) that lie beyond a width x height image."""
    h, w = canvas.shape
    c0, r0 = min(max(0, -ox), w), min(max(0, -oy), h)
    c1, r1 = min(max(0, width - ox), w), min(max(0, height - oy), h)
    for r in range(h):
        if r < r0 or r >= r1:
            canvas[r, :] = 0
        else:
            canvas[r, :c0] = 0
            canvas[r, c1:] = 0


@_compiled
def batch_nuclei(
    tile_hw: np.ndarray,
    origins: np.ndarray,
    image_wh: np.ndarray,
    bbox: np.ndarray,
    first_mask: np.ndarray,
    n_owned: np.ndarray,
    flat: np.ndarray,
    offsets: np.ndarray,
    order: np.ndarray,
    rgb: np.ndarray,
    od_tables: np.ndarray,
    min_area_px: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The owned nuclei of a batch of T tiles, one tile after another, in one call.

    Per tile t (its masks are rows first_mask[t]:first_mask[t + 1] of `bbox` and `offsets`):
    `paint_masks` in `order` (local mask indices, grouped per tile like the masks), cells
    beyond the image zeroed (image_wh: (width, height) of the working frame; (-1, -1): none),
    `absorb_enclosed`, then `owned_nuclei` of its first n_owned[t] masks.
    tile_hw: (2,) int64 tile height and width (px); origins: (T, 2) int64 tile (x0, y0) in the
    working frame; bbox: (P, 4) int32 mask boxes (tile px); flat / offsets: every mask's bool
    pixels as `paint_masks` takes them (offsets into the one `flat`); rgb: (T, h, w, 3) uint8.
    Returns rows (K,) int64 (batch mask index of each nucleus), ring_ends (K,) int64, corners
    (sum, 2) int64 (x, y) in the working frame, (K, 7) float64 values as `owned_nuclei`, and
    touches (K,) bool (the mask's box reached its tile's edge).
    """
    h, w = tile_hw[0], tile_hw[1]
    n_tiles = origins.shape[0]
    total = 0
    for t in range(n_tiles):
        total += n_owned[t]
    rows = np.empty(total, np.int64)
    ends = np.empty(total, np.int64)
    values = np.empty((total, 7), np.float64)
    touches = np.empty(total, np.bool_)
    corners = np.empty((max(4096, 64 * total), 2), np.int64)
    canvas = np.empty((h, w), np.int32)
    kept = used = 0
    for t in range(n_tiles):
        s, e = first_mask[t], first_mask[t + 1]
        box = bbox[s:e]
        canvas[:] = 0
        paint_masks(canvas, box, flat, offsets[s:e], order[s:e])
        if image_wh[0] >= 0:
            _clear_outside(canvas, origins[t, 0], origins[t, 1], image_wh[0], image_wh[1])
        absorb_enclosed(canvas, box)
        idx, tile_ends, tile_corners, tile_values = owned_nuclei(canvas, box, n_owned[t], rgb[t], od_tables, min_area_px)
        while used + tile_corners.shape[0] > corners.shape[0]:
            grown = np.empty((2 * corners.shape[0], 2), np.int64)
            grown[:used] = corners[:used]
            corners = grown
        start = 0
        for k in range(idx.shape[0]):
            i = idx[k]
            dx, dy = box[i, 0] + origins[t, 0], box[i, 1] + origins[t, 1]
            for p in range(start, tile_ends[k]):
                corners[used + p, 0] = tile_corners[p, 0] + dx
                corners[used + p, 1] = tile_corners[p, 1] + dy
            start = tile_ends[k]
            rows[kept] = s + i
            ends[kept] = used + tile_ends[k]
            values[kept] = tile_values[k]
            touches[kept] = box[i, 0] == 0 or box[i, 1] == 0 or box[i, 2] == w or box[i, 3] == h
            kept += 1
        used += start
    return rows[:kept], ends[:kept], corners[:used], values[:kept], touches[:kept]
