"""The slide-reader contract every backend implements.

All coordinates are in the slide's level-0 pixel frame as OpenSlide reports it
(x right, y down, origin at the top-left of level 0).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from wsiseg.readers.resolution import MPP_RANGE


class SlideError(Exception):
    """A slide cannot be used; the message names the file and the fix."""


class UnsupportedSlideError(SlideError):
    """No backend can open this file."""


class MissingMppError(SlideError):
    """The slide has no trustworthy resolution metadata and none was given with --mpp."""


class NonSquarePixelsError(SlideError):
    """The slide's pixels are not square (mpp x and y differ by more than 1 %)."""


class NotBrightfieldError(UnsupportedSlideError):
    """The file holds something other than 8-bit brightfield (H&E) pixels."""


def not_brightfield_message(path: Path | str, what: str) -> str:
    """One line: `path` holds `what` (e.g. "uint16 pixels, 1 channel"), which wsiseg cannot segment."""
    return (
        f"{path}: {what}; only 8-bit grey or RGB(A) images are supported: wsiseg segments nuclei in "
        "brightfield H&E scans, not fluorescence or other multi-channel data (export an 8-bit RGB H&E image)"
    )


@dataclass(frozen=True)
class SlideProperties:
    """What wsiseg needs to know about a slide.

    level_dimensions: (width, height) per level, level 0 first.
    level_downsamples: level-0 pixels per level pixel, level 0 = 1.0.
    mpp: micrometres per level-0 pixel (x, y), or None when the file does not say or what
        it says is not plausible (see wsiseg.readers.resolution).
    bounds_l0: (x, y, width, height) of the non-empty region (openslide.bounds-*), or None.
    mpp_problem: why the file's resolution is not used (one clause), when it holds one.
    file_mpp: the plausible resolution the file itself states (x, y; µm per level-0 pixel), even
        when an mpp override replaces it in `mpp`; None when it states none or an implausible one.
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
    mpp_problem: str | None = None
    file_mpp: tuple[float, float] | None = None

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


def checked_mpp(mpp_x: object, mpp_y: object) -> tuple[float, float] | None:
    """(mpp_x, mpp_y) in micrometres per level-0 pixel, or None when either is missing,
    unparsable or outside MPP_RANGE."""
    try:
        x, y = float(mpp_x), float(mpp_y)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    lo, hi = MPP_RANGE
    if not (lo <= x <= hi and lo <= y <= hi):
        return None
    return (x, y)


def require_mpp(props: SlideProperties, path: Path | str | None = None) -> tuple[float, float]:
    """The slide's (mpp_x, mpp_y); raises MissingMppError naming --mpp when it has none,
    saying why when the file holds a resolution that was refused."""
    if props.mpp is None:
        where = path if path is not None else props.path
        why = (
            f"the slide's resolution is not trusted because {props.mpp_problem}"
            if props.mpp_problem
            else "the slide has no resolution metadata (micrometres per pixel)"
        )
        raise MissingMppError(f"{where}: {why}; pass --mpp (e.g. --mpp 0.25 for a 40x scan, --mpp 0.5 for 20x)")
    return props.mpp


def rgb_on_white(pixels: np.ndarray) -> np.ndarray:
    """(h, w, 3) uint8 RGB from (h, w), (h, w, 1|2|3|4) uint8: grey is repeated, alpha
    (straight, not premultiplied) is composited onto white.  Opaque RGBA comes back as a
    view (not contiguous); callers that need contiguity copy."""
    if pixels.dtype != np.uint8:
        raise SlideError(f"pixels are {pixels.dtype}; only 8-bit slides are supported")
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    channels = pixels.shape[2]
    if channels == 4 and pixels[..., 3].min() == 255:  # opaque RGBA: drop alpha without a copy
        return pixels[..., :3]
    if channels == 2 and pixels[..., 1].min() == 255:
        pixels = pixels[..., :1]
        channels = 1
    elif channels in (2, 4):
        colour, alpha = pixels[..., :-1].astype(np.uint32), pixels[..., -1:].astype(np.uint32)
        pixels = ((colour * alpha + 255 * (255 - alpha) + 127) // 255).astype(np.uint8)
        channels -= 1
    if channels == 1:
        return np.repeat(pixels, 3, axis=2)
    if channels != 3:
        raise SlideError(f"pixels have {channels} channels; only grey, RGB and RGBA slides are supported")
    return np.ascontiguousarray(pixels)


def read_clipped(
    level_size: tuple[int, int],
    origin: tuple[int, int],
    size: tuple[int, int],
    fetch: Callable[[int, int, int, int], np.ndarray],
) -> np.ndarray:
    """A (h, w, 3) uint8 window of a level whose pixels outside the level are white.

    origin (x, y) and size (w, h) are in level pixels; fetch(x0, y0, x1, y1) returns the
    in-bounds part as anything `rgb_on_white` accepts.
    """
    (lw, lh), (x, y), (w, h) = level_size, origin, size
    if w < 0 or h < 0:
        raise ValueError(f"region size must be >= 0, got {size}")
    out = np.full((h, w, 3), 255, np.uint8)
    x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, lw), min(y + h, lh)
    if x1 > x0 and y1 > y0:
        out[y0 - y : y1 - y, x0 - x : x1 - x] = rgb_on_white(np.asarray(fetch(x0, y0, x1, y1)))
    return out


class BaseSlideReader:
    """Plumbing every backend shares: pickles by (path, mpp override) so Dask workers
    reopen the file, works as a context manager, and builds thumbnails from the pyramid."""

    properties: SlideProperties

    def __init__(self, path: Path, *, mpp: float | None = None) -> None:
        self.path = Path(path)
        self.mpp_override = mpp
        self._codestreams: Any = None  # wsiseg.readers.codestream_check.CodestreamCheck, on first read

    def read_region(self, location_l0: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        raise NotImplementedError

    def thumbnail(self, max_size: int) -> tuple[np.ndarray, float]:
        from wsiseg.readers.scaled import read_thumbnail

        return read_thumbnail(self, max_size)

    def close(self) -> None:
        """Release the file; subclasses close their handle and call this."""
        if self._codestreams is not None:
            self._codestreams.close()

    def _check_codestreams(self, level: int, x: int, y: int, w: int, h: int) -> None:
        """Raise ValueError when a tile of the region [x, x + w) x [y, y + h) (level px) is a
        JPEG tile cut short or overwritten, which decoders accept silently
        (`wsiseg.readers.codestream_check`)."""
        if self._codestreams is None:
            from wsiseg.readers.codestream_check import CodestreamCheck

            self._codestreams = CodestreamCheck(self.path)
        self._codestreams.check(self.properties.level_dimensions[level], x, y, w, h)

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "mpp": self.mpp_override}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"], mpp=state["mpp"])  # type: ignore[misc]

    def __enter__(self) -> BaseSlideReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r})"

    def _check_level(self, level: int) -> tuple[int, int]:
        if not 0 <= level < self.properties.level_count:
            raise ValueError(f"{self.path}: level {level} does not exist (levels 0-{self.properties.level_count - 1})")
        return self.properties.level_dimensions[level]
