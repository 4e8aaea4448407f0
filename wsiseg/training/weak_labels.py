"""Weak nucleus labels (one point or one box per nucleus) for pseudo-labelling, from three sources.

- CSV for many images: a header row with `image` and either `x, y` (points) or
  `x0, y0, x1, y1` (boxes); `image` is the image's file name or stem.
- QuPath GeoJSON for one image (`NAME.geojson` beside it): a FeatureCollection, a list of
  Features or one Feature; Point / MultiPoint geometries give points, Polygon /
  MultiPolygon geometries (QuPath's rectangles, or any outline) give their bounding boxes.
  One file holds points or boxes, not both.
- an instance label image (`NAME.labels.*` beside it): each instance gives its centroid
  (points) or its bounding box (boxes).

Coordinates are the image's own pixels in the pixel-edge frame: pixel (row i, column j)
covers [j, j + 1) x [i, i + 1); a box is x0, y0, x1, y1 with x1 > x0, y1 > y0 (end
exclusive for whole pixels).  Every bad input raises ValueError naming the file.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from wsiseg.geojson_features import geojson_features
from wsiseg.training.targets import centroids_px

KINDS = ("points", "boxes")
_BOX_COLUMNS = ("x0", "y0", "x1", "y1")


@dataclass(frozen=True)
class WeakLabels:
    """Weak labels of one image: kind "points" with coords (N, 2) x, y, or "boxes" with
    coords (N, 4) x0, y0, x1, y1; float64, image px, edge frame."""

    kind: str
    coords: np.ndarray

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"weak label kind must be one of {KINDS}, got {self.kind!r}")
        width = 2 if self.kind == "points" else 4
        coords = np.asarray(self.coords, np.float64).reshape(-1, width)
        ordered = (coords[:, 2] > coords[:, 0]) & (coords[:, 3] > coords[:, 1]) if self.kind == "boxes" else None
        if ordered is not None and not ordered.all():
            raise ValueError("every box needs x1 > x0 and y1 > y0")
        object.__setattr__(self, "coords", coords)

    def __len__(self) -> int:
        return len(self.coords)

    def scaled(self, factor: float) -> WeakLabels:
        """The same labels in an image resized by `factor` (edge-frame coordinates scale exactly)."""
        return WeakLabels(self.kind, self.coords * factor)

    def anchors(self) -> np.ndarray:
        """(N, 2) x, y: the points, or the boxes' centres."""
        if self.kind == "points":
            return self.coords
        return (self.coords[:, :2] + self.coords[:, 2:]) / 2


def read_weak_csv(path: Path) -> dict[str, WeakLabels]:
    """{image stem: WeakLabels} of a CSV (see the module docstring)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: cannot read the weak labels ({exc})") from exc
    reader = csv.reader(io.StringIO(text))
    header = [h.strip().casefold() for h in next(reader, [])]
    if "image" not in header:
        raise ValueError(f"{path}: line 1: the header {header} needs an 'image' column and x, y or x0, y0, x1, y1")
    if all(c in header for c in _BOX_COLUMNS):
        kind, columns = "boxes", _BOX_COLUMNS
    elif "x" in header and "y" in header:
        kind, columns = "points", ("x", "y")
    else:
        raise ValueError(f"{path}: line 1: the header {header} needs columns x, y (points) or x0, y0, x1, y1 (boxes)")
    image_col = header.index("image")
    value_cols = [header.index(c) for c in columns]
    rows: dict[str, list[list[float]]] = {}
    for line_no, row in enumerate(reader, start=2):
        if not row or all(not cell.strip() for cell in row):
            continue
        if len(row) < len(header):
            raise ValueError(f"{path}: line {line_no}: {len(row)} fields, the header has {len(header)}")
        values = [_number(row[i], path, line_no) for i in value_cols]
        rows.setdefault(_stem(row[image_col].strip()), []).append(values)
    try:
        return {name: WeakLabels(kind, np.asarray(v)) for name, v in rows.items()}
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from exc


def _stem(name: str) -> str:
    stem = Path(name).name
    lower = stem.lower()
    for suffix in (".png", ".tif", ".tiff", ".jpg", ".jpeg"):
        if lower.endswith(suffix):
            return stem[: -len(suffix)]
    return stem


def _number(text: str, path: Path, line_no: int) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{path}: line {line_no}: {text!r} is not a number") from None
    if not math.isfinite(value):
        raise ValueError(f"{path}: line {line_no}: {value} is not a finite number")
    return value


def read_weak_geojson(path: Path) -> WeakLabels:
    """WeakLabels of one image's GeoJSON (see the module docstring)."""
    import shapely.geometry

    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: cannot read the GeoJSON ({exc})") from exc
    features = geojson_features(data)
    if features is None:
        raise ValueError(f"{path}: expected a GeoJSON FeatureCollection, Feature or list of Features")
    points: list[tuple[float, float]] = []
    boxes: list[tuple[float, float, float, float]] = []
    for n, feature in enumerate(features):
        geometry = feature.get("geometry") if isinstance(feature, dict) else None
        kind = geometry.get("type") if isinstance(geometry, dict) else None
        try:
            shape = shapely.geometry.shape(geometry)
        except Exception as exc:  # shapely raises several types for bad geometry
            raise ValueError(f"{path}: feature {n}: invalid geometry {kind} ({exc})") from None
        if kind == "Point":
            points.append((shape.x, shape.y))
        elif kind == "MultiPoint":
            points.extend((p.x, p.y) for p in shape.geoms)
        elif kind in ("Polygon", "MultiPolygon") and not shape.is_empty and shape.area > 0:
            boxes.append(tuple(shape.bounds))  # type: ignore[arg-type]
        else:
            raise ValueError(f"{path}: feature {n}: a {kind} geometry; weak labels are Points or Polygons (boxes)")
    if points and boxes:
        raise ValueError(f"{path}: mixes points ({len(points)}) and boxes ({len(boxes)}); use one kind per image")
    return WeakLabels("boxes", np.asarray(boxes)) if boxes else WeakLabels("points", np.asarray(points))


def weak_from_label_image(labels: np.ndarray, kind: str) -> WeakLabels:
    """Centroids ("points") or bounding boxes ("boxes") of an (H, W) instance map's instances."""
    if kind == "points":
        _, xy = centroids_px(labels)
        return WeakLabels("points", xy)
    if kind != "boxes":
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    slices = ndi.find_objects(np.asarray(labels).astype(np.int64, copy=False))
    boxes = [(s[1].start, s[0].start, s[1].stop, s[0].stop) for s in slices if s is not None]
    return WeakLabels("boxes", np.asarray(boxes, np.float64))


def find_weak_labels(image: Path, *, folder: Path | None, label_kind: str) -> WeakLabels:
    """The weak labels of `image` from `folder` (default: the image's own): NAME.geojson, else
    a NAME.labels.* instance map (giving `label_kind`).  Raises ValueError when there is none."""
    from wsiseg.datasets.image_files import LABEL_SUFFIXES, find_beside, read_label_map

    beside = (folder or image.parent) / image.name
    geojson = find_beside(beside, (".geojson", ".json"))
    if geojson is not None:
        return read_weak_geojson(geojson)
    label_map = find_beside(beside, LABEL_SUFFIXES, infix=".labels")
    if label_map is not None:
        return weak_from_label_image(read_label_map(label_map), label_kind)
    raise ValueError(f"{image}: no weak labels found ({beside.stem}.geojson or {beside.stem}.labels.tif in "
                     f"{beside.parent}); give a CSV with --weak FILE.csv or put one beside the image")
