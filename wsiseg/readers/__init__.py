"""Slide readers: `open_slide` picks a backend by extension and falls back on failure.

    >>> slide = open_slide("slide.svs")            # doctest: +SKIP
    >>> scaled = ScaledSlide(slide, target_mpp=0.5)  # doctest: +SKIP
    >>> tile = scaled.read(0, 0, 256, 256)         # (256, 256, 3) uint8 RGB, working px

Backends (highest priority first): openslide, tiffslide, image; ome-tiff claims OME-TIFFs
by content and is then the only one tried.  Their libraries are imported only when a slide is opened.  `find_slides`
lists the slides of a folder tree (a DICOM folder is one slide, MRXS companions are skipped).
"""

from __future__ import annotations

# Importing the backend modules registers them; they import their libraries lazily.
from wsiseg.readers import image_reader as _image_reader  # noqa: F401
from wsiseg.readers import ome_tiff_reader as _ome_tiff_reader  # noqa: F401
from wsiseg.readers import openslide_reader as _openslide_reader  # noqa: F401
from wsiseg.readers import tiffslide_reader as _tiffslide_reader  # noqa: F401
from wsiseg.readers.base import (
    MissingMppError,
    NonSquarePixelsError,
    NotBrightfieldError,
    SlideError,
    SlideProperties,
    SlideReader,
    UnsupportedSlideError,
    require_mpp,
)
from wsiseg.readers.discovery import find_slides
from wsiseg.readers.registry import BACKENDS, BackendStatus, list_backends, open_slide, register_backend
from wsiseg.readers.scaled import ScaledSlide, read_thumbnail

__all__ = [
    "BACKENDS",
    "BackendStatus",
    "MissingMppError",
    "NonSquarePixelsError",
    "NotBrightfieldError",
    "ScaledSlide",
    "SlideError",
    "SlideProperties",
    "SlideReader",
    "UnsupportedSlideError",
    "find_slides",
    "list_backends",
    "open_slide",
    "read_thumbnail",
    "register_backend",
    "require_mpp",
]
