"""The slide seen at a model's resolution (the "working frame"), and slide thumbnails.

Working pixels are level-0 pixels scaled by `scale` = target_mpp / slide_mpp (level-0 px
per working px), edge frame: a working coordinate x maps to level-0 x * scale, so working
pixel column j covers level-0 [j * scale, (j + 1) * scale).  Resampling reads the pyramid
level with the largest downsample <= scale, then area-averages (downsampling) or
interpolates bilinearly (upsampling) with weights computed from *global* working
coordinates, so any region reads the same pixels whether read whole or in pieces.
Levels whose downsample is not an integer are read on a fixed chunk grid for the same reason.
"""

from __future__ import annotations

import functools
import logging
import math
from typing import Any

import numpy as np

from wsiseg.readers.base import SlideReader, require_mpp

logger = logging.getLogger(__name__)

_CHUNK = 512  # level px; read grid for levels with a non-integer downsample
#: Largest relative difference of mpp x and y read as square pixels.
NON_SQUARE_TOLERANCE = 0.01


def choose_level(downsamples: tuple[float, ...], scale: float, tolerance: float) -> tuple[int, float]:
    """(level, scale) for reading at `scale` level-0 px per working px.

    A level whose downsample is within `tolerance` (relative) of `scale` is read 1:1 and
    the scale snaps to its downsample (level 0: exactly 1.0).  Otherwise the level with the
    largest downsample <= scale (level 0 when scale < 1), scale unchanged.
    """
    close = [(abs(scale / ds - 1.0), i) for i, ds in enumerate(downsamples) if abs(scale / ds - 1.0) <= tolerance]
    if close:
        level = min(close)[1]
        return level, 1.0 if level == 0 else float(downsamples[level])
    below = [i for i, ds in enumerate(downsamples) if ds <= scale]
    level = max(below, key=lambda i: downsamples[i]) if below else 0
    return level, float(scale)


def axis_weights(start: int, count: int, ratio: float) -> tuple[np.ndarray, np.ndarray]:
    """Source indices and weights along one axis for output pixels start..start+count-1.

    ratio: source px per output px.  Downsampling (ratio > 1) averages the source pixels
    each output pixel covers, weighted by overlap; upsampling interpolates bilinearly
    between pixel centres.  Returns (index (count, T) int64, weight (count, T) float32),
    global source indices; each row's weights sum to 1.
    """
    j = np.arange(start, start + count, dtype=np.float64)
    if ratio > 1.0:
        lo, hi = j * ratio, (j + 1.0) * ratio
        first = np.floor(lo)
        taps = int(math.ceil(ratio)) + 1
        index = first[:, None] + np.arange(taps)
        weight = np.minimum(hi[:, None], index + 1.0) - np.maximum(lo[:, None], index)
        weight = np.clip(weight, 0.0, None) / ratio
    else:
        centre = (j + 0.5) * ratio - 0.5
        first = np.floor(centre)
        frac = centre - first
        index = first[:, None] + np.arange(2)
        weight = np.stack([1.0 - frac, frac], axis=1)
    return index.astype(np.int64), weight.astype(np.float32)


#: Largest kx * ky for which float32 resampling with weights m / kx, n / ky is exact (every
#: partial sum is a multiple of 1 / (kx * ky) below 256: 8 + 12 bits of the 24 of float32).
_MAX_INTEGER_DENOMINATOR = 4096


def dyadic_denominator(weight: np.ndarray, limit: int = 64) -> int | None:
    """The smallest power of two k <= limit with every weight * k an integer, else None
    (e.g. 4 for 2x upsampling's 1/4 and 3/4, 2 for 2x downsampling's 1/2)."""
    k = 1
    while k <= limit:
        scaled = weight.astype(np.float64) * k
        if np.array_equal(scaled, np.rint(scaled)):
            return k
        k *= 2
    return None


def resample_float(patch: np.ndarray, ix: np.ndarray, wx: np.ndarray, iy: np.ndarray, wy: np.ndarray) -> np.ndarray:
    """Separable resampling: (h, w, 3) uint8 from a uint8 patch, with source indices ix (w, T)
    and iy (h, T) into the patch and float32 weights wx, wy (`axis_weights`); rounds half to even."""
    out = _separable_sums(patch, ix, wx, iy, wy)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def resample_integer(
    patch: np.ndarray, ix: np.ndarray, mx: np.ndarray, iy: np.ndarray, my: np.ndarray, denominator: int
) -> np.ndarray:
    """Separable resampling in integers: (h, w, 3) uint8 from a uint8 patch, with weights
    mx / kx along x and my / ky along y (mx, my integer-valued, kx * ky = denominator).

    The same bytes as `resample_float` with weights mx / kx, my / ky:
    that path is exact for such weights (see `_MAX_INTEGER_DENOMINATOR`) and rounds half to
    even (np.rint); this one does the same sums in integers, compiled
    (`wsiseg.readers.resample_kernels.dyadic_sums`, imported on first use: numba loads then).
    denominator: a power of two.
    """
    if denominator < 1 or denominator & (denominator - 1):
        raise ValueError(f"denominator must be a power of two, got {denominator}")
    from wsiseg.readers.resample_kernels import dyadic_sums

    return dyadic_sums(
        np.ascontiguousarray(patch, np.uint8), np.ascontiguousarray(ix, np.int64), np.ascontiguousarray(mx, np.int64),
        np.ascontiguousarray(iy, np.int64), np.ascontiguousarray(my, np.int64), denominator.bit_length() - 1,
    )


def _separable_sums(patch: np.ndarray, ix: np.ndarray, wx: np.ndarray, iy: np.ndarray, wy: np.ndarray) -> np.ndarray:
    """(h, w, 3) float32 sums of weight x patch pixel, along x (indices ix, weights wx) then y."""
    rows = np.zeros((patch.shape[0], ix.shape[0], 3), np.float32)
    for t in range(ix.shape[1]):
        rows += wx[:, t, None] * patch[:, ix[:, t]]
    out = np.zeros((iy.shape[0], ix.shape[0], 3), np.float32)
    for t in range(iy.shape[1]):
        out += wy[:, t, None, None] * rows[iy[:, t]]
    return out


class ScaledSlide:
    """A slide seen at `target_mpp`: `read` returns working-frame pixels, square at target_mpp.

    scale_xy: (x, y) level-0 px per working px; each axis is resampled on its own, so a slide
        with non-square pixels (mpp x != mpp y) gives an undistorted working frame.  For square
        pixels (within NON_SQUARE_TOLERANCE) both are the same and snap to a level's downsample
        within `tolerance` (1.0 exactly when the slide is at the target).
    scale: scale_xy's geometric mean (one number for reports; equal to both for square pixels).
    mpp: the working frame's actual mpp (slide mpp * scale).
    size_px: (width, height) of the working frame, ceil(level-0 size / scale per axis).
    level: the pyramid level pixels are read from.
    Needs the slide's mpp (open_slide(..., mpp=) supplies it); raises MissingMppError.
    """

    def __init__(self, reader: SlideReader, target_mpp: float, *, tolerance: float = 0.02) -> None:
        if not (math.isfinite(target_mpp) and target_mpp > 0):
            raise ValueError(f"target_mpp must be a positive number of micrometres per pixel, got {target_mpp}")
        if not 0.0 <= tolerance < 0.5:
            raise ValueError(f"tolerance must be in [0, 0.5), got {tolerance}")
        props = reader.properties
        mpp_x, mpp_y = require_mpp(props)
        self.slide_mpp = (mpp_x + mpp_y) / 2.0
        self.reader = reader
        self.target_mpp = float(target_mpp)
        self.tolerance = float(tolerance)
        downsamples = props.level_downsamples
        if abs(mpp_x - mpp_y) <= NON_SQUARE_TOLERANCE * min(mpp_x, mpp_y):
            self.level, self.scale = choose_level(downsamples, self.target_mpp / self.slide_mpp, tolerance)
            self.scale_xy = (self.scale, self.scale)
            self.mpp = self.slide_mpp * self.scale
        else:
            # each axis to the target on its own; the finer axis decides the level read
            sx, sy = self.target_mpp / mpp_x, self.target_mpp / mpp_y
            self.level = choose_level(downsamples, min(sx, sy), 0.0)[0]
            self.scale_xy = (sx, sy)
            self.scale = math.sqrt(sx * sy)
            self.mpp = self.target_mpp
        self.level_downsample = float(downsamples[self.level])
        # Level px per working px, per axis; exactly 1.0 means a plain crop of the level.
        self.level_ratio_xy = tuple(1.0 if s == self.level_downsample else s / self.level_downsample
                                    for s in self.scale_xy)
        self.level_ratio = self.level_ratio_xy[0]
        w0, h0 = props.size_l0
        sx, sy = self.scale_xy
        self.size_px = (int(math.ceil(w0 / sx - 1e-9)), int(math.ceil(h0 / sy - 1e-9)))

    def read(self, x0: int, y0: int, w: int, h: int) -> np.ndarray:
        """(h, w, 3) uint8 RGB of working pixels [x0, x0 + w) x [y0, y0 + h); outside is white."""
        x0, y0, w, h = int(x0), int(y0), int(w), int(h)
        if w < 0 or h < 0:
            raise ValueError(f"region size must be >= 0, got {(w, h)}")
        if w == 0 or h == 0:
            return np.full((h, w, 3), 255, np.uint8)
        rx, ry = self.level_ratio_xy
        if rx == 1.0 and ry == 1.0:
            return self._read_level(x0, y0, w, h)
        ix, wx = axis_weights(x0, w, rx)
        iy, wy = axis_weights(y0, h, ry)
        lx, ly = int(ix.min()), int(iy.min())
        patch = self._read_level(lx, ly, int(ix.max()) - lx + 1, int(iy.max()) - ly + 1)
        ix -= lx
        iy -= ly
        kx, ky = dyadic_denominator(wx), dyadic_denominator(wy)
        if kx and ky and kx * ky <= _MAX_INTEGER_DENOMINATOR:
            return resample_integer(patch, ix, np.rint(wx * kx), iy, np.rint(wy * ky), kx * ky)
        return resample_float(patch, ix, wx, iy, wy)

    def _read_level(self, x: int, y: int, w: int, h: int) -> np.ndarray:
        """(h, w, 3) uint8 pixels [x, x + w) x [y, y + h) of the chosen level (level px)."""
        ds = self.level_downsample
        if ds == round(ds):
            return self.reader.read_region((x * int(ds), y * int(ds)), self.level, (w, h))
        # A non-integer downsample puts level reads at sub-pixel offsets (OpenSlide paints at
        # l0 / ds), so read on a fixed grid of chunks: each level pixel is then always read by
        # the same request, whichever region asks for it.
        out = np.empty((h, w, 3), np.uint8)
        for oy in range(y // _CHUNK * _CHUNK, y + h, _CHUNK):
            for ox in range(x // _CHUNK * _CHUNK, x + w, _CHUNK):
                x1, y1 = min(x + w, ox + _CHUNK), min(y + h, oy + _CHUNK)
                piece = self.reader.read_region((round(ox * ds), round(oy * ds)), self.level, (x1 - ox, y1 - oy))
                x0, y0 = max(x, ox), max(y, oy)
                out[y0 - y : y1 - y, x0 - x : x1 - x] = piece[y0 - oy :, x0 - ox :]
        return out

    def to_l0(self, xy: Any) -> np.ndarray:
        """Working-frame coordinates (..., 2) as (x, y) -> level-0 coordinates, float64."""
        return np.asarray(xy, np.float64) * np.asarray(self.scale_xy)

    def from_l0(self, xy: Any) -> np.ndarray:
        """Level-0 coordinates (..., 2) as (x, y) -> working-frame coordinates, float64."""
        return np.asarray(xy, np.float64) / np.asarray(self.scale_xy)

    def __reduce__(self) -> tuple[Any, ...]:
        return (functools.partial(ScaledSlide, tolerance=self.tolerance), (self.reader, self.target_mpp))

    def __repr__(self) -> str:
        return (
            f"ScaledSlide({self.reader!r}, target_mpp={self.target_mpp}, scale={self.scale:.4f}, "
            f"level={self.level}, size_px={self.size_px})"
        )


#: Largest level (pixels) a thumbnail reads in one piece; larger levels are read in blocks.
THUMBNAIL_WHOLE_LEVEL_PX = 4_000_000  # larger levels are read in blocks, keeping memory flat


def read_thumbnail(reader: SlideReader, max_size: int) -> tuple[np.ndarray, float]:
    """An RGB thumbnail (h, w, 3) uint8 whose longest side is <= max_size, and its
    downsample from level 0 (level-0 px per thumbnail px).  Never upsamples.

    Reads the smallest sufficient pyramid level; a level too large to hold is read and
    shrunk in blocks, so memory stays bounded on slides without a pyramid.
    """
    import cv2

    if max_size < 1:
        raise ValueError(f"thumbnail max_size must be >= 1, got {max_size}")
    props = reader.properties
    w0, h0 = props.size_l0
    ds = max(1.0, max(w0, h0) / max_size)
    out_w, out_h = min(max_size, max(1, round(w0 / ds))), min(max_size, max(1, round(h0 / ds)))
    level = max(
        (i for i, d in enumerate(props.level_downsamples) if d <= ds * (1 + 1e-9)),
        key=lambda i: props.level_downsamples[i],
        default=0,
    )
    lw, lh = props.level_dimensions[level]
    if lw * lh <= THUMBNAIL_WHOLE_LEVEL_PX:
        full = reader.read_region((0, 0), level, (lw, lh))
        thumb = full if (lw, lh) == (out_w, out_h) else cv2.resize(full, (out_w, out_h), interpolation=cv2.INTER_AREA)
    else:
        lds = props.level_downsamples[level]
        rx, ry = lw / out_w, lh / out_h
        step = max(1, int(1024 // max(rx, ry)))  # blocks of about 1024² level px
        thumb = np.full((out_h, out_w, 3), 255, np.uint8)
        for i0 in range(0, out_h, step):
            i1 = min(out_h, i0 + step)
            ya, yb = int(i0 * ry), min(lh, int(math.ceil(i1 * ry)))
            for j0 in range(0, out_w, step):
                j1 = min(out_w, j0 + step)
                xa, xb = int(j0 * rx), min(lw, int(math.ceil(j1 * rx)))
                block = reader.read_region((int(round(xa * lds)), int(round(ya * lds))), level, (xb - xa, yb - ya))
                thumb[i0:i1, j0:j1] = cv2.resize(block, (j1 - j0, i1 - i0), interpolation=cv2.INTER_AREA)
    return thumb, (w0 / out_w + h0 / out_h) / 2.0
