"""Damaged JPEG tiles that decoders accept: found from the file's bytes.

A tile whose compressed data was cut short or overwritten with zeros decodes without an error
in OpenSlide and in TiffSlide (libjpeg-turbo and imagecodecs treat the missing data as a
warning and fill grey), which would give a plausible-looking wrong result.  A JPEG stream ends
with the marker FF D9 (EOI, ITU-T T.81 B.2.1), and inside entropy-coded data an FF byte is
always followed by 00 or a restart marker, so FF D9 can only be the real end: a tile whose
bytes (less any zero padding) do not end with it is damaged.  JPEG 2000 tiles (Aperio 33003 /
33005) are not checked: their end marker (EOC) is one some encoders leave out.  Readers check each tile once, before its first decode, and raise
ValueError for a damaged one; `wsiseg.workers.GuardedReader` then names its region and applies
--on-bad-tile like for any tile the decoder refuses.

Only tiled TIFF pages are checked (SVS, generic and OME-TIFF pyramids), matched to a reader's
level by their pixel size; any other file or page is read as before.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

#: TIFF compressions whose tiles are checked: 7, JPEG (the TIFF compression registry as tifffile
#: lists it).
CHECKED_COMPRESSIONS = frozenset({7})
END_MARKER = b"\xff\xd9"
TAIL_BYTES = 4096  # a tile's last bytes read to find its end marker after any zero padding


@dataclass(frozen=True)
class TileIndex:
    """Where a level's compressed tiles lie in the file: tile size (px), tiles per row, and
    each tile's byte offset and count (row-major)."""

    tile_w: int
    tile_h: int
    across: int
    offsets: tuple[int, ...]
    counts: tuple[int, ...]


def damaged_reason(fh: BinaryIO, offset: int, count: int) -> str | None:
    """Why the codestream of `count` bytes at byte `offset` is damaged, or None when it ends
    with its end marker (zero padding after it allowed) or is empty (a sparse tile)."""
    if count <= 0:
        return None
    n = min(count, TAIL_BYTES)
    fh.seek(offset + count - n)
    tail = fh.read(n).rstrip(b"\x00")
    if tail.endswith(END_MARKER):
        return None
    return "its JPEG data ends without the end-of-image marker (cut short or overwritten)"


def _tile_indexes(path: Path) -> dict[tuple[int, int], TileIndex]:
    """TileIndex of every single-page tiled level with JPEG tiles, keyed by the
    level's (width, height) px; empty for a file tifffile cannot parse."""
    import tifffile

    found: dict[tuple[int, int], TileIndex] = {}
    try:
        with tifffile.TiffFile(path) as tiff:
            for series in tiff.series:
                for level in series.levels:
                    page = level.keyframe
                    if len(level.pages) != 1 or not page.is_tiled or int(page.compression) not in CHECKED_COMPRESSIONS:
                        continue
                    size = (int(page.imagewidth), int(page.imagelength))
                    found.setdefault(size, TileIndex(
                        int(page.tilewidth), int(page.tilelength), -(-size[0] // int(page.tilewidth)),
                        tuple(int(v) for v in page.dataoffsets), tuple(int(v) for v in page.databytecounts),
                    ))
    except Exception:  # noqa: BLE001 - not a TIFF, or one tifffile cannot parse: nothing to check
        return {}
    return found


class CodestreamCheck:
    """Checks the tiles a region of a level covers, each tile once (per reader)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._indexes: dict[tuple[int, int], TileIndex] | None = None
        self._checked: set[tuple[tuple[int, int], int]] = set()
        self._file: BinaryIO | None = None

    def check(self, level_size: tuple[int, int], x: int, y: int, w: int, h: int) -> None:
        """Raise ValueError naming the first damaged tile of the region [x, x + w) x [y, y + h)
        (level px) of the level of `level_size` (width, height) px."""
        if self._indexes is None:
            self._indexes = _tile_indexes(self.path)
        index = self._indexes.get((int(level_size[0]), int(level_size[1])))
        x0, y0 = max(int(x), 0), max(int(y), 0)
        x1, y1 = min(int(x + w), int(level_size[0])), min(int(y + h), int(level_size[1]))
        if index is None or x1 <= x0 or y1 <= y0:
            return
        for row in range(y0 // index.tile_h, (y1 - 1) // index.tile_h + 1):
            for col in range(x0 // index.tile_w, (x1 - 1) // index.tile_w + 1):
                number = row * index.across + col
                key = (level_size, number)
                if key in self._checked or number >= len(index.offsets):
                    continue
                if self._file is None:
                    self._file = open(self.path, "rb")  # noqa: SIM115 - closed in close()
                reason = damaged_reason(self._file, index.offsets[number], index.counts[number])
                if reason is not None:
                    raise ValueError(f"tile at ({col * index.tile_w}, {row * index.tile_h}) level px: {reason}")
                self._checked.add(key)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
