"""Tile plans in the working frame (pixels at the model's mpp), and the ownership rules.

Prompter tiles overlap.  With stride s = tile - overlap and h = overlap // 2, tile (i, j)
covers [j*s - h, j*s - h + tile) horizontally and *owns* the points that fall in its core,
the band [j*s, (j+1)*s) (the first core starts at -inf, the last ends at +inf).  Cores
partition the plane, so every location is owned by one prompter tile; a kept point lies at
least h px from any tile edge, and the image's own edges lie at least h px inside the tiles
(beyond them the tiles read white), so a prompter whose `context_px` <= h finds the same
points tiled as untiled.

Segmentor tiles are an inner *block* of b = tile - 2*halo px plus a halo on every side.
Block (i, j) covers [j*b, (j+1)*b); a prompt is owned by the block that contains it, so
every prompt has exactly one owner and its nucleus (at most one diameter from the prompt)
lies wholly inside the owner's tile when halo >= the largest nucleus diameter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class TileSpec:
    """One tile: its box in the working frame and, for ownership, the box it owns.

    x0, y0, size: the tile's pixels are [x0, x0 + size) x [y0, y0 + size) (may extend past
    the image; those pixels are read as white).
    own_x0..own_y1: the owned region (may be infinite at the plan's outer edges).
    index: row-major tile index in its plan's grid (row * n_cols + col).
    """

    index: int
    row: int
    col: int
    x0: int
    y0: int
    size: int
    own_x0: float
    own_y0: float
    own_x1: float
    own_y1: float

    def owns(self, xy: np.ndarray) -> np.ndarray:
        """Which of the (N, 2) working-frame points this tile owns."""
        x, y = xy[:, 0], xy[:, 1]
        return (x >= self.own_x0) & (x < self.own_x1) & (y >= self.own_y0) & (y < self.own_y1)


@dataclass(frozen=True)
class TilePlan:
    """A regular grid of tiles over an image of `width` x `height` working pixels."""

    width: int
    height: int
    tile_px: int
    stride_px: int
    offset_px: int  # tile x0 = col * stride - offset: how far a tile reaches before what it owns
    n_cols: int
    n_rows: int

    def __post_init__(self) -> None:
        if self.tile_px <= 0 or self.stride_px <= 0:
            raise ValueError(f"tile ({self.tile_px}) and stride ({self.stride_px}) must be positive")

    @property
    def count(self) -> int:
        return self.n_cols * self.n_rows

    def tile(self, index: int) -> TileSpec:
        row, col = divmod(int(index), self.n_cols)
        s, o = self.stride_px, self.offset_px
        return TileSpec(
            index=int(index),
            row=row,
            col=col,
            x0=col * s - o,
            y0=row * s - o,
            size=self.tile_px,
            own_x0=-math.inf if col == 0 else col * s,
            own_y0=-math.inf if row == 0 else row * s,
            own_x1=math.inf if col == self.n_cols - 1 else (col + 1) * s,
            own_y1=math.inf if row == self.n_rows - 1 else (row + 1) * s,
        )

    def owner_of(self, xy: np.ndarray) -> np.ndarray:
        """Tile index owning each (N, 2) working-frame point: the one whose core (prompter) or
        block (segmentor), [j*s, (j+1)*s), contains it."""
        col = np.clip(np.floor(xy[:, 0] / self.stride_px), 0, self.n_cols - 1).astype(np.int64)
        row = np.clip(np.floor(xy[:, 1] / self.stride_px), 0, self.n_rows - 1).astype(np.int64)
        return row * self.n_cols + col


def plan_prompter_tiles(width: int, height: int, tile_px: int, overlap_px: int) -> TilePlan:
    """Overlapping prompter tiles covering a width x height working-frame image."""
    if not 0 <= overlap_px < tile_px:
        raise ValueError(f"--overlap ({overlap_px}) must be >= 0 and smaller than --tile-size ({tile_px})")
    if overlap_px % 2:
        raise ValueError(f"--overlap ({overlap_px}) must be even")
    stride = tile_px - overlap_px
    # the last tile reaches h = overlap/2 past the image, as the first starts h before it
    return TilePlan(
        width=width,
        height=height,
        tile_px=tile_px,
        stride_px=stride,
        offset_px=overlap_px // 2,
        n_cols=1 + max(0, math.ceil((width + overlap_px - tile_px) / stride)),
        n_rows=1 + max(0, math.ceil((height + overlap_px - tile_px) / stride)),
    )


def plan_segmentor_tiles(width: int, height: int, tile_px: int, halo_px: int) -> TilePlan:
    """Segmentor tiles: blocks of tile_px - 2*halo_px plus a halo, covering the image."""
    block = tile_px - 2 * halo_px
    if halo_px < 0 or block < 16:
        raise ValueError(
            f"a halo of {halo_px} px leaves a block of {block} px in a {tile_px} px tile; "
            "use a larger --tile-size or a smaller --overlap"
        )
    return TilePlan(
        width=width,
        height=height,
        tile_px=tile_px,
        stride_px=block,
        offset_px=halo_px,
        n_cols=max(1, math.ceil(width / block)),
        n_rows=max(1, math.ceil(height / block)),
    )
