"""A weight-free nucleus model: blob-detection prompter and seeded-watershed segmentor.

Both work on the haematoxylin optical density (`wsiseg.stain.hematoxylin_od`) of H&E tiles
at 0.5 µm/px.  That resolution keeps them fast (a quarter of the pixels of 0.25 µm/px) while
nuclei, 4-20 µm across, still span 8-40 px: enough for their shape.  No torch, no weights.

Prompter: scale-normalised differences of Gaussians (DoG) of the haematoxylin OD, at scales
tuned to nucleus radii of about 3.5-10 px, respond to a uniform disc of the matching size
with its contrast over the surround (OD units).  Candidates are 3x3 maxima of each scale
with enough absolute and relative contrast on haematoxylin-rich pixels.  A candidate is
dropped when a stronger one lies within `nms_radius_px`, or within the merge radius with
no dip between them (see `ClassicalPrompter._suppress`); dropped candidates still
suppress, so no decision chains across the tile.  Every filter is truncated and computed
by position-independent code and sub-pixel offsets are multiples of 1/64 px, so a point
farther than `context_px` from a tile's edge is bit-identical to the one found in any
larger tile or the whole image.

Segmentor: for each prompt, the window of side 2 * max_radius_px + 1 centred on the
prompt's pixel, of the lightly smoothed haematoxylin OD.  The nucleus is the 4-connected
region around the prompt above half way from the window's background (a low percentile)
to the prompt's peak, split from neighbouring nuclei by a watershed seeded at the prompt
and at its negatives (label 0 in the PromptBatch), holes filled, clipped to a disc of
max_radius_px.  A prompt's mask depends only on the pixels within `halo_px` of its pixel
and on its seeds, so it is the same in every tile that holds that neighbourhood.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage as ndi

from wsiseg.models.protocols import (
    NUCLEUS,
    NucleusClass,
    PointSet,
    PromptBatch,
    TileMasks,
)
from wsiseg.stain import hematoxylin_od

log = logging.getLogger(__name__)

#: Gaussian kernels are truncated at this many sigmas (their support is part of context_px).
TRUNCATE_SIGMAS = 3.0
#: Ratio between consecutive Gaussian scales; a DoG of sigma and K*sigma peaks at the centre
#: of a disc of radius sqrt(4 ln 2) * sigma with 1/4 of the disc's contrast (for K = sqrt 2).
SCALE_RATIO = math.sqrt(2.0)
_DOG_RADIUS_PER_SIGMA = math.sqrt(4.0 * math.log(2.0))
_DOG_PEAK_FRACTION = 0.25
_SUBPIXEL_STEPS = 64.0
#: Light blur of the haematoxylin OD on which waists between touching nuclei are measured.
NECK_SIGMA_PX = 1.0


def _gaussian_kernel(sigma_px: float) -> np.ndarray:
    """(2r+1,) float64 normalised Gaussian truncated at r = ceil(TRUNCATE_SIGMAS * sigma)."""
    r = math.ceil(TRUNCATE_SIGMAS * sigma_px)
    x = np.arange(-r, r + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / sigma_px) ** 2)
    return k / k.sum()


def _blur(image: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Separable blur, float32.  scipy's correlate1d sums each output pixel in a fixed order
    in float64, so interior values do not depend on where the image was cropped."""
    tmp = ndi.correlate1d(image, kernel, axis=0, mode="reflect")
    return ndi.correlate1d(tmp, kernel, axis=1, mode="reflect")


def _check_tiles(tiles: np.ndarray) -> np.ndarray:
    tiles = np.asarray(tiles)
    if tiles.ndim != 4 or tiles.shape[-1] != 3 or tiles.dtype != np.uint8:
        raise ValueError(f"tiles must be (B, H, W, 3) uint8 RGB, got {tiles.shape} {tiles.dtype}")
    return tiles


@dataclass(frozen=True)
class ClassicalPrompter:
    """One point per nucleus from haematoxylin blobs (see the module docstring).

    mpp: µm per pixel the tiles arrive at.
    min_diameter_um, max_diameter_um: nucleus sizes the DoG scales are tuned to (larger
        nuclei are still found, with a lower contrast).
    nms_radius_um: two points are never closer than this.
    merge_radius_um, min_dip, min_dip_hematoxylin, neck_*: a weaker point this close to a
        stronger one is dropped unless the signal dips or the blob narrows between them
        (see `_suppress`).
    min_contrast_od: blob contrast over its surround (OD units) a point needs.
    min_relative_contrast: contrast / smoothed haematoxylin OD at the point.
    min_hematoxylin_od: smoothed haematoxylin OD a point needs (the foreground check).
    score_scale_od: score = 1 - exp(-contrast / score_scale_od), in [0, 1).
    """

    mpp: float = 0.5
    min_diameter_um: float = 3.5
    max_diameter_um: float = 10.0
    nms_radius_um: float = 3.0
    merge_radius_um: float = 7.0
    min_dip: float = 0.15
    min_dip_hematoxylin: float = 0.1
    neck_level: float = 0.5
    neck_ratio: float = 0.7
    neck_probe_px: int = 6
    min_contrast_od: float = 0.1
    min_relative_contrast: float = 0.4
    min_hematoxylin_od: float = 0.18
    score_scale_od: float = 0.3
    name: str = "classical"
    sigmas_px: tuple[float, ...] = field(init=False)
    nms_radius_px: float = field(init=False)
    merge_radius_px: float = field(init=False)
    context_px: int = field(init=False)

    def __post_init__(self) -> None:
        for key in ("mpp", "min_diameter_um", "max_diameter_um", "nms_radius_um", "score_scale_od"):
            if not getattr(self, key) > 0:
                raise ValueError(f"ClassicalPrompter.{key} must be > 0, got {getattr(self, key)}")
        if self.max_diameter_um < self.min_diameter_um:
            raise ValueError(
                f"ClassicalPrompter.max_diameter_um ({self.max_diameter_um}) is below min_diameter_um "
                f"({self.min_diameter_um})"
            )
        for key in ("merge_radius_um", "min_contrast_od", "min_relative_contrast", "min_hematoxylin_od"):
            if getattr(self, key) < 0:
                raise ValueError(f"ClassicalPrompter.{key} must be >= 0, got {getattr(self, key)}")
        if self.neck_probe_px < 1:
            raise ValueError(f"ClassicalPrompter.neck_probe_px must be >= 1, got {self.neck_probe_px}")
        for key in ("min_dip", "min_dip_hematoxylin", "neck_level", "neck_ratio"):
            if not 0 <= getattr(self, key) <= 1:
                raise ValueError(f"ClassicalPrompter.{key} must be in [0, 1], got {getattr(self, key)}")
        s_min = 0.5 * self.min_diameter_um / self.mpp / _DOG_RADIUS_PER_SIGMA
        s_max = 0.5 * self.max_diameter_um / self.mpp / _DOG_RADIUS_PER_SIGMA
        n_dog = 1 + max(0, round(math.log(s_max / s_min) / math.log(SCALE_RATIO)))
        sigmas = tuple(s_min * SCALE_RATIO**i for i in range(n_dog + 1))
        nms = self.nms_radius_um / self.mpp
        merge = max(self.merge_radius_um / self.mpp, nms)
        kernel_r = math.ceil(TRUNCATE_SIGMAS * sigmas[-1])
        object.__setattr__(self, "sigmas_px", sigmas)
        object.__setattr__(self, "nms_radius_px", float(nms))
        object.__setattr__(self, "merge_radius_px", float(merge))
        # A point at pixel p is decided by candidates within merge_radius (each a 3x3 maximum,
        # +1) and the smoothed OD across their segments (probes reach sqrt(merge^2 + probe^2)),
        # refined from its 3x3 neighbourhood, on responses that see the haematoxylin OD within
        # the largest kernel's radius.
        reach = math.hypot(merge, self.neck_probe_px + 0.5)
        object.__setattr__(self, "context_px", kernel_r + math.ceil(reach) + 2)

    @property
    def classes(self) -> tuple[NucleusClass, ...]:
        return (NUCLEUS,)

    def predict_points(self, tiles: np.ndarray) -> list[PointSet]:
        """tiles: (B, H, W, 3) uint8 RGB at `mpp` -> one PointSet per tile (tile px, edge frame)."""
        tiles = _check_tiles(tiles)
        return [self.detect(tile) for tile in tiles]

    def responses(self, hematoxylin: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
        """(H, W) float32 haematoxylin OD -> per-scale blob contrast (OD units) and the finest blur.

        Contrast at scale i is the DoG of sigmas i and i+1 divided by its peak fraction, so a
        uniform disc of the matching radius and contrast c responds with about c at its centre.
        """
        blurred = [_blur(hematoxylin, _gaussian_kernel(s)) for s in self.sigmas_px]
        gain = np.float32(1.0 / _DOG_PEAK_FRACTION)
        dogs = [(blurred[i] - blurred[i + 1]) * gain for i in range(len(blurred) - 1)]
        return dogs, blurred[0]

    def detect(self, tile: np.ndarray) -> PointSet:
        """Points of one (H, W, 3) uint8 RGB tile, raster order of their pixels."""
        h_od = hematoxylin_od(tile)
        if not h_od.size or float(h_od.max()) < self.min_hematoxylin_od:
            return PointSet.empty()
        dogs, smooth = self.responses(h_od)
        fg = (smooth >= np.float32(self.min_hematoxylin_od)).view(np.uint8)
        ys_l, xs_l, ss_l = [], [], []
        for i, dog in enumerate(dogs):
            cand = (
                (dog == ndi.maximum_filter(dog, size=3, mode="nearest"))
                & fg.view(bool)
                & (dog >= np.float32(self.min_contrast_od))
                & (dog >= np.float32(self.min_relative_contrast) * smooth)
            )
            y, x = np.nonzero(cand)
            ys_l.append(y)
            xs_l.append(x)
            ss_l.append(np.full(len(y), i))
        ys, xs, ss = (np.concatenate(a) for a in (ys_l, xs_l, ss_l))
        if len(ys) == 0:
            return PointSet.empty()
        stack = np.stack(dogs)
        resp = stack[ss, ys, xs]
        keep = self._suppress(ys, xs, ss, resp, stack.max(axis=0), smooth, h_od)
        ys, xs, ss, resp = ys[keep], xs[keep], ss[keep], resp[keep]
        order = np.lexsort((xs, ys))
        ys, xs, ss, resp = ys[order], xs[order], ss[order], resp[order]
        xy = _refine(stack, ys, xs, ss)
        score = 1.0 - np.exp(-resp.astype(np.float64) / self.score_scale_od)
        return PointSet(xy, score.astype(np.float32), np.zeros(len(ys), np.int16))

    def _suppress(
        self,
        ys: np.ndarray,
        xs: np.ndarray,
        ss: np.ndarray,
        resp: np.ndarray,
        best: np.ndarray,
        smooth: np.ndarray,
        hematoxylin: np.ndarray,
    ) -> np.ndarray:
        """Keep mask over candidates (pixel ys, xs, scale ss, response resp).

        A candidate is dropped when a stronger one lies within the NMS radius, or within the
        merge radius with no dip between them: on the straight line joining them, the best
        response (max over scales) stays above (1 - min_dip) and the smoothed haematoxylin
        above (1 - min_dip_hematoxylin) of the lower of their two values, and the blob joining
        them has no waist (`_necked`).  (Texture inside a large or elongated nucleus shows
        none of these; touching nuclei show at least one: a pale nucleus next to a dark one
        has no haematoxylin dip but a response dip, two alike ones a waist.)
        Dropped candidates still suppress, so the outcome for a candidate depends only on
        candidates within the merge radius (no greedy chains).
        """
        from scipy.spatial import cKDTree

        n = len(ys)
        # Total order: higher response, then earlier raster position, then finer scale.
        rank = np.empty(n, np.int64)
        rank[np.lexsort((ss, xs, ys, -resp.astype(np.float64)))] = np.arange(n)
        pts = np.stack([ys, xs], axis=1).astype(np.float64)
        pairs = cKDTree(pts).query_pairs(self.merge_radius_px, output_type="ndarray")
        keep = np.ones(n, bool)
        if len(pairs) == 0:
            return keep
        a, b = pairs[:, 0], pairs[:, 1]
        weak = np.where(rank[a] > rank[b], a, b)
        strong = np.where(rank[a] > rank[b], b, a)
        dy = ys[strong] - ys[weak]
        dx = xs[strong] - xs[weak]
        close = dy * dy + dx * dx <= self.nms_radius_px**2
        # Sample the segment at integer offsets from the weak pixel (translation-invariant).
        t = np.linspace(0.0, 1.0, 2 * math.ceil(self.merge_radius_px) + 1)
        py = ys[weak][:, None] + np.rint(dy[:, None] * t[None, :]).astype(np.int64)
        px = xs[weak][:, None] + np.rint(dx[:, None] * t[None, :]).astype(np.int64)

        def no_dip(field: np.ndarray, dip: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            lo, hi = field[ys[weak], xs[weak]], field[ys[strong], xs[strong]]
            return field[py, px].min(axis=1) >= np.float32(1.0 - dip) * np.minimum(lo, hi), lo, hi

        flat_best, _, _ = no_dip(best, self.min_dip)
        flat_h, h_weak, h_strong = no_dip(smooth, self.min_dip_hematoxylin)
        merge = flat_best & flat_h & ~close
        if merge.any():
            i = np.flatnonzero(merge)
            level = np.float32(self.neck_level) * np.minimum(h_weak[i], h_strong[i])
            fine = _blur(hematoxylin, _gaussian_kernel(NECK_SIGMA_PX))
            merge[i] = ~self._necked(fine, ys[weak[i]], xs[weak[i]], dy[i], dx[i], level)
        keep[weak[close | merge]] = False
        return keep

    def _necked(
        self, fine: np.ndarray, y0: np.ndarray, x0: np.ndarray, dy: np.ndarray, dx: np.ndarray, level: np.ndarray
    ) -> np.ndarray:
        """Whether the blob {fine >= level} joining (y0, x0) to (y0 + dy, x0 + dx) narrows
        between them: its width across the segment (capped at 2 * neck_probe_px + 1) drops
        below neck_ratio of the width at both ends.  A convex nucleus is never narrower
        inside than at the ends (its width is concave along a line); two touching round
        nuclei form a waist."""
        h, w = fine.shape
        length = np.sqrt(dy * dy + dx * dx).astype(np.float64)
        ny, nx = dx / length, -dy / length  # unit normal
        t = np.linspace(0.0, 1.0, 2 * math.ceil(self.merge_radius_px) + 1)[None, :, None]
        k = np.arange(-self.neck_probe_px, self.neck_probe_px + 1, dtype=np.float64)[None, None, :]
        oy = np.rint(dy[:, None, None] * t + ny[:, None, None] * k).astype(np.int64)
        ox = np.rint(dx[:, None, None] * t + nx[:, None, None] * k).astype(np.int64)
        yy = np.clip(y0[:, None, None] + oy, 0, h - 1)
        xx = np.clip(x0[:, None, None] + ox, 0, w - 1)
        above = fine[yy, xx] >= level[:, None, None]
        c = self.neck_probe_px
        right = np.cumprod(above[:, :, c:], axis=2).sum(axis=2)
        left = np.cumprod(above[:, :, c::-1], axis=2).sum(axis=2)
        width = np.maximum(right + left - 1, 0)
        ends = np.minimum(width[:, 0], width[:, -1])
        return width[:, 1:-1].min(axis=1) < self.neck_ratio * ends


def _refine(stack: np.ndarray, ys: np.ndarray, xs: np.ndarray, ss: np.ndarray) -> np.ndarray:
    """Sub-pixel peak positions (N, 2) float32 x, y (edge frame) by a parabola per axis."""
    _, h, w = stack.shape
    out = np.stack([xs + 0.5, ys + 0.5], axis=1).astype(np.float64)
    for axis, (n, coord) in enumerate(((w, xs), (h, ys))):
        ok = (coord > 0) & (coord < n - 1)
        s, yy, xx = ss[ok], ys[ok], xs[ok]
        if axis == 0:
            lo, hi = stack[s, yy, xx - 1], stack[s, yy, xx + 1]
        else:
            lo, hi = stack[s, yy - 1, xx], stack[s, yy + 1, xx]
        lo, hi, c = lo.astype(np.float64), hi.astype(np.float64), stack[s, yy, xx].astype(np.float64)
        den = lo - 2.0 * c + hi
        with np.errstate(divide="ignore", invalid="ignore"):
            d = np.where(den < 0, 0.5 * (lo - hi) / den, 0.0)
        # Quantised to 1/64 px: exact in float32, so adding a tile's integer origin is exact.
        out[ok, axis] += np.rint(np.clip(d, -0.5, 0.5) * _SUBPIXEL_STEPS) / _SUBPIXEL_STEPS
    return out.astype(np.float32)


@dataclass(frozen=True)
class ClassicalSegmentor:
    """One mask per prompt by a seeded watershed in a window around it (see module docstring).

    mpp: µm per pixel the tiles arrive at.
    max_diameter_um: the largest nucleus returned; masks are clipped to a disc of this
        diameter around the prompt.
    k_negatives: how many nearest other prompts the pipeline sends as negatives.
    smoothing_sigma_px: Gaussian blur of the haematoxylin OD before thresholding.
    level: the nucleus boundary lies at this fraction of the way from the window's
        background (its `background_percentile`) to the prompt's peak haematoxylin OD.
    min_hematoxylin_od: floor for that threshold, and the least peak OD a nucleus has.
    min_contrast_od: the least peak-over-background contrast; below it the mask is empty.
    """

    mpp: float = 0.5
    max_diameter_um: float = 20.0
    k_negatives: int = 6
    smoothing_sigma_px: float = 1.0
    level: float = 0.5
    background_percentile: float = 20.0
    min_hematoxylin_od: float = 0.12
    min_contrast_od: float = 0.06
    peak_radius_px: int = 2
    compactness: float = 0.0
    name: str = "classical"
    input_size_px: int | None = None
    max_radius_px: int = field(init=False)
    max_nucleus_diameter_px: int = field(init=False)
    halo_px: int = field(init=False)

    def __post_init__(self) -> None:
        for key in ("mpp", "max_diameter_um", "smoothing_sigma_px"):
            if not getattr(self, key) > 0:
                raise ValueError(f"ClassicalSegmentor.{key} must be > 0, got {getattr(self, key)}")
        if self.k_negatives < 0:
            raise ValueError(f"ClassicalSegmentor.k_negatives must be >= 0, got {self.k_negatives}")
        if not 0 < self.level < 1:
            raise ValueError(f"ClassicalSegmentor.level must be in (0, 1), got {self.level}")
        if not 0 <= self.background_percentile <= 100:
            raise ValueError(
                f"ClassicalSegmentor.background_percentile must be in [0, 100], got {self.background_percentile}"
            )
        for key in ("min_hematoxylin_od", "min_contrast_od", "peak_radius_px", "compactness"):
            if getattr(self, key) < 0:
                raise ValueError(f"ClassicalSegmentor.{key} must be >= 0, got {getattr(self, key)}")
        radius = max(1, round(0.5 * self.max_diameter_um / self.mpp))
        object.__setattr__(self, "max_radius_px", radius)
        object.__setattr__(self, "max_nucleus_diameter_px", 2 * radius + 1)
        # The window reaches max_radius from floor(prompt); the blur adds its kernel radius.
        blur_r = (len(_gaussian_kernel(self.smoothing_sigma_px)) - 1) // 2
        object.__setattr__(self, "halo_px", radius + blur_r)

    def segment_tiles(self, tiles: np.ndarray, prompts: Sequence[PromptBatch]) -> list[TileMasks]:
        """tiles: (B, H, W, 3) uint8 RGB at `mpp`; one PromptBatch per tile -> one TileMasks per tile."""
        tiles = _check_tiles(tiles)
        if len(prompts) != len(tiles):
            raise ValueError(f"got {len(prompts)} prompt batches for {len(tiles)} tiles")
        return [self.segment(tile, batch) for tile, batch in zip(tiles, prompts)]

    def smoothed_hematoxylin(self, tile: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 RGB -> (H, W) float32 blurred haematoxylin OD (what masks are cut from)."""
        return _blur(hematoxylin_od(tile), _gaussian_kernel(self.smoothing_sigma_px))

    def segment(self, tile: np.ndarray, batch: PromptBatch) -> TileMasks:
        """Masks of one tile's prompts (tile px); empty masks where no nucleus is found."""
        n = len(batch)
        boxes = np.zeros((n, 4), np.int32)
        masks: list[np.ndarray] = [np.zeros((0, 0), bool)] * n
        quality = np.zeros(n, np.float32)
        if n == 0:
            return TileMasks(boxes, [], quality)
        hs = self.smoothed_hematoxylin(tile)
        for i in range(n):
            found = _segment_one(self, hs, batch.points[i], batch.labels[i])
            if found is not None:
                boxes[i], masks[i], quality[i] = found
        return TileMasks(boxes, masks, quality)


def _segment_one(
    cfg: ClassicalSegmentor, hs: np.ndarray, points: np.ndarray, labels: np.ndarray
) -> tuple[tuple[int, int, int, int], np.ndarray, float] | None:
    """The mask of one prompt: (box x0, y0, x1, y1 in tile px, cropped bool mask, quality),
    or None when no nucleus is there.  points (N, 2) x, y tile px; labels (N,) 1/0/-1."""
    import cv2
    from skimage.segmentation import watershed

    h, w = hs.shape
    r = cfg.max_radius_px
    x, y = float(points[0, 0]), float(points[0, 1])
    if labels[0] != 1 or not (math.isfinite(x) and math.isfinite(y)):
        return None
    cx, cy = math.floor(x), math.floor(y)
    if not (0 <= cx < w and 0 <= cy < h):
        return None
    wy0, wy1, wx0, wx1 = max(cy - r, 0), min(cy + r + 1, h), max(cx - r, 0), min(cx + r + 1, w)
    win = hs[wy0:wy1, wx0:wx1]
    sy, sx = cy - wy0, cx - wx0
    pr = cfg.peak_radius_px
    cy0, cx0 = max(sy - pr, 0), max(sx - pr, 0)
    core = win[cy0 : sy + pr + 1, cx0 : sx + pr + 1]
    peak = float(core.max())
    k = round(cfg.background_percentile / 100.0 * (win.size - 1))
    background = float(np.partition(win, k, axis=None)[k])
    if peak < cfg.min_hematoxylin_od or peak - background < cfg.min_contrast_od:
        return None
    threshold = max(background + cfg.level * (peak - background), cfg.min_hematoxylin_od)
    fg = win > np.float32(threshold)
    if not fg[sy, sx]:
        # The prompt sits just off the nucleus: start from the darkest pixel next to it.
        j = int(np.argmax(core))
        sy, sx = cy0 + j // core.shape[1], cx0 + j % core.shape[1]
        if not fg[sy, sx]:
            return None
    _, cc = cv2.connectedComponents(fg.view(np.uint8), connectivity=4)
    region = cc == cc[sy, sx]
    seeds = np.floor(points).astype(np.int64) - np.array([wx0, wy0])
    others = (labels >= 0) & np.all(np.isfinite(points), axis=1)
    others[0] = False
    inside = others & (seeds[:, 0] >= 0) & (seeds[:, 0] < win.shape[1]) & (seeds[:, 1] >= 0) & (seeds[:, 1] < win.shape[0])
    seeds, seed_labels = seeds[inside], labels[inside]
    on_region = region[seeds[:, 1], seeds[:, 0]] & ((seeds[:, 1] != sy) | (seeds[:, 0] != sx))
    seeds, seed_labels = seeds[on_region], seed_labels[on_region]
    if (seed_labels == 0).any():
        rows = np.flatnonzero(region.any(axis=1))
        cols = np.flatnonzero(region.any(axis=0))
        by0, by1, bx0, bx1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
        markers = np.zeros((by1 - by0, bx1 - bx0), np.int32)
        markers[seeds[:, 1] - by0, seeds[:, 0] - bx0] = np.where(seed_labels == 1, 1, 2)
        markers[sy - by0, sx - bx0] = 1
        flooded = watershed(
            -win[by0:by1, bx0:bx1],
            markers,
            mask=region[by0:by1, bx0:bx1],
            connectivity=1,
            compactness=cfg.compactness,
        )
        region = np.zeros_like(region)
        region[by0:by1, bx0:bx1] = flooded == 1
    # Clip to the largest nucleus: a disc of max_radius around the prompt's pixel.
    yy, xx = np.ogrid[wy0 - cy : wy1 - cy, wx0 - cx : wx1 - cx]
    disc = yy * yy + xx * xx <= r * r
    clipped = bool((region & ~disc).any())
    if clipped:
        region &= disc
        _, cc = cv2.connectedComponents(region.view(np.uint8), connectivity=4)
        if not region[sy, sx]:
            return None
        region = cc == cc[sy, sx]
    rows = np.flatnonzero(region.any(axis=1))
    cols = np.flatnonzero(region.any(axis=0))
    by0, by1, bx0, bx1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    mask = ndi.binary_fill_holes(region[by0:by1, bx0:bx1])
    at_edge = clipped or by0 == 0 or bx0 == 0 or by1 == win.shape[0] or bx1 == win.shape[1]
    quality = _mask_quality(mask, win[by0:by1, bx0:bx1], background, at_edge)
    box = (wx0 + int(bx0), wy0 + int(by0), wx0 + int(bx1), wy0 + int(by1))
    return box, mask, quality


def _mask_quality(mask: np.ndarray, values: np.ndarray, background: float, at_edge: bool) -> float:
    """A predicted-IoU stand-in in [0, 1]: solidity x contrast term, halved at the window edge."""
    import cv2

    area = int(mask.sum())
    ys, xs = np.nonzero(mask)
    hull = cv2.convexHull(np.stack([xs, ys], axis=1).astype(np.int32))
    # Hull of the pixel squares = hull of their centres grown by a unit square.
    hull_area = float(cv2.contourArea(hull)) + mask.shape[0] + mask.shape[1] - 1
    solidity = min(1.0, area / hull_area)
    contrast = float(values[mask].mean()) - background
    q = solidity * (1.0 - math.exp(-max(contrast, 0.0) / 0.2))
    return q * 0.5 if at_edge else q
