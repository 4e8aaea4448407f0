"""Dense maps computed once per slide: a prompter's maps, kept for the segmentor that shares them.

A model whose prompter and segmentor read the same dense maps of the same network (wsiseg-tiny:
foreground, centre and distance) would otherwise run that network twice over the slide: on the
prompter tiles, then again on the segmentor tiles with their halo.  With a map store, each
prompter tile writes the maps of the core it owns (the cores partition the working frame, see
`wsiseg.tiling`) and the segmentor reads any window back, so the network runs once.

The store is a Zarr array of shape (C, height, width), uint8 (value = round(255 * map), maps in
[0, 1]), chunked by the prompter stride so each core is one chunk per channel and workers never
write the same chunk.  Unwritten chunks (no tissue) read as 0.  It lives in the slide's work
folder and goes with it.

Pairing protocol (both sides optional):
    prompter.predict_points_and_maps(tiles) -> (list[PointSet], (B, C, H, W) float32 maps)
    prompter.map_key / segmentor.map_key: equal strings when both read the same maps
    prompter.map_channels: C
    segmentor.segment_maps(maps, prompts) -> list[TileMasks]
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from wsiseg.tiling import TileSpec


def shares_maps(prompter: Any, segmentor: Any) -> bool:
    """True when the segmentor can segment from the prompter's stored maps."""
    key = getattr(prompter, "map_key", None)
    return (
        key is not None
        and key == getattr(segmentor, "map_key", None)
        and isinstance(getattr(prompter, "map_channels", None), int)
        and callable(getattr(prompter, "predict_points_and_maps", None))
        and callable(getattr(segmentor, "segment_maps", None))
    )


class MapStore:
    """The (C, height, width) uint8 store of one slide's maps (working frame)."""

    def __init__(self, path: Path, array: Any) -> None:
        self.path = Path(path)
        self.array = array
        self.channels, self.height, self.width = (int(v) for v in array.shape)

    @classmethod
    def create(cls, path: Path, channels: int, width: int, height: int, chunk_px: int) -> MapStore:
        """A new, empty store (an old one at `path` is replaced)."""
        import zarr

        array = zarr.create_array(
            str(path), shape=(channels, height, width), chunks=(1, chunk_px, chunk_px), dtype="u1",
            fill_value=0, overwrite=True,
        )
        return cls(path, array)

    @classmethod
    def open(cls, path: Path) -> MapStore:
        import zarr

        return cls(path, zarr.open_array(str(path), mode="r+"))

    def write_core(self, tile: TileSpec, maps: np.ndarray) -> None:
        """Store the part of a tile's (C, size, size) float32 maps that lies in the tile's core
        (its owned region) and inside the image."""
        x0 = max(0, int(max(tile.own_x0, tile.x0)))
        y0 = max(0, int(max(tile.own_y0, tile.y0)))
        x1 = min(self.width, int(min(tile.own_x1, tile.x0 + tile.size)))
        y1 = min(self.height, int(min(tile.own_y1, tile.y0 + tile.size)))
        if x1 <= x0 or y1 <= y0:
            return
        part = maps[:, y0 - tile.y0 : y1 - tile.y0, x0 - tile.x0 : x1 - tile.x0]
        self.array[:, y0:y1, x0:x1] = quantise(part)

    def read(self, x0: int, y0: int, size: int) -> np.ndarray:
        """(C, size, size) float32 maps of the window at (x0, y0); 0 beyond the image."""
        out = np.zeros((self.channels, size, size), np.float32)
        ax0, ay0 = max(x0, 0), max(y0, 0)
        ax1, ay1 = min(x0 + size, self.width), min(y0 + size, self.height)
        if ax1 > ax0 and ay1 > ay0:
            out[:, ay0 - y0 : ay1 - y0, ax0 - x0 : ax1 - x0] = dequantise(np.asarray(self.array[:, ay0:ay1, ax0:ax1]))
        return out


def quantise(maps: np.ndarray) -> np.ndarray:
    """float maps in [0, 1] -> uint8 (round(255 * value))."""
    return np.rint(np.clip(maps, 0.0, 1.0) * 255.0).astype(np.uint8)


def dequantise(stored: np.ndarray) -> np.ndarray:
    """uint8 -> float32 in [0, 1]."""
    return stored.astype(np.float32) / np.float32(255.0)
