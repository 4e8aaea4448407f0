"""Looks at a TIFF's first image before any backend opens it.

OpenSlide's generic-TIFF reader decodes through libtiff's RGBA interface, which turns
16-bit grey into 8-bit and opens float TIFFs it later fails to read: a fluorescence channel
would be segmented as if it were H&E, or a run would fail mid-way.  `check_tiff_pixels`
refuses such files at open time with one line.  `is_ome_tiff` tells OME-TIFFs apart, whose
first image may be a label or fluorescence series (the OME backend picks the right one).

tifffile is imported inside the functions.  Files tifffile cannot parse pass unchecked: the
backends then decide (and report) whether they can read them.
"""

from __future__ import annotations

import logging
from pathlib import Path

from wsiseg.readers.base import NotBrightfieldError, not_brightfield_message

logger = logging.getLogger(__name__)

# TIFF ExtraSamples values that mean alpha: 1 associated (premultiplied), 2 unassociated.
_ALPHA = (1, 2)


def is_tiff(path: Path) -> bool:
    """Whether the file starts with a TIFF or BigTIFF header."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
    except OSError:
        return False
    return head in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def is_ome_tiff(path: Path) -> bool:
    """Whether `path` is an OME-TIFF (OME-XML in its first ImageDescription)."""
    if not is_tiff(path):
        return False
    try:
        import tifffile

        with tifffile.TiffFile(path) as tif:
            return bool(tif.is_ome)
    except Exception:  # not parsable: the backends will say why
        logger.debug("%s: not inspectable as TIFF", path, exc_info=True)
        return False


def describe_pixels(dtype: object, samples: int) -> str:
    """'uint16 pixels, 1 channel' and the like, for messages."""
    return f"{dtype} pixels, {samples} channel{'s' if samples != 1 else ''}"


def brightfield_problem(dtype: object, samples: int, extrasamples: tuple[int, ...]) -> str | None:
    """Why an image with these TIFF properties is not 8-bit grey/RGB(A), or None if it is.

    dtype: numpy dtype of a sample; samples: SamplesPerPixel; extrasamples: the
    ExtraSamples values (a 2-sample image must be grey + alpha).
    """
    if str(dtype) != "uint8":
        return describe_pixels(dtype, samples)
    if samples > 4:
        return f"{describe_pixels(dtype, samples)} (multi-channel, not RGB)"
    if samples == 2 and not set(extrasamples) <= set(_ALPHA):
        return f"{describe_pixels(dtype, samples)} (two channels, not grey + alpha)"
    return None


def check_tiff_pixels(path: Path) -> None:
    """Raise NotBrightfieldError (one line naming the file) unless the TIFF's first image
    holds 8-bit grey, RGB or RGBA pixels.  OME-TIFFs and unparsable files pass."""
    if not is_tiff(path):
        return
    try:
        import tifffile

        with tifffile.TiffFile(path) as tif:
            if tif.is_ome:
                return
            page = tif.pages.first
            problem = brightfield_problem(
                page.dtype,
                int(page.samplesperpixel),
                tuple(int(v) for v in page.extrasamples),
            )
    except Exception:
        logger.debug("%s: not inspectable as TIFF", path, exc_info=True)
        return
    if problem is not None:
        raise NotBrightfieldError(not_brightfield_message(path, problem))
