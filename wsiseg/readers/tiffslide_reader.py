"""TiffSlide backend: SVS, generic (pyramidal) TIFF and other tifffile-readable slides.

Pure Python (tifffile + imagecodecs), so it is the fallback where OpenSlide fails or is
missing, and it reads tifffile-written pyramids OpenSlide does not know.  tiffslide is
imported when a slide is opened, never at module import.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from wsiseg.readers.base import BaseSlideReader, SlideError, read_clipped
from wsiseg.readers.openslide_reader import properties_from_metadata
from wsiseg.readers.registry import register_backend


def l0_for_level_px(v: int, downsample: float) -> int:
    """The level-0 coordinate TiffSlide maps back to level pixel `v` (int(l0 / ds) == v).

    TiffSlide truncates location / downsample; this inverts that exactly, even for
    non-integer downsamples where v * ds does not round-trip.
    """
    loc = int(np.ceil(v * downsample))
    while loc > 0 and int(loc / downsample) > v:
        loc -= 1
    while int(loc / downsample) < v:
        loc += 1
    return loc


@register_backend(
    "tiffslide",
    (".svs", ".tif", ".tiff", ".ndpi", ".scn", ".bif"),
    priority=50,
    requires=("tiffslide",),
    install="tiffslide",
)
class TiffSlideReader(BaseSlideReader):
    """A slide read through TiffSlide; level pixels map to level 0 by round(l0 / ds)."""

    def __init__(self, path: Path, *, mpp: float | None = None) -> None:
        super().__init__(path, mpp=mpp)
        import tiffslide

        self._slide = tiffslide.TiffSlide(str(self.path))
        try:
            metadata = dict(self._slide.properties)
            axes = metadata.get("tiffslide.series-axes")
            if axes not in ("YXS", "YX"):
                raise SlideError(f"{self.path}: image axes {axes!r} are not a 2-D RGB or grey image")
            self.properties = properties_from_metadata(
                self.path,
                "tiffslide",
                metadata,
                "tiffslide",
                tuple(self._slide.level_dimensions),
                tuple(self._slide.level_downsamples),
                mpp_override=mpp,
            )
            # Decode one pixel of the smallest level: fails now, not mid-run, on unknown codecs.
            self._read_level(self.properties.level_count - 1, 0, 0, 1, 1)
        except BaseException:
            self._slide.close()
            raise

    def read_region(self, location_l0: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """(h, w, 3) uint8 RGB of `level` at `location_l0` (level-0 px), size (w, h) level px.

        Pixels outside the level are white.
        """
        self._check_level(level)
        ds = self.properties.level_downsamples[level]
        x = int(round(location_l0[0] / ds))
        y = int(round(location_l0[1] / ds))
        return self._read_level(level, x, y, int(size[0]), int(size[1]))

    def _read_level(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        ds = self.properties.level_downsamples[level]
        self._check_codestreams(level, x, y, w, h)

        def fetch(x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
            location = (l0_for_level_px(x0, ds), l0_for_level_px(y0, ds))
            return self._slide.read_region(location, level, (x1 - x0, y1 - y0), as_array=True, padding=False)

        return read_clipped(self.properties.level_dimensions[level], (x, y), (w, h), fetch)

    def close(self) -> None:
        self._slide.close()
        super().close()
