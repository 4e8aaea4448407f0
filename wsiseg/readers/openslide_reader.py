"""OpenSlide backend: Aperio SVS, Hamamatsu, MIRAX, Leica, Ventana, generic tiled TIFF, ...

openslide-python is imported when a slide is opened, never at module import.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from wsiseg.readers.base import BaseSlideReader, SlideError, SlideProperties, rgb_on_white
from wsiseg.readers.registry import register_backend
from wsiseg.readers.resolution import MppReading, judge_mpp, mpp_from_override, tiff_tag_mpp

OPENSLIDE_EXTENSIONS = (
    ".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif", ".dcm",
)  # fmt: skip


def properties_from_metadata(
    path: Path,
    reader: str,
    metadata: Mapping[str, Any],
    prefix: str,
    level_dimensions: tuple[tuple[int, int], ...],
    level_downsamples: tuple[float, ...],
    *,
    mpp_override: float | None,
    default_vendor: str = "generic-tiff",
) -> SlideProperties:
    """SlideProperties from an OpenSlide-style property dict (keys `<prefix>.mpp-x`, ...).

    OpenSlide and TiffSlide use the same names under their own prefix.  The mpp is judged by
    `wsiseg.readers.resolution.judge_mpp` (range, nucleus scale, objective power); without
    `<prefix>.mpp-*`, TIFF resolution tags in a unit the library ignores (ImageJ's micron)
    are read, and a unit-less resolution is reported as a problem.  mpp_override replaces
    the file's value.
    """

    def number(key: str) -> float | None:
        value = metadata.get(f"{prefix}.{key}")
        try:
            return float(value) if value not in (None, "") else None
        except (TypeError, ValueError):
            return None

    power = number("objective-power")
    power = power if power and power > 0 and math.isfinite(power) else None
    file_reading = _file_mpp(metadata, prefix, power)
    reading = mpp_from_override(mpp_override) or file_reading
    bx, by, bw, bh = (number(f"bounds-{k}") for k in ("x", "y", "width", "height"))
    bounds = None
    if bx is not None and by is not None and bw is not None and bh is not None:
        bounds = (int(bx), int(by), int(bw), int(bh))
    return SlideProperties(
        path=path,
        reader=reader,
        vendor=str(metadata.get(f"{prefix}.vendor") or default_vendor),
        level_dimensions=tuple((int(w), int(h)) for w, h in level_dimensions),
        level_downsamples=tuple(float(d) for d in level_downsamples),
        mpp=reading.mpp,
        objective_power=power,
        bounds_l0=bounds,
        extra={str(k): str(v) for k, v in metadata.items() if v is not None},
        mpp_problem=reading.problem,
        file_mpp=file_reading.mpp,
    )


def _file_mpp(metadata: Mapping[str, Any], prefix: str, power: float | None) -> MppReading:
    mpp_x, mpp_y = metadata.get(f"{prefix}.mpp-x"), metadata.get(f"{prefix}.mpp-y")
    vendor = str(metadata.get(f"{prefix}.vendor") or "")
    if mpp_x not in (None, "") or mpp_y not in (None, ""):
        source = "aperio.MPP" if vendor == "aperio" else f"{prefix}.mpp"
        return judge_mpp(mpp_x, mpp_y, objective_power=power, source=source)
    if metadata.get("aperio.MPP") not in (None, ""):  # stated, but the library could not parse it
        raw = metadata["aperio.MPP"]
        return judge_mpp(raw, raw, objective_power=power, source="aperio.MPP")
    return tiff_tag_mpp(
        metadata.get("tiff.XResolution"),
        metadata.get("tiff.YResolution"),
        metadata.get("tiff.ResolutionUnit"),
        str(metadata.get("tiff.ImageDescription") or ""),
        objective_power=power,
    )


@register_backend(
    "openslide", OPENSLIDE_EXTENSIONS, priority=100, requires=("openslide",), install="openslide-python openslide-bin"
)
class OpenSlideReader(BaseSlideReader):
    """A slide read through OpenSlide; RGBA regions are composited onto white."""

    def __init__(self, path: Path, *, mpp: float | None = None) -> None:
        super().__init__(path, mpp=mpp)
        import openslide

        library = str(getattr(openslide, "__library_version__", "0"))
        if self.path.suffix.lower() == ".dcm" and int(library.split(".")[0] or 0) < 4:
            raise SlideError(
                f"{self.path}: DICOM whole-slide images need OpenSlide 4.0 or later (found {library}); "
                "pip install -U openslide-bin"
            )
        self._slide = openslide.OpenSlide(str(self.path))
        self.properties = properties_from_metadata(
            self.path,
            "openslide",
            dict(self._slide.properties),
            "openslide",
            tuple(self._slide.level_dimensions),
            tuple(self._slide.level_downsamples),
            mpp_override=mpp,
        )

    def read_region(self, location_l0: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """(h, w, 3) uint8 RGB of `level` at `location_l0` (level-0 px), size (w, h) level px."""
        self._check_level(level)
        w, h = int(size[0]), int(size[1])
        if w < 0 or h < 0:
            raise ValueError(f"region size must be >= 0, got {size}")
        if w == 0 or h == 0:
            return np.full((h, w, 3), 255, np.uint8)
        ds = self.properties.level_downsamples[level]
        self._check_codestreams(level, int(location_l0[0] // ds), int(location_l0[1] // ds), w, h)
        image = self._slide.read_region((int(location_l0[0]), int(location_l0[1])), level, (w, h))
        return rgb_on_white(np.asarray(image))

    def close(self) -> None:
        self._slide.close()
        super().close()
