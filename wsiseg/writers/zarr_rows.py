"""Rows of the nuclei table written block by block through zarr's asyncio API (`wsiseg.writers.zarr_store`).

`Appender` cuts consecutive rows into whole-chunk writes; `RaggedRows` gathers the GeoArrow
offsets and coordinates of rows taken in a new (tile-major) order.  Both return the writes as
coroutines, so the caller awaits the pieces of many arrays at once.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import numpy as np

from wsiseg.writers.labels import concat_ranges

__all__ = ["Appender", "RaggedRows"]


class Appender:
    """Cuts consecutive rows of a zarr array into whole-chunk writes (the tail at `finish`).

    array: a zarr AsyncArray; `append` and `finish` return the writes (coroutines) to await,
    in order."""

    def __init__(self, array: Any, chunk_rows: int) -> None:
        self.array, self.chunk_rows = array, chunk_rows
        self.pos = 0
        self._buf: list[np.ndarray] = []
        self._n = 0

    def append(self, rows: np.ndarray) -> list[Coroutine[Any, Any, None]]:
        self._buf.append(rows)
        self._n += len(rows)
        if self._n < self.chunk_rows:
            return []
        data = np.concatenate(self._buf)
        cut = (len(data) // self.chunk_rows) * self.chunk_rows
        write = self.array.setitem(slice(self.pos, self.pos + cut), data[:cut])
        self.pos += cut
        self._buf, self._n = [data[cut:]], len(data) - cut
        return [write]

    def finish(self) -> list[Coroutine[Any, Any, None]]:
        writes = []
        if self._n:
            data = np.concatenate(self._buf)
            writes.append(self.array.setitem(slice(self.pos, self.pos + len(data)), data))
            self.pos += len(data)
        self._buf, self._n = [], 0
        if self.pos != self.array.shape[0]:
            raise RuntimeError(f"internal error: wrote {self.pos} rows into an array of {self.array.shape[0]}")
        return writes


class RaggedRows:
    """geom_offsets, ring_offsets and coords of a table's rows in a new order, block by block:
    `block` and `finish` return the writes (coroutines) to await.

    n: rows.  spool: (ring_start, n_rings, coord_start, n_coords, ring_len) per input row
    (ring_start, coord_start: the row's first ring and coordinate; ring_len: per ring), as
    arrays or memmaps; load_coords: a fresh (M, 2) float64 map of the input coordinates.
    geom, rings, xy: zarr AsyncArrays of n + 1, R + 1 and M rows, written in whole chunks of
    ring_chunk and coord_chunk rows (coords at most coord_chunk rows read at a time).
    """

    def __init__(
        self, n: int, spool: Sequence[np.ndarray], load_coords: Callable[[], np.ndarray],
        geom: Any, rings: Any, xy: Any, *, ring_chunk: int, coord_chunk: int,
    ) -> None:
        self.n, self.load_coords, self.coord_chunk = n, load_coords, coord_chunk
        self.ring_start, self.n_rings, self.coord_start, self.n_coords, self.ring_len = spool
        self.geom, self.rings, self.xy = geom, Appender(rings, ring_chunk), Appender(xy, coord_chunk)
        self.ring_base = self.coord_base = 0

    def block(self, start: int, idx: np.ndarray) -> list[Coroutine[Any, Any, None]]:
        """Rows start .. start + len(idx) of the table, input rows `idx`."""
        nr = self.n_rings[idx].astype(np.int64)
        offsets = self.ring_base + np.cumsum(nr) - nr
        ring_idx = concat_ranges(self.ring_start[idx], nr)
        lengths = self.ring_len[ring_idx]
        self.ring_base += len(ring_idx)
        if start + len(idx) == self.n:  # the closing offset goes with the last block
            offsets = np.append(offsets, self.ring_base)
        writes = [self.geom.setitem(slice(start, start + len(offsets)), offsets)]
        writes += self.rings.append(self.coord_base + np.cumsum(lengths) - lengths)
        self.coord_base += int(lengths.sum())
        return [*writes, self._coords(idx)]

    async def _coords(self, idx: np.ndarray) -> None:
        pieces = max(1, int(self.n_coords[idx].sum()) // self.coord_chunk + 1)
        for part in np.array_split(np.arange(len(idx)), pieces):
            # a fresh map per piece: touched pages leave the process when it is dropped (flat RSS)
            coords = self.load_coords()
            rows = concat_ranges(self.coord_start[idx[part]], self.n_coords[idx[part]])
            writes = self.xy.append(np.asarray(coords[rows]))
            del coords
            for write in writes:
                await write

    def finish(self) -> list[Coroutine[Any, Any, None]]:
        writes = [] if self.n else [self.geom.setitem(slice(0, 1), np.zeros(1, np.int64))]
        ends = self.rings.append(np.array([self.coord_base], np.int64))
        return [*writes, *ends, *self.rings.finish(), *self.xy.finish()]
