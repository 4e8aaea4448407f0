"""MoNuSeg / Kumar: an image plus its Aperio ImageScope XML (`NAME.xml` or `NAME.xml.gz`).

    <Annotations MicronsPerPixel="0.2527"><Annotation><Regions><Region><Vertices>
      <Vertex X="12.5" Y="40.25"/> ...

Each Region is one nucleus polygon; vertices are in image pixels with pixel centres on
integer coordinates (MoNuSeg's convention).  Rasterisation follows the MoNuSeg challenge's
own conversion: `skimage.draw.polygon(Y, X, shape)` with the vertices as they are, regions in
file order, a later region winning where two overlap; regions with fewer than 3 vertices are
skipped.  The instance id of a region is its 1-based index among the regions with >= 3
vertices (so ids are in file order and may have gaps where a region was fully overwritten
or fell outside the image).
"""

from __future__ import annotations

import gzip
import io
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from wsiseg.datasets.image_files import read_rgb
from wsiseg.datasets.item import DatasetError, NucleusItem

#: Annotation suffixes, in the order they are looked for.
XML_SUFFIXES: tuple[str, ...] = (".xml", ".xml.gz")


def find_xml(image: Path) -> Path | None:
    """`NAME.xml` / `NAME.xml.gz` beside `image`, else in a sibling `Annotations/` folder (the
    MoNuSeg release layout `Tissue Images/` + `Annotations/`), else None."""
    for folder in (image.parent, image.parent.parent / "Annotations"):
        for suffix in XML_SUFFIXES:
            candidate = folder / f"{image.stem}{suffix}"
            if candidate.is_file():
                return candidate
    return None


def _open(path: Path) -> io.BufferedIOBase:
    return gzip.open(path, "rb") if path.suffix.lower() == ".gz" else open(path, "rb")  # noqa: SIM115


def read_xml_mpp(path: Path) -> float | None:
    """The root element's `MicronsPerPixel` (µm per pixel), or None when absent or not positive.

    Reads only the start of the file.  Raises DatasetError when the file is not XML.
    """
    try:
        with _open(path) as stream:
            for _event, element in ET.iterparse(stream, events=("start",)):
                value = element.get("MicronsPerPixel")
                try:
                    mpp = float(value) if value is not None else None
                except ValueError:
                    mpp = None
                return mpp if mpp is not None and mpp > 0 else None
    except (ET.ParseError, OSError, EOFError) as exc:
        raise DatasetError(f"{path}: not a readable ImageScope XML ({exc}); export the annotations again") from exc
    return None


def read_imagescope_regions(path: Path) -> list[np.ndarray]:
    """Every Region's vertices, in file order, as (K, 2) float64 arrays of (x, y) image px.

    Raises DatasetError naming the file when it is not XML or a vertex is not numeric.
    """
    try:
        with _open(path) as stream:
            root = ET.parse(stream).getroot()
        return [
            np.array([(float(v.get("X", "nan")), float(v.get("Y", "nan"))) for v in region.iter("Vertex")],
                     dtype=np.float64).reshape(-1, 2)
            for region in root.iter("Region")
        ]
    except (ET.ParseError, OSError, EOFError) as exc:
        raise DatasetError(f"{path}: not a readable ImageScope XML ({exc}); export the annotations again") from exc
    except ValueError as exc:
        raise DatasetError(f"{path}: a Vertex has a non-numeric X or Y ({exc}); fix the annotation file") from exc


def rasterise_regions(regions: Sequence[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """(H, W) int32 instance map of `regions` ((K, 2) x, y arrays; pixel centres on integers).

    Region i (0-based among those with >= 3 finite vertices) gets id i + 1; later regions win.
    """
    from skimage.draw import polygon

    labels = np.zeros(shape, np.int32)
    next_id = 0
    for xy in regions:
        if len(xy) < 3 or not np.all(np.isfinite(xy)):
            continue
        next_id += 1
        rr, cc = polygon(xy[:, 1], xy[:, 0], shape)
        labels[rr, cc] = next_id
    return labels


def load_monuseg(image: Path, xml: Path, mpp: float, name: str) -> NucleusItem:
    """Read one image and rasterise its ImageScope XML into an instance map (classes None).

    Raises DatasetError naming the XML when it holds no region with >= 3 vertices.
    """
    rgb = read_rgb(image)
    regions = read_imagescope_regions(xml)
    if not any(len(xy) >= 3 for xy in regions):
        raise DatasetError(f"{xml}: no Region with 3 or more vertices; check that this is the image's annotation file")
    labels = rasterise_regions(regions, rgb.shape[:2])
    return NucleusItem(name=name, image=rgb, mpp=mpp, labels=labels, source=image)
