"""The slide-reader contract every backend implements.

All coordinates are in the slide's level-0 pixel frame as OpenSlide reports it
(x right, y down, origin at the top-left of level 0).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np


class SlideError(Exception):
    """A slide cannot be used; the message names the file and the fix."""


class UnsupportedSlideError(SlideError):
    """No backend can open this file."""


class MissingMppError(SlideError):
    """The slide has no resolution metadata and none was given with --mpp."""


@dataclass(frozen=True)
class SlideProperties:
    """What wsiseg needs to know about a slide.

    level_dimensions: (width, height) per level, level 0 first.
    level_downsamples: level-0 pixels per level pixel, level 0 = 1.0.
    mpp: micrometres per level-0 pixel (x, y), or None when the file does not say.
    bounds_l0: (x, y, width, height) of the non-empty region (openslide.bounds-*), or None.
    """

    path: Path
    reader: str
    vendor: str
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    mpp: tuple[float, float] | None
    objective_power: float | None
    bounds_l0: tuple[int, int, int, int] | None
    extra: dict[str, str] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not self.level_dimensions:
            raise ValueError("a slide needs at least one level")
        if len(self.level_dimensions) != len(self.level_downsamples):
            raise ValueError("level_dimensions and level_downsamples differ in length")

    @property
    def size_l0(self) -> tuple[int, int]:
        """(width, height) of level 0."""
        return self.level_dimensions[0]

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)


@runtime_checkable
class SlideReader(Protocol):
    """An open slide.  Readers are cheap to pickle by path (Dask workers reopen them)."""

    properties: SlideProperties

    def read_region(self, location_l0: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """Pixels of `level`, top-left at `location_l0` (level-0 px), `size` (w, h) in level px.

        Returns (h, w, 3) uint8 RGB; transparent or out-of-slide pixels are white.
        """
        ...

    def thumbnail(self, max_size: int) -> tuple[np.ndarray, float]:
        """An RGB thumbnail whose longest side is <= max_size, and its downsample from level 0."""
        ...

    def close(self) -> None: ...
