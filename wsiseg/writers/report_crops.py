"""Where the per-slide report zooms in, and the zoomed crops themselves.

A crop is a square of level-0 pixels (the slide's full resolution) with the outline of every
nucleus that reaches into it.  Regions: the densest cell of the density grid, the sparsest
tissue cell, a nucleus that touched its tile's edge (when any did) and random nuclei (a fixed
seed, so a rerun shows the same places); no two crops overlap.
Coordinates are level-0 px (OpenSlide frame); crop images are RGB uint8.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from wsiseg.writers.report_images import MIN_TISSUE_SHARE, DensityGrid, draw_crop

__all__ = ["Crop", "CropBox", "NucleiSource", "crop_side_l0", "pick_crop_boxes", "render_crops"]

log = logging.getLogger(__name__)

#: Side of a crop in µm: a few dozen nuclei, each large enough to judge its outline.
CROP_UM = 64.0
#: Crop side limits in level-0 px (a slide without mpp gets 256).
CROP_PX_RANGE = (96, 512)
#: Crops are shown at least this many screen px wide (level-0 px magnified by whole numbers).
CROP_SCREEN_PX = 512
#: Nuclei tried as the centre of a random (or edge) crop before giving up on a free place.
_TRIES = 2000
MAX_CROPS = 6
#: Length of the scale bar drawn on each crop (µm).
SCALE_BAR_UM = 20.0
_UNCLASSIFIED_RGB = (0, 200, 0)

ReadL0 = Callable[[int, int, int, int], np.ndarray]
"""read_l0(x0, y0, width, height) -> (height, width, 3) uint8 level-0 pixels."""


class NucleiSource(Protocol):
    """What the report reads of a run's nuclei (a `wsiseg.writers.zarr_store.NucleiStore`)."""

    def __len__(self) -> int: ...

    def column(self, name: str) -> np.ndarray: ...

    def query(self, x0: float, y0: float, x1: float, y1: float) -> Any: ...


@dataclass(frozen=True)
class CropBox:
    """A region to show: level-0 box [x0, x0 + width) x [y0, y0 + height) and why it was chosen."""

    label: str
    reason: str
    x0: int
    y0: int
    width: int
    height: int

    @property
    def bounds_l0(self) -> tuple[float, float, float, float]:
        return (float(self.x0), float(self.y0), float(self.x0 + self.width), float(self.y0 + self.height))


@dataclass(frozen=True)
class Crop:
    """A drawn crop: box, picture ((h * magnify, w * magnify, 3) uint8), nuclei drawn, magnification."""

    box: CropBox
    image_rgb: np.ndarray
    n_nuclei: int
    magnify: int


def crop_side_l0(mpp: float | None) -> int:
    """Crop side in level-0 px: CROP_UM at the slide's resolution, within CROP_PX_RANGE."""
    if mpp is None or not mpp > 0:
        return 256
    lo, hi = CROP_PX_RANGE
    return int(min(max(round(CROP_UM / mpp), lo), hi))


def pick_crop_boxes(
    centroids_l0: np.ndarray,
    grid: DensityGrid,
    size_l0: tuple[int, int],
    side_l0: int,
    *,
    touches_edge: np.ndarray | None = None,
    tissue_known: bool = True,
    max_crops: int = MAX_CROPS,
    seed: int = 0,
    per_mm2: bool = True,
) -> list[CropBox]:
    """Up to `max_crops` regions: densest, sparsest tissue, an edge nucleus, then random nuclei.

    centroids_l0: (N, 2) x, y level-0 px.  touches_edge: (N,) bool or None.  tissue_known:
    False when the grid's tissue share is not a real tissue mask (then the sparsest region is
    the sparsest cell that has nuclei, not an empty background cell).  per_mm2: whether the
    grid's densities are real (the slide has an mpp) and may be quoted.  Labels A, B, C, ...
    """
    width, height = size_l0
    cw, ch = min(side_l0, width), min(side_l0, height)
    pts = np.asarray(centroids_l0, np.float64).reshape(-1, 2)
    placed: list[tuple[str, int, int]] = []  # reason, x0, y0 of boxes that overlap no other

    def place(reason: str, x: float, y: float) -> bool:
        """A box centred on (x, y), moved inside the slide; kept when it overlaps no earlier box."""
        x0 = int(min(max(round(x - cw / 2), 0), width - cw))
        y0 = int(min(max(round(y - ch / 2), 0), height - ch))
        if len(placed) >= max_crops or any(abs(x0 - a) < cw and abs(y0 - b) < ch for _, a, b in placed):
            return False
        placed.append((reason, x0, y0))
        return True

    cell = grid.cell_l0
    counts = grid.counts
    valid = np.isfinite(grid.per_mm2)
    if counts.max(initial=0) > 0:
        dense = np.where(valid, counts, -1) if (counts[valid] > 0).any() else counts
        r, c = np.unravel_index(int(np.argmax(dense)), counts.shape)
        inside = (np.floor(pts[:, 0] / cell) == c) & (np.floor(pts[:, 1] / cell) == r)
        x, y = np.median(pts[inside], axis=0) if inside.any() else ((c + 0.5) * cell, (r + 0.5) * cell)
        per = grid.per_mm2[r, c]
        quoted = per_mm2 and np.isfinite(per)
        place(f"densest region ({per:,.0f} nuclei/mm²)" if quoted else "densest region", x, y)

    if tissue_known:  # deep in tissue first (the cell and its 8 neighbours), then any tissue cell
        from scipy.ndimage import minimum_filter

        deep = minimum_filter(grid.tissue, size=3, mode="constant", cval=0.0)
        candidates = valid & (deep >= 0.9)
        # the density map's sparser cells at tissue borders are left out (often margins or folds): say so
        sparse_name = "sparsest tissue away from its edges"
        for looser in (valid & (grid.tissue >= 0.9), valid & (grid.tissue >= MIN_TISSUE_SHARE)):
            if not candidates.any():
                candidates, sparse_name = looser, "sparsest tissue"
    else:
        candidates = valid & (counts > 0)
        sparse_name = "sparsest tissue"
    order = np.argsort(np.where(candidates, grid.per_mm2, np.inf), axis=None, kind="stable")
    for flat in order[: int(candidates.sum())]:
        r, c = np.unravel_index(int(flat), counts.shape)
        per = grid.per_mm2[r, c]
        if place(f"{sparse_name} ({per:,.0f} nuclei/mm²)" if per_mm2 else sparse_name,
                 (c + 0.5) * cell, (r + 0.5) * cell):
            break

    rng = np.random.default_rng(seed)
    if touches_edge is not None and np.asarray(touches_edge).any():
        edge_rows = rng.permutation(np.flatnonzero(np.asarray(touches_edge, bool)))[:_TRIES]
        any(place("a nucleus that reached its tile's edge", *pts[i]) for i in edge_rows)
    for i in rng.permutation(len(pts))[:_TRIES]:
        if len(placed) >= max_crops:
            break
        place("a random nucleus", *pts[i])
    return [CropBox(chr(ord("A") + k), reason, x0, y0, cw, ch) for k, (reason, x0, y0) in enumerate(placed)]


def _exteriors(table: Any) -> list[np.ndarray]:
    """Ring 0 (the exterior) of every polygon of a NucleusTable, (K, 2) level-0 px each."""
    go, ro, xy = table.geom_offsets, table.ring_offsets, table.coords
    return [xy[ro[go[i]] : ro[go[i] + 1]] for i in range(len(go) - 1)]


def render_crops(
    boxes: Sequence[CropBox],
    read_l0: ReadL0,
    nuclei: NucleiSource | None,
    class_colors: Mapping[int, tuple[int, int, int]],
    *,
    mpp: float | None = None,
) -> list[Crop]:
    """Each box read at level 0, magnified to >= CROP_SCREEN_PX and outlined, with a SCALE_BAR_UM
    scale bar when `mpp` (µm per level-0 px) is known; unreadable boxes are skipped."""
    crops = []
    for box in boxes:
        try:
            pixels = np.asarray(read_l0(box.x0, box.y0, box.width, box.height))
        except Exception as exc:  # a damaged region: the other crops still help
            log.warning("report crop %s at (%d, %d) could not be read: %s", box.label, box.x0, box.y0, exc)
            continue
        rings: list[np.ndarray] = []
        colors: list[tuple[int, int, int]] = []
        if nuclei is not None and len(nuclei):
            table = nuclei.query(*box.bounds_l0)
            rings = _exteriors(table)
            colors = [class_colors.get(int(k), _UNCLASSIFIED_RGB) for k in np.asarray(table.class_id)]
        magnify = max(1, -(-CROP_SCREEN_PX // max(box.width, box.height)))
        bar_l0 = SCALE_BAR_UM / mpp if mpp else None
        image = draw_crop(pixels, (box.x0, box.y0), rings, colors, magnify=magnify, scale_bar_l0=bar_l0)
        crops.append(Crop(box, image, len(rings), magnify))
    return crops
