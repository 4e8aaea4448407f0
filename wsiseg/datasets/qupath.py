"""QuPath: an image plus the GeoJSON QuPath exports for it (`NAME.geojson` or `.geojson.gz`).

Accepted: a FeatureCollection, a bare list of Features, or one Feature.  Every Feature whose
`properties.objectType` is "annotation" (also the default when absent), "detection" or "cell"
is one nucleus; for a cell the Feature-level `nucleusGeometry` is used when present (else its
`geometry`).  Polygon and MultiPolygon geometries (also inside a GeometryCollection) count;
other geometries and object types (tiles, TMA cores) are skipped.

Coordinates are QuPath's image frame: x right, y down, pixel (row i, column j) covering
[j, j+1) x [i, i+1).  A pixel belongs to a polygon when its centre (j + 0.5, i + 0.5) lies
inside it (centres exactly on an edge count as inside, skimage.draw.polygon's rule); interior
rings (holes) are subtracted.  `offset_xy` is added to every coordinate first: for a slide
with `openslide.bounds-x/y` that QuPath cropped, pass the bounds to get level-0 pixels.
Nuclei are painted in file order, a later one winning where two overlap; nucleus k (1-based
among features with a polygon) gets instance id k.

Classes: `properties.classification` as a string, {"name": ...} or {"names": [...]} (joined
with ": ", QuPath's derived-class notation).  Class ids are the positions of the names in the
dataset's sorted class list (all files of a dataset share one list); unclassified nuclei have
no entry in `classes`.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from wsiseg.datasets.image_files import read_rgb
from wsiseg.datasets.item import DatasetError, NucleusItem
from wsiseg.geojson_features import geojson_features

#: Annotation suffixes, in the order they are looked for.
GEOJSON_SUFFIXES: tuple[str, ...] = (".geojson", ".geojson.gz")

# One polygon: its exterior ring, then its holes; each ring an (K, 2) float64 (x, y) array.
Polygon = tuple[np.ndarray, ...]


@dataclass(frozen=True)
class QuPathNucleus:
    """One nucleus of a GeoJSON file: its polygons (QuPath frame) and class name (or None)."""

    polygons: tuple[Polygon, ...]
    class_name: str | None


def find_geojson(image: Path) -> Path | None:
    """`NAME.geojson` / `NAME.geojson.gz` beside `image`, or None."""
    for suffix in GEOJSON_SUFFIXES:
        candidate = image.with_name(f"{image.stem}{suffix}")
        if candidate.is_file():
            return candidate
    return None


def read_qupath_nuclei(path: Path) -> list[QuPathNucleus]:
    """The nuclei of a QuPath GeoJSON export, in file order.

    Raises DatasetError naming the file when it is not JSON, not GeoJSON features, or holds no
    annotation/detection/cell feature with a Polygon or MultiPolygon.
    """
    try:
        opener = gzip.open if path.suffix.lower() == ".gz" else open
        with opener(path, "rt", encoding="utf-8") as stream:
            data = json.load(stream)
    except (OSError, EOFError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatasetError(f"{path}: not readable GeoJSON ({exc}); export the objects from QuPath again") from exc
    features = geojson_features(data)
    if features is None:
        raise DatasetError(f"{path}: not a GeoJSON FeatureCollection or list of Features; "
                           "export the objects from QuPath (File > Export objects as GeoJSON)")
    nuclei = []
    for feature in features:
        if isinstance(feature, dict):
            nucleus = _nucleus(feature, path)
            if nucleus is not None:
                nuclei.append(nucleus)
    if not nuclei:
        raise DatasetError(f"{path}: no annotation, detection or cell with a Polygon or MultiPolygon; "
                           "export the nucleus objects from QuPath as GeoJSON")
    return nuclei


def _nucleus(feature: dict[str, Any], path: Path) -> QuPathNucleus | None:
    properties = feature.get("properties") or {}
    kind = str(properties.get("objectType") or properties.get("object_type") or properties.get("type")
               or "annotation").lower()
    if "cell" in kind:
        geometry = feature.get("nucleusGeometry") or properties.get("nucleusGeometry") or feature.get("geometry")
    elif "detection" in kind or "annotation" in kind:
        geometry = feature.get("geometry")
    else:
        return None
    try:
        polygons = tuple(_polygons(geometry))
    except (TypeError, ValueError, IndexError) as exc:
        raise DatasetError(f"{path}: a feature has malformed coordinates ({exc}); export the objects again") from exc
    return QuPathNucleus(polygons, _class_name(properties.get("classification"))) if polygons else None


def _polygons(geometry: Any) -> Iterator[Polygon]:
    if not isinstance(geometry, dict):
        return
    kind = geometry.get("type")
    if kind == "Polygon":
        parts = [geometry.get("coordinates") or []]
    elif kind == "MultiPolygon":
        parts = geometry.get("coordinates") or []
    elif kind == "GeometryCollection":
        for member in geometry.get("geometries") or []:
            yield from _polygons(member)
        return
    else:
        return
    for rings in parts:
        arrays = tuple(np.asarray(ring, dtype=np.float64)[:, :2] for ring in rings if len(ring) >= 3)
        if arrays and len(rings[0]) >= 3:
            yield arrays


def _class_name(classification: Any) -> str | None:
    if isinstance(classification, str):
        return classification or None
    if isinstance(classification, dict):
        if isinstance(classification.get("name"), str):
            return classification["name"] or None
        names = classification.get("names")
        if isinstance(names, list) and names:
            return ": ".join(str(n) for n in names)
    return None


def collect_class_names(paths: Iterable[Path]) -> tuple[str, ...]:
    """The sorted class names used in any of the GeoJSON files (each file is read once)."""
    names: set[str] = set()
    for path in paths:
        names.update(n.class_name for n in read_qupath_nuclei(path) if n.class_name is not None)
    return tuple(sorted(names))


def rasterise_nuclei(
    nuclei: Sequence[QuPathNucleus], shape: tuple[int, int], offset_xy: tuple[float, float] = (0.0, 0.0)
) -> np.ndarray:
    """(H, W) int32 instance map: nucleus k (0-based) gets id k + 1, later nuclei win.

    Pixel-centre sampling in the pixel-edge frame (see the module docstring); holes subtracted.
    """
    labels = np.zeros(shape, np.int32)
    for k, nucleus in enumerate(nuclei):
        mask, (y0, x0) = _nucleus_mask(nucleus.polygons, shape, offset_xy)
        if mask is not None:
            labels[y0:y0 + mask.shape[0], x0:x0 + mask.shape[1]][mask] = k + 1
    return labels


def _nucleus_mask(
    polygons: tuple[Polygon, ...], shape: tuple[int, int], offset_xy: tuple[float, float]
) -> tuple[np.ndarray | None, tuple[int, int]]:
    """Boolean mask of the union of `polygons` over its clipped bounding box, and the box's
    top-left (row, column); (None, (0, 0)) when it covers no pixel centre of the image."""
    from skimage.draw import polygon

    # Pixel centres sit at (j + 0.5, i + 0.5): shifting by -0.5 puts them on the integer grid
    # that skimage.draw.polygon samples.
    shift = np.array([offset_xy[0] - 0.5, offset_xy[1] - 0.5])
    rings = [[ring + shift for ring in poly] for poly in polygons]
    exteriors = np.concatenate([poly[0] for poly in rings])
    (x_lo, y_lo), (x_hi, y_hi) = exteriors.min(axis=0), exteriors.max(axis=0)
    y0, x0 = max(0, int(np.ceil(y_lo))), max(0, int(np.ceil(x_lo)))
    y1, x1 = min(shape[0], int(np.floor(y_hi)) + 1), min(shape[1], int(np.floor(x_hi)) + 1)
    if y1 <= y0 or x1 <= x0:
        return None, (0, 0)
    box = (y1 - y0, x1 - x0)
    mask = np.zeros(box, bool)
    for exterior, *holes in rings:
        part = np.zeros(box, bool)
        part[polygon(exterior[:, 1] - y0, exterior[:, 0] - x0, box)] = True
        for hole in holes:
            part[polygon(hole[:, 1] - y0, hole[:, 0] - x0, box)] = False
        mask |= part
    return (mask, (y0, x0)) if mask.any() else (None, (0, 0))


def load_qupath(
    image: Path,
    geojson: Path,
    mpp: float,
    name: str,
    class_order: tuple[str, ...] = (),
    offset_xy: tuple[float, float] = (0.0, 0.0),
) -> NucleusItem:
    """Read one image and rasterise its QuPath GeoJSON (see the module docstring).

    class_order: the dataset's sorted class names (class id = position); empty: no classes
    (classes and class_names None).  Raises DatasetError naming the file for an empty or
    unreadable GeoJSON, or a class name missing from `class_order`.
    """
    rgb = read_rgb(image)
    nuclei = read_qupath_nuclei(geojson)
    labels = rasterise_nuclei(nuclei, rgb.shape[:2], offset_xy)
    classes: dict[int, int] | None = None
    class_names: dict[int, str] | None = None
    if class_order:
        index = {n: i for i, n in enumerate(class_order)}
        present = set(np.unique(labels).tolist())
        classes = {}
        for k, nucleus in enumerate(nuclei, start=1):
            if nucleus.class_name is None or k not in present:
                continue
            if nucleus.class_name not in index:
                raise DatasetError(f"{geojson}: class {nucleus.class_name!r} is not among the dataset's classes "
                                   f"{list(class_order)}; open the dataset again")
            classes[k] = index[nucleus.class_name]
        class_names = dict(enumerate(class_order))
    return NucleusItem(name=name, image=rgb, mpp=mpp, labels=labels, classes=classes, class_names=class_names,
                       source=image)
