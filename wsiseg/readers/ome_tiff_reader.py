"""OME-TIFF backend: the largest 8-bit RGB series of an OME-TIFF, with its SubIFD pyramid.

An OME-TIFF can hold several images ("series"): the scan, a macro photo, a label image, a
fluorescence stack.  General TIFF readers (OpenSlide's generic TIFF, TiffSlide) read the
first one, which need not be the scan.  This backend claims every OME-TIFF (by content) and
picks the largest series of 8-bit RGB(A) pixels; when there is none it refuses, listing the
series.  Pyramid levels are the series' reduced-resolution SubIFDs (or pages) as tifffile
reports them.  mpp comes from the OME-XML `Pixels` PhysicalSizeX/Y with their units,
checked against the objective's NominalMagnification when the XML names one.

tifffile and zarr are imported when a slide is opened.
"""

from __future__ import annotations

import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Any

import numpy as np

from wsiseg.readers.base import BaseSlideReader, NotBrightfieldError, SlideProperties, read_clipped
from wsiseg.readers.registry import register_backend
from wsiseg.readers.resolution import MppReading, judge_mpp, length_in_um, mpp_from_override, tiff_tag_mpp
from wsiseg.readers.tiff_inspection import is_ome_tiff


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _is_rgb(series: Any) -> bool:
    return str(series.dtype) == "uint8" and series.axes == "YXS" and series.shape[-1] in (3, 4)


def describe_series(series: list[Any]) -> str:
    """'0 "labels" 512x512 uint16 YX, 1 ...': one clause per series, for messages."""
    parts = []
    for i, s in enumerate(series):
        h, w = (s.shape[s.axes.index("Y")], s.shape[s.axes.index("X")]) if "Y" in s.axes and "X" in s.axes else (0, 0)
        parts.append(f"{i} {s.name or 'unnamed'!r} {w}x{h} {s.dtype} {s.axes}")
    return ", ".join(parts)


def choose_series(series: list[Any], path: Path) -> int:
    """Index of the largest 8-bit RGB(A) series (first on ties); raises NotBrightfieldError
    listing every series when there is none."""
    rgb = [i for i, s in enumerate(series) if _is_rgb(s)]
    if not rgb:
        raise NotBrightfieldError(
            f"{path}: OME-TIFF without an 8-bit RGB image (series: {describe_series(series)}); wsiseg segments "
            "nuclei in brightfield H&E scans: export the H&E image as 8-bit RGB"
        )
    return max(rgb, key=lambda i: (series[i].shape[0] * series[i].shape[1], -i))


def ome_reading(
    ome_xml: str | None, series_index: int, name: str | None, size: tuple[int, int]
) -> tuple[MppReading, float | None]:
    """(resolution, objective power) of the OME-XML Image that is series `series_index`.

    The Image is the one at that index when its SizeX/SizeY equal `size` (width, height),
    else the first Image with that Name and size; without one, nothing is known.
    """
    if not ome_xml:
        return MppReading(), None
    try:
        root = ElementTree.fromstring(ome_xml)
    except ElementTree.ParseError as exc:
        return MppReading(problem=f"the OME-XML does not parse ({exc})"), None
    images = [e for e in root if _local(e.tag) == "Image"]

    def pixels_of(image: ElementTree.Element) -> ElementTree.Element | None:
        return next((e for e in image if _local(e.tag) == "Pixels"), None)

    def fits(image: ElementTree.Element) -> bool:
        pixels = pixels_of(image)
        return pixels is not None and (pixels.get("SizeX"), pixels.get("SizeY")) == (str(size[0]), str(size[1]))

    image = images[series_index] if series_index < len(images) and fits(images[series_index]) else None
    if image is None:
        image = next((im for im in images if im.get("Name") == name and fits(im)), None)
    if image is None:
        return MppReading(), None
    power = _objective_power(root, image)
    pixels = pixels_of(image)
    assert pixels is not None
    raw_x, raw_y = pixels.get("PhysicalSizeX"), pixels.get("PhysicalSizeY")
    if raw_x is None and raw_y is None:
        return MppReading(), power
    unit_x, unit_y = pixels.get("PhysicalSizeXUnit", "µm"), pixels.get("PhysicalSizeYUnit", "µm")
    um_x, um_y = length_in_um(raw_x, unit_x), length_in_um(raw_y, unit_y)
    if um_x is None or um_y is None:
        problem = f"OME PhysicalSizeX/Y = {raw_x} {unit_x} x {raw_y} {unit_y} has an unknown unit or value"
        return MppReading(problem=problem), power
    return judge_mpp(um_x, um_y, objective_power=power, source="OME PhysicalSizeX/Y"), power


def _objective_power(root: ElementTree.Element, image: ElementTree.Element) -> float | None:
    settings = next((e for e in image if _local(e.tag) == "ObjectiveSettings"), None)
    if settings is None:
        return None
    for element in root.iter():
        if _local(element.tag) == "Objective" and element.get("ID") == settings.get("ID"):
            try:
                power = float(element.get("NominalMagnification", ""))
            except ValueError:
                return None
            return power if power > 0 else None
    return None


# Priority is moot: claimed files are read by this backend only, others never by it.
@register_backend(
    "ome-tiff", (".tif", ".tiff"), priority=5, requires=("tifffile", "zarr"), claims=is_ome_tiff,
    install="tifffile zarr",
)  # fmt: skip
class OmeTiffReader(BaseSlideReader):
    """The largest 8-bit RGB series of an OME-TIFF; regions outside a level are white."""

    def __init__(self, path: Path, *, mpp: float | None = None) -> None:
        super().__init__(path, mpp=mpp)
        import tifffile

        self._tif = tifffile.TiffFile(self.path)
        try:
            series = list(self._tif.series)
            index = choose_series(series, self.path)
            chosen = series[index]
            levels = list(chosen.levels)
            dims = tuple((int(lv.shape[1]), int(lv.shape[0])) for lv in levels)
            w0, h0 = dims[0]
            downsamples = tuple(1.0 if i == 0 else (w0 / w + h0 / h) / 2.0 for i, (w, h) in enumerate(dims))
            file_reading, power = ome_reading(self._tif.ome_metadata, index, chosen.name, (w0, h0))
            if file_reading.mpp is None and file_reading.problem is None:
                tags = levels[0].keyframe.tags
                if "XResolution" in tags and "YResolution" in tags:
                    unit = int(tags["ResolutionUnit"].value) if "ResolutionUnit" in tags else 2
                    file_reading = tiff_tag_mpp(tags["XResolution"].value, tags["YResolution"].value, unit)
            reading = mpp_from_override(mpp) or file_reading
            self.properties = SlideProperties(
                path=self.path,
                reader="ome-tiff",
                vendor="ome-tiff",
                level_dimensions=dims,
                level_downsamples=downsamples,
                mpp=reading.mpp,
                objective_power=power,
                bounds_l0=None,
                extra={"ome.series": str(index), "ome.series-name": str(chosen.name or ""),
                       "ome.series-count": str(len(series))},
                mpp_problem=reading.problem,
                file_mpp=file_reading.mpp,
            )  # fmt: skip
            self._series = chosen
            self._levels: dict[int, Any] = {}
            # Decode one pixel of the smallest level: fails now, not mid-run, on unknown codecs.
            self.read_region((0, 0), len(dims) - 1, (1, 1))
        except BaseException:
            self._tif.close()
            raise

    def _level_array(self, level: int) -> Any:
        if level not in self._levels:
            import zarr

            self._levels[level] = zarr.open_array(self._series.aszarr(level=level), mode="r")
        return self._levels[level]

    def read_region(self, location_l0: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """(h, w, 3) uint8 RGB of `level` at `location_l0` (level-0 px), size (w, h) level px.

        The level pixel is round(location_l0 / downsample); pixels outside the level are white.
        """
        level_size = self._check_level(level)
        ds = self.properties.level_downsamples[level]
        x, y = int(round(location_l0[0] / ds)), int(round(location_l0[1] / ds))
        self._check_codestreams(level, x, y, int(size[0]), int(size[1]))
        array = self._level_array(level)
        return read_clipped(
            level_size, (x, y), (int(size[0]), int(size[1])), lambda x0, y0, x1, y1: array[y0:y1, x0:x1]
        )

    def close(self) -> None:
        self._levels = {}
        self._tif.close()
        super().close()
