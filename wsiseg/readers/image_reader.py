"""Plain-image backend: PNG, JPEG and single-level TIFF as a one-level slide.

The whole image is decoded on the first read and kept (these files are small next to a
whole-slide image).  mpp comes from TIFF resolution tags in cm or inch (or ImageJ's
micron), judged by `wsiseg.readers.resolution`; else it is unknown (None): PNG and JPEG
carry no trustworthy scan resolution.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from wsiseg.readers.base import (
    BaseSlideReader,
    NotBrightfieldError,
    SlideProperties,
    not_brightfield_message,
    read_clipped,
)
from wsiseg.readers.registry import register_backend
from wsiseg.readers.resolution import MppReading, mpp_from_override, tiff_tag_mpp

_TIFF = (".tif", ".tiff")


def tiff_tags_reading(tags: dict[str, object], description: str | None = None) -> MppReading:
    """The resolution TIFF tags state (see `tiff_tag_mpp`), with its problem if refused.

    tags: tag name -> value as tifffile reports it (resolutions as (numerator, denominator),
    ResolutionUnit as an int or enum).  A missing ResolutionUnit means inch (TIFF 6.0).
    """
    unit = tags.get("ResolutionUnit", 2)
    unit = int(unit) if unit is not None else 2  # type: ignore[call-overload]
    return tiff_tag_mpp(tags.get("XResolution"), tags.get("YResolution"), unit, description)


def tiff_resolution_mpp(tags: dict[str, object]) -> tuple[float, float] | None:
    """(mpp_x, mpp_y) from TIFF XResolution/YResolution/ResolutionUnit values, or None.

    tags: tag name -> value as tifffile reports it (resolutions as (numerator, denominator)).
    Only inch and centimetre units count; implausible values (72 dpi) give None.
    """
    return tiff_tags_reading(tags).mpp


@register_backend(
    "image", (".png", ".jpg", ".jpeg") + _TIFF, priority=10, requires=("PIL", "tifffile"), install="pillow tifffile"
)
class ImageReader(BaseSlideReader):
    """A single-level image; level 0 only, regions outside the image are white."""

    def __init__(self, path: Path, *, mpp: float | None = None) -> None:
        super().__init__(path, mpp=mpp)
        self._pixels: np.ndarray | None = None
        if self.path.suffix.lower() in _TIFF:
            width, height, file_mpp = self._inspect_tiff()
        else:
            width, height, file_mpp = self._inspect_pil()
        reading = mpp_from_override(mpp) or file_mpp
        self.properties = SlideProperties(
            path=self.path,
            reader="image",
            vendor="image",
            level_dimensions=((width, height),),
            level_downsamples=(1.0,),
            mpp=reading.mpp,
            objective_power=None,
            bounds_l0=None,
            mpp_problem=reading.problem,
            file_mpp=file_mpp.mpp,
        )

    def _inspect_tiff(self) -> tuple[int, int, MppReading]:
        import tifffile

        with tifffile.TiffFile(self.path) as tif:
            page = tif.pages.first
            if page.dtype != np.uint8:
                raise NotBrightfieldError(not_brightfield_message(self.path, f"pixels are {page.dtype}"))
            shape = page.shape
            if len(shape) not in (2, 3) or (len(shape) == 3 and shape[2] not in (1, 2, 3, 4)):
                what = f"image shape {shape} is not 2-D grey or RGB(A)"
                raise NotBrightfieldError(not_brightfield_message(self.path, what))
            tags = {
                name: page.tags[name].value
                for name in ("XResolution", "YResolution", "ResolutionUnit")
                if name in page.tags
            }
            return int(shape[1]), int(shape[0]), tiff_tags_reading(tags, page.description)

    def _inspect_pil(self) -> tuple[int, int, MppReading]:
        from PIL import Image

        with Image.open(self.path) as image:
            if image.mode not in ("L", "LA", "RGB", "RGBA", "P", "PA"):
                raise NotBrightfieldError(not_brightfield_message(self.path, f"image mode is {image.mode}"))
            width, height = image.size
            image.verify()  # reads every chunk: a truncated or corrupt file fails here, not mid-run
        return width, height, MppReading()

    def _load(self) -> np.ndarray:
        if self._pixels is None:
            if self.path.suffix.lower() in _TIFF:
                import tifffile

                pixels = tifffile.imread(self.path, key=0)
            else:
                from PIL import Image

                with Image.open(self.path) as image:
                    pixels = np.asarray(image.convert("RGBA") if image.mode in ("P", "PA") else image)
            self._pixels = pixels
        return self._pixels

    def read_region(self, location_l0: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """(h, w, 3) uint8 RGB at `location_l0` (px), size (w, h); level must be 0."""
        self._check_level(level)
        pixels = self._load()
        return read_clipped(
            self.properties.size_l0,
            (int(location_l0[0]), int(location_l0[1])),
            (int(size[0]), int(size[1])),
            lambda x0, y0, x1, y1: pixels[y0:y1, x0:x1],
        )

    def close(self) -> None:
        self._pixels = None
