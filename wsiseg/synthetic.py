"""Synthetic H&E-like slides with every nucleus at a known position.

Used by `wsiseg demo`, the tests and the benchmarks.  A scene is a `SyntheticSpec`;
`make_nuclei` lays out the nuclei (the truth) and `render_region` draws any region of the
slide on its own, so a 100k x 100k slide is written tile by tile without ever being held
whole, and two overlapping regions agree pixel for pixel.

Rendering follows Beer-Lambert: each pixel's optical density (OD) is a mix of
haematoxylin and eosin stain vectors (Macenko et al. 2009 reference values), so colour
deconvolution recovers the nuclei.  Nuclei are dark purple ellipses (haematoxylin OD
0.55-1.2) with chromatin texture on pink eosin stroma; outside the tissue is near-white
glass.  Coordinates are level-0 pixels, pixel (row i, column j) covering [j, j+1) x [i, i+1);
a pixel belongs to a nucleus when its centre lies inside the ellipse, and where
ellipses overlap the higher label wins (also in the rendering).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

logger = logging.getLogger(__name__)

#: class_id -> name of the synthetic nucleus classes.
CLASS_NAMES: tuple[str, ...] = ("epithelial", "lymphocyte", "stromal")

# Per class: probability, semi-major axis as a fraction of the radius range, minor/major
# ratio range, haematoxylin OD range.
_CLASSES = (
    (0.5, (0.45, 1.0), (0.65, 0.95), (0.55, 0.80)),
    (0.3, (0.0, 0.30), (0.85, 1.00), (0.95, 1.20)),
    (0.2, (0.50, 1.0), (0.40, 0.60), (0.75, 0.95)),
)
_H_OD = np.array([0.5626, 0.7201, 0.4062], np.float32)  # haematoxylin, unit OD vector (R, G, B)
_E_OD = np.array([0.2159, 0.8012, 0.5581], np.float32)  # eosin
_PEN_OD = np.array([0.55, 0.12, 0.45], np.float32)  # green marker ink
_GLASS_OD = 0.012
_WHITE = 250.0  # light through empty glass before the glass OD
_KEEP = 0.85  # fraction of lattice sites that hold a nucleus
_GAP_UM = 1.0  # minimum free space between non-touching nuclei


@dataclass(frozen=True)
class SyntheticSpec:
    """A synthetic slide: size (level-0 px), resolution, nuclei and artefacts.

    nucleus_density_per_mm2: mean nuclei per mm² of tissue.
    radius_um: (min, max) semi-major axis of a nucleus in micrometres.
    tissue_fraction: approximate fraction of the slide area covered by tissue (1 = all).
    tissue_pieces: number of separate tissue blobs (before they merge).
    touching_fraction: fraction of nucleus sites holding a pair of touching nuclei.
    pen_mark: draw a green marker stroke; debris: number of dark non-nucleus specks.
    """

    width: int
    height: int
    mpp: float = 0.5
    nucleus_density_per_mm2: float = 2500.0
    radius_um: tuple[float, float] = (2.5, 5.0)
    seed: int = 0
    tissue_fraction: float = 0.6
    tissue_pieces: int = 1
    touching_fraction: float = 0.05
    pen_mark: bool = False
    debris: int = 0

    def __post_init__(self) -> None:
        if self.width < 16 or self.height < 16:
            raise ValueError(f"SyntheticSpec width and height must be >= 16 px, got {self.width}x{self.height}")
        if not 0.05 <= self.mpp <= 10:
            raise ValueError(f"SyntheticSpec.mpp must be in [0.05, 10] micrometres per pixel, got {self.mpp}")
        lo, hi = self.radius_um
        if not 0 < lo <= hi:
            raise ValueError(f"SyntheticSpec.radius_um must be (min, max) with 0 < min <= max, got {self.radius_um}")
        if hi / self.mpp < 1.0:
            raise ValueError(f"SyntheticSpec.radius_um max {hi} is below one pixel at mpp {self.mpp}")
        if not 0 < self.tissue_fraction <= 1:
            raise ValueError(f"SyntheticSpec.tissue_fraction must be in (0, 1], got {self.tissue_fraction}")
        if not 1 <= self.tissue_pieces <= 32:
            raise ValueError(f"SyntheticSpec.tissue_pieces must be 1-32, got {self.tissue_pieces}")
        if not 0 <= self.touching_fraction <= 1:
            raise ValueError(f"SyntheticSpec.touching_fraction must be in [0, 1], got {self.touching_fraction}")
        if self.seed < 0 or self.debris < 0:
            raise ValueError("SyntheticSpec.seed and .debris must be >= 0")
        if self.nucleus_density_per_mm2 < 0:
            raise ValueError(f"SyntheticSpec.nucleus_density_per_mm2 must be >= 0, got {self.nucleus_density_per_mm2}")
        if self.nucleus_density_per_mm2 > self.max_density_per_mm2:
            raise ValueError(
                f"SyntheticSpec.nucleus_density_per_mm2={self.nucleus_density_per_mm2:g} is too dense for nuclei up to "
                f"{hi} um: at most {self.max_density_per_mm2:.0f} per mm² fit"
            )

    @property
    def max_density_per_mm2(self) -> float:
        """Densest packing the hexagonal layout allows for the largest nuclei."""
        spacing_um = 2 * self.radius_um[1] + _GAP_UM
        return _KEEP * 2 / (math.sqrt(3) * spacing_um**2) * 1e6


@dataclass(frozen=True, eq=False)
class TissueShape:
    """Tissue as the super-level set of a smooth field over level-0 px.

    blobs: (K, 5) cx, cy, rx, ry, angle.  waves: (M, 4) kx, ky, phase, amplitude.
    threshold: tissue where field > threshold (-inf: everywhere).  edge: field units per px.
    """

    blobs: np.ndarray
    waves: np.ndarray
    threshold: float
    edge: float

    def field(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Field value at level-0 coordinates x, y (broadcast together), float32.

        Written separably so a (1, w) x (h, 1) grid costs a few (h, w) operations.
        """
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        value = np.full(np.broadcast(x, y).shape, -np.inf, np.float32)
        for cx, cy, rx, ry, angle in self.blobs:
            c, s = math.cos(angle), math.sin(angle)
            dx, dy = x - cx, y - cy
            xx = (dx * dx * (c * c / rx**2 + s * s / ry**2)).astype(np.float32)
            yy = (dy * dy * (s * s / rx**2 + c * c / ry**2)).astype(np.float32)
            cross = np.float32(2 * c * s * (1 / rx**2 - 1 / ry**2))
            value = np.maximum(value, 1.0 - xx - yy - cross * (dx.astype(np.float32) * dy.astype(np.float32)))
        for kx, ky, phase, amp in self.waves:
            ax, by = kx * x + phase, ky * y
            value += np.float32(amp) * (
                np.sin(ax).astype(np.float32) * np.cos(by).astype(np.float32)
                + np.cos(ax).astype(np.float32) * np.sin(by).astype(np.float32)
            )
        return value

    def weight(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Tissue cover in [0, 1] with a soft edge about 2 px wide, float32."""
        if self.threshold == -np.inf:
            return np.ones(np.broadcast(np.asarray(x), np.asarray(y)).shape, np.float32)
        weight = (self.field(x, y) - np.float32(self.threshold)) * np.float32(1 / (2 * self.edge)) + np.float32(0.5)
        return np.minimum(np.maximum(weight, 0), 1)


@dataclass(frozen=True, eq=False)
class SyntheticTruth:
    """The nuclei of a synthetic slide, sorted by centre y then x; nucleus i has label i + 1.

    centers_l0: (N, 2) float64 x, y.  semi_axes_l0: (N, 2) float64 (a, b) px, a along
    angle_rad (radians from +x towards +y).  class_id: (N,) int16 into CLASS_NAMES.
    hematoxylin: (N,) float32 stain OD.  pair_id: (N,) int32, touching pairs share one, else -1.
    tissue: the tissue shape.  debris_l0: (M, 5) x, y, radius px, phase, OD.
    pen: (x_start, x_end, y_mid, amplitude, period, phase, half_width) px, or None.
    fibres: (3, 3) kx, ky, phase of the stroma texture.
    """

    centers_l0: np.ndarray
    semi_axes_l0: np.ndarray
    angle_rad: np.ndarray
    class_id: np.ndarray
    hematoxylin: np.ndarray
    pair_id: np.ndarray
    tissue: TissueShape
    debris_l0: np.ndarray
    pen: tuple[float, ...] | None
    fibres: np.ndarray

    def __len__(self) -> int:
        return len(self.centers_l0)

    @property
    def label_ids(self) -> np.ndarray:
        """(N,) uint32 label of each nucleus in `truth_mask`."""
        return np.arange(1, len(self) + 1, dtype=np.uint32)

    @property
    def reach_px(self) -> float:
        """Largest distance from a centre to any pixel a nucleus touches."""
        return float(self.semi_axes_l0.max()) + 2.0 if len(self) else 0.0

    def centers_in(self, x0: float, y0: float, w: float, h: float) -> np.ndarray:
        """Indices (ascending) of nuclei whose centre lies in [x0, x0+w) x [y0, y0+h)."""
        lo, hi = np.searchsorted(self.centers_l0[:, 1], [y0, y0 + h], side="left")
        x = self.centers_l0[lo:hi, 0]
        return lo + np.flatnonzero((x >= x0) & (x < x0 + w))

    def near(self, x0: float, y0: float, w: float, h: float) -> np.ndarray:
        """Indices (ascending) of nuclei that may cover a pixel of the region."""
        r = self.reach_px
        return self.centers_in(x0 - r, y0 - r, w + 2 * r, h + 2 * r)


def _hash_uniforms(ix: np.ndarray, iy: np.ndarray, salt: int) -> tuple[np.ndarray, np.ndarray]:
    """Two independent uniform [0, 1) float32 values per integer pixel (ix, iy) (broadcast):
    a pure function of position and salt, so any region draws the same noise."""
    with np.errstate(over="ignore"):
        v = np.asarray(ix).astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        v = v ^ (np.asarray(iy).astype(np.uint64) * np.uint64(0xC2B2AE3D27D4EB4F))
        v = v ^ np.uint64((salt * 0x165667B19E3779F9 + 0x27D4EB2F165667C5) % 2**64)
        for mult in (0xFF51AFD7ED558CCD, 0xC4CEB9FE1A85EC53):  # murmur3 finaliser
            v = (v ^ (v >> np.uint64(33))) * np.uint64(mult)
        v = v ^ (v >> np.uint64(33))
    scale = np.float32(2.0**-24)
    return (v >> np.uint64(40)).astype(np.float32) * scale, (v & np.uint64(0xFFFFFF)).astype(np.float32) * scale


def _plane_waves(rng: np.random.Generator, n: int, wavelength: tuple[float, float]) -> np.ndarray:
    """(n, 3) kx, ky (radians per px) and phase of waves with random direction and wavelength (px)."""
    k = 2 * np.pi / rng.uniform(*wavelength, n)
    direction = rng.uniform(0, 2 * np.pi, n)
    return np.column_stack([k * np.cos(direction), k * np.sin(direction), rng.uniform(0, 2 * np.pi, n)])


def _make_tissue(spec: SyntheticSpec, rng: np.random.Generator) -> TissueShape:
    w, h, k = spec.width, spec.height, spec.tissue_pieces
    r = math.sqrt(spec.tissue_fraction * w * h / (k * math.pi)) * 1.25
    blobs = rng.uniform([0.2 * w, 0.2 * h, 0.8 * r, 0.6 * r, 0], [0.8 * w, 0.8 * h, 1.25 * r, r, math.pi], (k, 5))
    waves = np.column_stack([_plane_waves(rng, 4, (0.15 * min(w, h), 0.45 * min(w, h))), np.full(4, 0.12)])
    edge = 2.0 / r + float(np.abs(waves[:, :2]).sum(axis=1) @ waves[:, 3])  # steepest slope, field units per px
    shape = TissueShape(blobs, waves, -np.inf, edge)
    if spec.tissue_fraction >= 1.0:
        return shape
    values = shape.field(((np.arange(256) + 0.5) * w / 256)[None, :], ((np.arange(256) + 0.5) * h / 256)[:, None])
    return TissueShape(blobs, waves, float(np.quantile(values, 1.0 - spec.tissue_fraction)), edge)


def make_nuclei(spec: SyntheticSpec) -> SyntheticTruth:
    """Lay out the nuclei of `spec`: a jittered hexagonal lattice thinned at random, kept
    where there is tissue; some sites hold a touching pair.  Deterministic in spec.seed."""
    tissue = _make_tissue(spec, np.random.default_rng([spec.seed, 1]))
    rng = np.random.default_rng([spec.seed, 2])
    spacing = math.sqrt(2 * _KEEP / (math.sqrt(3) * max(spec.nucleus_density_per_mm2, 1e-9) * 1e-6)) / spec.mpp
    row_step = spacing * math.sqrt(3) / 2
    n_rows = int(spec.height / row_step) + 1 if spec.nucleus_density_per_mm2 > 0 else 0
    cols = np.arange(int(spec.width / spacing) + 1)
    parts: list[tuple[np.ndarray, ...]] = [(np.zeros((0, 2)),) * 2 + (np.zeros(0),) * 3 + (np.zeros(0, np.int64),)]
    pairs_so_far = 0
    for band in range(0, n_rows, 64):  # bands bound the memory of huge slides
        rows = np.arange(band, min(band + 64, n_rows))
        sy = np.repeat((rows + 0.5) * row_step, len(cols))
        sx = ((cols[None, :] + 0.25 + 0.5 * (rows[:, None] % 2)) * spacing).ravel()
        *part, pair = _site_nuclei(sx, sy, rng.random((len(sx), 10)), tissue, spec, spacing)
        parts.append((*part, np.where(pair >= 0, pair + pairs_so_far, -1)))
        pairs_so_far += int(pair.max(initial=-1)) + 1
    centers, axes, angle, class_id, hem, pair = (np.concatenate(f) for f in zip(*parts))
    inside = (centers >= 0).all(axis=1) & (centers[:, 0] < spec.width) & (centers[:, 1] < spec.height)
    order = np.flatnonzero(inside)[np.lexsort((centers[inside, 0], centers[inside, 1]))]
    pair = pair[order]
    partnered = np.bincount(pair[pair >= 0], minlength=max(pairs_so_far, 1))  # never empty
    pair[(pair >= 0) & (partnered[np.maximum(pair, 0)] < 2)] = -1  # partner fell outside the slide
    art = np.random.default_rng([spec.seed, 3])
    w, h, um = spec.width, spec.height, 1 / spec.mpp
    debris = art.uniform([0, 0, 6 * um, 0, 0.5], [w, h, 20 * um, 2 * np.pi, 1.0], (spec.debris, 5))
    pen = None
    if spec.pen_mark:
        low, high = (
            [0.0, 0.5 * w, 0.2 * h, 0.03 * h, 0.3 * w, 0.0],
            [0.15 * w, 0.8 * w, 0.8 * h, 0.08 * h, 0.6 * w, 6.28],
        )
        pen = (*art.uniform(low, high).tolist(), max(6.0, 0.02 * min(w, h)))
    return SyntheticTruth(
        centers_l0=centers[order],
        semi_axes_l0=axes[order],
        angle_rad=angle[order],
        class_id=class_id[order].astype(np.int16),
        hematoxylin=hem[order].astype(np.float32),
        pair_id=pair.astype(np.int32),
        tissue=tissue,
        debris_l0=debris,
        pen=pen,
        fibres=_plane_waves(art, 3, (12 * um, 30 * um)),
    )


def _site_nuclei(
    sx: np.ndarray, sy: np.ndarray, u: np.ndarray, tissue: TissueShape, spec: SyntheticSpec, spacing: float
) -> tuple[np.ndarray, ...]:
    """Nuclei for lattice sites (sx, sy) from uniforms u (n, 10): (centres, axes, angle,
    class, haematoxylin, pair index (-1 single)).  Each site owns a disc of radius `free`."""
    r_lo, r_hi = spec.radius_um[0] / spec.mpp, spec.radius_um[1] / spec.mpp
    free = (spacing - _GAP_UM / spec.mpp) / 2
    keep = (u[:, 0] < _KEEP) & (tissue.field(sx, sy) > tissue.threshold + (free + 3) * tissue.edge)  # wholly in tissue
    cls = np.searchsorted(np.cumsum([c[0] for c in _CLASSES]), u[:, 1], side="right").clip(0, len(_CLASSES) - 1)
    (size_lo, size_hi), (ratio_lo, ratio_hi), (hem_lo, hem_hi) = (
        np.array([c[k] for c in _CLASSES])[cls].T for k in (1, 2, 3)
    )
    a = r_lo + (r_hi - r_lo) * (size_lo + (size_hi - size_lo) * u[:, 2])
    b = a * (ratio_lo + (ratio_hi - ratio_lo) * u[:, 3])
    hem = hem_lo + (hem_hi - hem_lo) * u[:, 4]
    angle = u[:, 5] * np.pi
    jitter_r, jitter_t = np.sqrt(u[:, 6]) * np.maximum(free - a, 0.0), u[:, 7] * 2 * np.pi
    cx, cy = sx + jitter_r * np.cos(jitter_t), sy + jitter_r * np.sin(jitter_t)
    paired = keep & (u[:, 8] < spec.touching_fraction) & (free >= 2 * r_lo * 0.8)
    s, p = np.flatnonzero(keep & ~paired), np.flatnonzero(paired)
    # Pairs: two near-round nuclei of one class, major axes along the line joining them,
    # overlapping by 1 px, both inside the site's free disc.
    a2 = r_lo + (r_hi - r_lo) * (size_lo + (size_hi - size_lo) * u[:, 9])
    shrink = np.minimum(1.0, (free + 0.5) / (a + a2))
    a1, a2 = (a * shrink)[p], (a2 * shrink)[p]
    t1, t2 = (2 * a2 - 1) / 2, (2 * a1 - 1) / 2  # centre offsets: t1 + t2 = a1 + a2 - 1
    ux, uy, round_ = np.cos(angle[p]), np.sin(angle[p]), 0.85 + 0.15 * u[p, 3]
    centers = np.concatenate(
        [
            np.column_stack([cx[s], cy[s]]),
            np.column_stack([sx[p] - ux * t1, sy[p] - uy * t1]),
            np.column_stack([sx[p] + ux * t2, sy[p] + uy * t2]),
        ]
    )
    axes = np.concatenate(
        [np.column_stack([a[s], b[s]]), np.column_stack([a1, a1 * round_]), np.column_stack([a2, a2 * round_])]
    )
    return (
        centers,
        axes,
        np.concatenate([angle[s], angle[p], angle[p]]),
        np.concatenate([cls[s], cls[p], cls[p]]),
        np.concatenate([hem[s], hem[p], hem[p]]),
        np.concatenate([np.full(len(s), -1), np.arange(len(p)), np.arange(len(p))]).astype(np.int64),
    )


def _footprints(truth: SyntheticTruth, x0: int, y0: int, w: int, h: int) -> Iterator[tuple[np.ndarray, ...]]:
    """Pixels of the region each nearby nucleus reaches, in batches of nuclei by ascending label.

    Yields (nucleus (M,) int64, pixel (M,) flat index into the (h, w) region, q (M,)
    normalised ellipse radius at the pixel centre (<= 1 inside), dist (M,) approximate
    signed distance to the outline in px), only entries with dist < 0.5 (some ink), sorted
    by pixel then nucleus.  Functions of global coordinates only.
    """
    near = truth.near(x0, y0, w, h)
    if len(near) == 0:
        return
    half = int(math.ceil(truth.reach_px))
    offsets = np.arange(-half, half + 1)
    for start in range(0, len(near), 2048):
        idx = near[start : start + 2048]
        cx, cy = truth.centers_l0[idx, 0], truth.centers_l0[idx, 1]
        gx = (np.floor(cx).astype(np.int64)[:, None] + offsets)[:, None, :]  # (n, 1, S) global column
        gy = (np.floor(cy).astype(np.int64)[:, None] + offsets)[:, :, None]  # (n, S, 1) global row
        dx, dy = gx + 0.5 - cx[:, None, None], gy + 0.5 - cy[:, None, None]
        cos, sin = np.cos(truth.angle_rad[idx])[:, None, None], np.sin(truth.angle_rad[idx])[:, None, None]
        u, v = dx * cos + dy * sin, dy * cos - dx * sin
        q = np.sqrt(
            (u / truth.semi_axes_l0[idx, 0, None, None]) ** 2 + (v / truth.semi_axes_l0[idx, 1, None, None]) ** 2
        )
        radial = np.hypot(u, v)
        dist = np.where(
            q > 0, radial - radial / np.maximum(q, 1e-12), -truth.semi_axes_l0[idx].min(axis=1)[:, None, None]
        )
        keep = (dist < 0.5) & (gx >= x0) & (gx < x0 + w) & (gy >= y0) & (gy < y0 + h)
        n_i, r_i, c_i = np.nonzero(keep)
        pixel = (gy[n_i, r_i, 0] - y0) * w + (gx[n_i, 0, c_i] - x0)
        order = np.lexsort((n_i, pixel))
        yield idx[n_i[order]], pixel[order], q[keep][order], dist[keep][order]


def _rank_within_pixel(pixel: np.ndarray) -> np.ndarray:
    """For entries sorted by pixel: 0 for the first entry of each pixel, 1 for the next, ..."""
    n = np.arange(len(pixel))
    first = np.r_[True, pixel[1:] != pixel[:-1]] if len(pixel) else np.zeros(0, bool)
    return n - np.maximum.accumulate(np.where(first, n, 0))


def truth_mask(spec: SyntheticSpec, truth: SyntheticTruth, x0: int, y0: int, w: int, h: int) -> np.ndarray:
    """(h, w) uint32 label image of the true nuclei in a region (0 = none, nucleus i = i + 1).

    A pixel belongs to a nucleus when its centre is inside the ellipse; the higher label wins.
    """
    labels = np.zeros(h * w, np.uint32)
    for nucleus, pixel, q, _ in _footprints(truth, int(x0), int(y0), int(w), int(h)):
        inside = q <= 1.0
        np.maximum.at(labels, pixel[inside], (nucleus[inside] + 1).astype(np.uint32))
    return labels.reshape(h, w)


def tissue_mask(spec: SyntheticSpec, truth: SyntheticTruth, x0: int, y0: int, w: int, h: int) -> np.ndarray:
    """(h, w) bool: pixels at least half covered by tissue."""
    xs, ys = np.arange(x0, x0 + w) + 0.5, np.arange(y0, y0 + h) + 0.5
    return truth.tissue.weight(xs[None, :], ys[:, None]) >= 0.5


def render_region(spec: SyntheticSpec, truth: SyntheticTruth, x0: int, y0: int, w: int, h: int) -> np.ndarray:
    """(h, w, 3) uint8 RGB of level-0 pixels [x0, x0+w) x [y0, y0+h), rendered on its own.

    Any region gives the same pixels as the same part of a larger region.  Pixels outside
    the slide are drawn too (the scene continues); writers crop to the slide.
    """
    x0, y0, w, h = int(x0), int(y0), int(w), int(h)
    ix, iy = np.arange(x0, x0 + w)[None, :], np.arange(y0, y0 + h)[:, None]
    xs, ys = ix + 0.5, iy + 0.5
    salt = spec.seed * 16
    stain_noise, haem_noise = _hash_uniforms(ix, iy, salt)
    chromatin, sensor = _hash_uniforms(ix, iy, salt + 1)
    fibre = np.zeros((h, w), np.float32)
    for kx, ky, phase in truth.fibres:  # sin(a + b) written separably
        ax, by = kx * xs + phase, ky * ys
        fibre += np.sin(ax).astype(np.float32) * np.cos(by).astype(np.float32)
        fibre += np.cos(ax).astype(np.float32) * np.sin(by).astype(np.float32)
    tissue = truth.tissue.weight(xs, ys)
    eosin = tissue * (np.float32(0.25) + np.float32(0.07 / 3) * fibre + np.float32(0.10) * stain_noise)
    haem = tissue * (np.float32(0.05) + np.float32(0.04) * haem_noise)
    od = haem[..., None] * _H_OD + eosin[..., None] * _E_OD
    od += np.float32(_GLASS_OD)
    flat_od, flat_chromatin = od.reshape(-1, 3), chromatin.reshape(-1)
    for nucleus, pixel, q, dist in _footprints(truth, x0, y0, w, h):
        # Composite in label order per pixel (rank 0 first), so the higher label ends on top.
        alpha = np.minimum(0.5 - dist, 1.0).astype(np.float32)[:, None]
        amount = (
            truth.hematoxylin[nucleus] * (0.8 + 0.4 * flat_chromatin[pixel]) * (0.9 + 0.2 * np.minimum(q, 1.0) ** 2)
        )
        ink = amount.astype(np.float32)[:, None] * _H_OD + np.float32(0.12) * _E_OD
        rank = _rank_within_pixel(pixel)
        for r in range(int(rank.max(initial=-1)) + 1):
            sel = rank == r
            flat_od[pixel[sel]] = flat_od[pixel[sel]] * (1 - alpha[sel]) + alpha[sel] * ink[sel]
    for dx, dy, radius, phase, density in truth.debris_l0:
        c0, c1 = max(x0, int(dx - 1.4 * radius)), min(x0 + w, int(dx + 1.4 * radius) + 1)
        r0, r1 = max(y0, int(dy - 1.4 * radius)), min(y0 + h, int(dy + 1.4 * radius) + 1)
        if c0 < c1 and r0 < r1:
            px, py = np.arange(c0, c1)[None, :] + 0.5 - dx, np.arange(r0, r1)[:, None] + 0.5 - dy
            edge = radius * (1 + 0.3 * np.sin(3 * np.arctan2(py, px) + phase))
            alpha = np.clip(edge - np.hypot(px, py) + 0.5, 0, 1).astype(np.float32)[..., None]
            window = od[r0 - y0 : r1 - y0, c0 - x0 : c1 - x0]
            window[...] = window * (1 - alpha) + alpha * np.float32(density)
    if truth.pen is not None:
        start, stop, mid, amplitude, period, phase, half = truth.pen
        centre = mid + amplitude * np.sin(2 * np.pi * xs / period + phase)  # (1, w)
        along = np.clip(np.minimum(xs - start, stop - xs) / half + 0.5, 0, 1).astype(np.float32)
        across = np.clip(half + 0.5 - np.abs(ys - centre), 0, 1).astype(np.float32)
        ink = across * along * (np.float32(0.85) + np.float32(0.3) * stain_noise)
        od += ink[..., None] * _PEN_OD
    light = np.exp(od * np.float32(-math.log(10.0)))
    light *= np.float32(_WHITE)
    light += (np.float32(3.0) * (sensor - np.float32(0.5)))[..., None]
    return np.clip(np.rint(light), 0, 255).astype(np.uint8)


Compression = Literal["jpeg", "deflate", "none"]
_CODECS = {"jpeg": "jpeg", "deflate": "zlib", "none": None}
_APERIO = "Aperio Image Library v12.0.15 \r\n"
SPEC_MPP: Literal["spec"] = "spec"


def write_png(path: str | Path, spec: SyntheticSpec, truth: SyntheticTruth | None = None) -> SyntheticTruth:
    """Write the whole slide as one RGB PNG (no mpp: PNG carries none we trust); returns the truth."""
    from PIL import Image

    truth = make_nuclei(spec) if truth is None else truth
    bands = [
        render_region(spec, truth, 0, y, spec.width, min(1024, spec.height - y)) for y in range(0, spec.height, 1024)
    ]
    Image.fromarray(np.concatenate(bands)).save(path, compress_level=1)
    return truth


def write_svs_like(
    path: str | Path,
    spec: SyntheticSpec,
    truth: SyntheticTruth | None = None,
    *,
    tile: int = 256,
    levels: tuple[int, ...] = (1, 4, 16),
    compression: Compression = "jpeg",
    quality: int = 90,
) -> SyntheticTruth:
    """Write a tiled pyramidal TIFF laid out as an Aperio SVS, which OpenSlide and TiffSlide
    open as vendor "aperio" with mpp and objective power.  Returns the truth.

    Layout: page 0 level 0 (description "Aperio Image Library ...|MPP = m|AppMag = a|..."),
    page 1 a stripped thumbnail, then one tiled page per further level.  levels: downsamples,
    powers of two starting at 1.  Written streaming: memory stays at a few tile rows.
    """
    w, h = spec.width, spec.height
    header = f"{_APERIO}{w}x{h} [0,0 {w}x{h}] ({tile}x{tile}) {compression.upper()} Q={quality}"
    description = f"{header}|MPP = {spec.mpp!r}|AppMag = {round(10.0 / spec.mpp)}|Filename = {Path(path).stem}"
    return _write_pyramid(Path(path), spec, truth, tile, levels, compression, quality, description, None)


def write_generic_tiff(
    path: str | Path,
    spec: SyntheticSpec,
    truth: SyntheticTruth | None = None,
    *,
    mpp: float | Literal["spec"] | None = SPEC_MPP,
    pyramid: bool = True,
    tile: int = 256,
    levels: tuple[int, ...] = (1, 4, 16),
    compression: Compression = "deflate",
    quality: int = 90,
) -> SyntheticTruth:
    """Write a plain tiled TIFF (pyramid levels as reduced-resolution pages), with
    resolution tags in centimetres giving `mpp` (spec.mpp by default; None: no tags).
    OpenSlide opens it as "generic-tiff" and TiffSlide reads every level.  Returns the truth.
    """
    resolution = spec.mpp if mpp == SPEC_MPP else mpp
    levels = levels if pyramid else (1,)
    return _write_pyramid(Path(path), spec, truth, tile, levels, compression, quality, None, resolution)


def _write_pyramid(
    path: Path,
    spec: SyntheticSpec,
    truth: SyntheticTruth | None,
    tile: int,
    levels: tuple[int, ...],
    compression: Compression,
    quality: int,
    aperio_description: str | None,
    mpp: float | None,
) -> SyntheticTruth:
    """Stream level 0 one strip of tile rows at a time, area-averaging each strip into
    on-disk arrays for the other levels (and the SVS thumbnail), then write those."""
    import tempfile

    import tifffile

    if tile < 16 or tile % 16:
        raise ValueError(f"tile must be a positive multiple of 16 px, got {tile}")
    if not levels or levels[0] != 1 or any(b <= a for a, b in zip(levels, levels[1:])):
        raise ValueError(f"levels must be increasing downsamples starting at 1, got {levels}")
    if any(d & (d - 1) for d in levels) or min(spec.width, spec.height) // levels[-1] < 1:
        raise ValueError(
            f"levels must be powers of two that leave pixels of a {spec.width}x{spec.height} slide, got {levels}"
        )
    if compression not in _CODECS or not 1 <= quality <= 100:
        raise ValueError(
            f"compression must be one of {sorted(_CODECS)} with quality 1-100, got {compression!r}, {quality}"
        )
    truth = make_nuclei(spec) if truth is None else truth
    w, h = spec.width, spec.height
    aperio = aperio_description is not None
    # SVS thumbnail: the smallest power-of-two downsample >= 2 whose longest side is <= 1024 px
    # (slides up to 2048 px get 2; the exponent is never negative, whatever the slide size)
    thumb_ds = 1 << max(1, math.ceil(math.log2(max(w, h) / 1024))) if aperio else levels[-1]
    reduced_ds = sorted(set(levels[1:]) | ({thumb_ds} if aperio else set()))
    strip = math.lcm(tile, *reduced_ds)
    options: dict[str, Any] = {"photometric": "rgb", "compression": _CODECS[compression], "metadata": None}
    if compression == "jpeg":
        options["compressionargs"] = {"level": quality}
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".synthetic-") as scratch:
        reduced = {
            d: np.lib.format.open_memmap(Path(scratch) / f"{d}.npy", "w+", np.uint8, (h // d, w // d, 3))
            for d in reduced_ds
        }

        def level0_tiles() -> Iterator[np.ndarray]:
            for y in range(0, h, strip):
                rows = min(strip, h - y)
                band = np.empty((rows, w, 3), np.uint8)
                for x in range(0, w, 2048):
                    band[:, x : x + 2048] = render_region(spec, truth, x, y, min(2048, w - x), rows)
                for d, out in reduced.items():
                    n_rows, n_cols = min(rows // d, out.shape[0] - y // d), out.shape[1]
                    if n_rows > 0:
                        total = band[: n_rows * d, : n_cols * d].reshape(n_rows, d, n_cols, d, 3).sum((1, 3), np.uint32)
                        out[y // d : y // d + n_rows] = (total + d * d // 2) // (d * d)
                yield from _tiles(band, tile)

        pages: list[tuple[Any, dict[str, Any]]] = [
            (level0_tiles(), {"shape": (h, w, 3), "description": aperio_description, **_resolution(mpp, 1)})
        ]
        if aperio:
            pages.append((np.asarray(reduced[thumb_ds]), {"description": f"{_APERIO}{w}x{h} -> thumbnail"}))
        for d in levels[1:]:
            shape = reduced[d].shape
            kind = {"description": f"{_APERIO}{w}x{h} -> {shape[1]}x{shape[0]}"} if aperio else {"subfiletype": 1}
            pages.append((_tiles(reduced[d], tile), {"shape": shape, **kind, **_resolution(mpp, d)}))
        with tifffile.TiffWriter(path, bigtiff=w * h * 3 * 1.4 > 2**31) as tif:
            for data, page in pages:
                tiled: dict[str, Any] = {"dtype": np.uint8, "tile": (tile, tile)} if "shape" in page else {}
                tif.write(data, **page, **tiled, **options)
        pages.clear()
        reduced.clear()
    logger.debug("wrote %s: %dx%d, levels %s, %d nuclei", path, w, h, levels, len(truth))
    return truth


def _resolution(mpp: float | None, downsample: int) -> dict[str, Any]:
    if mpp is None:
        return {}
    per_cm = 1e4 / (mpp * downsample)
    return {"resolution": (per_cm, per_cm), "resolutionunit": "CENTIMETER"}


def _tiles(image: np.ndarray, tile: int) -> Iterator[np.ndarray]:
    """Row-major (tile, tile, 3) tiles of an (h, w, 3) array, edge tiles padded white."""
    h, w = image.shape[:2]
    for y in range(0, h, tile):
        for x in range(0, w, tile):
            block = image[y : y + tile, x : x + tile]
            if block.shape[:2] != (tile, tile):
                padded = np.full((tile, tile, 3), 255, np.uint8)
                padded[: block.shape[0], : block.shape[1]] = block
                block = padded
            yield np.ascontiguousarray(block)
