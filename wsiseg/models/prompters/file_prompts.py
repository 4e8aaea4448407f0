"""Read user-supplied prompt points (CSV/TSV or GeoJSON) as a level-0 PointSet.

CSV / TSV (`.csv`, `.tsv`, `.txt`, optionally `.gz`): a header row naming columns `x` and
`y` (case-insensitive), optionally `label` or `class` (a class name or integer id; empty =
unclassified) and `score` (default 1).  Delimiter: tab for .tsv, else sniffed (comma,
semicolon or tab).

GeoJSON (`.geojson`, `.json`, optionally `.gz`): a FeatureCollection, a list of Features (as
QuPath exports) or one Feature.  Point and MultiPoint geometries give their points; Polygon
and MultiPolygon give their centroid.  The class is `properties.classification.name` (or a
plain string there), else `properties.class` / `properties.label`.

Coordinates are taken as level-0 pixels in the pixel-edge frame and shifted by `offset_l0`
(pass the slide's `openslide.bounds-x/y` for files exported by QuPath, which crops to the
bounds).  Class names are matched case-insensitively against `classes`; without `classes`
names cannot be resolved and their points are kept unclassified (class -1).
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import logging
import math
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from wsiseg.geojson_features import geojson_features
from wsiseg.models.protocols import NucleusClass, PointSet

__all__ = ["read_prompt_file"]

logger = logging.getLogger(__name__)

_CSV_SUFFIXES = {".csv", ".tsv", ".txt"}
_JSON_SUFFIXES = {".geojson", ".json"}


class _ClassLookup:
    """Class names / ids -> class id, with errors naming the file and place."""

    def __init__(self, path: Path, classes: Sequence[NucleusClass]) -> None:
        self.path = path
        self.classes = tuple(classes)
        self.by_name = {c.name.casefold(): c.id for c in self.classes}
        self.ignored_names: set[str] = set()

    def __call__(self, label: Any, where: str) -> int:
        if label is None or (isinstance(label, str) and not label.strip()):
            return -1
        if isinstance(label, (int, np.integer)) and not isinstance(label, bool):
            return self._check_id(int(label), where)
        text = str(label).strip()
        if re.fullmatch(r"[+-]?\d+", text):
            return self._check_id(int(text), where)
        if text.casefold() in self.by_name:
            return self.by_name[text.casefold()]
        if not self.classes:  # nothing to match names against: keep the point, unclassified
            self.ignored_names.add(text)
            return -1
        known = ", ".join(c.name for c in self.classes)
        raise ValueError(f"{self.path}: {where}: unknown class {text!r}; known classes: {known}")

    def _check_id(self, value: int, where: str) -> int:
        ids = {c.id for c in self.classes}
        if value < -1 or (self.classes and value != -1 and value not in ids):
            raise ValueError(
                f"{self.path}: {where}: class id {value} is not one of {sorted(ids)} (or -1 for unclassified)"
            )
        return value


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    return raw.decode("utf-8-sig")


def _number(text: Any, name: str, path: Path, where: str) -> float:
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise ValueError(f"{path}: {where}: {name} {text!r} is not a number") from None
    if not math.isfinite(value):
        raise ValueError(f"{path}: {where}: {name} is {value}, expected a finite number")
    return value


_Rows = tuple[list[tuple[float, float]], list[int], list[float]]


def _read_csv(path: Path, text: str, lookup: _ClassLookup) -> _Rows:
    lines = text.splitlines()
    if not lines or not lines[0].strip():
        raise ValueError(f"{path}: empty prompt file; expected a header row with x and y columns")
    suffix = path.suffixes[-2] if path.suffix == ".gz" and len(path.suffixes) > 1 else path.suffix
    if suffix == ".tsv":
        delimiter = "\t"
    else:
        try:
            delimiter = csv.Sniffer().sniff(lines[0], delimiters=",;\t").delimiter
        except csv.Error:
            delimiter = ","
    reader = csv.reader(io.StringIO(text), delimiter=delimiter)
    header = [h.strip().casefold() for h in next(reader)]
    if "x" not in header or "y" not in header:
        raise ValueError(f"{path}: line 1: the header {header} needs columns named x and y")
    ix, iy = header.index("x"), header.index("y")
    il = next((header.index(n) for n in ("label", "class") if n in header), None)
    isc = header.index("score") if "score" in header else None
    xy: list[tuple[float, float]] = []
    cls: list[int] = []
    score: list[float] = []
    for line_no, row in enumerate(reader, start=2):
        if not row or all(not cell.strip() for cell in row):
            continue
        where = f"line {line_no}"
        if len(row) < len(header):
            raise ValueError(f"{path}: {where}: {len(row)} fields, the header has {len(header)}")
        xy.append((_number(row[ix], "x", path, where), _number(row[iy], "y", path, where)))
        cls.append(lookup(row[il], where) if il is not None else -1)
        score.append(_number(row[isc], "score", path, where) if isc is not None and row[isc].strip() else 1.0)
    return xy, cls, score


def _feature_class(feature: dict[str, Any]) -> Any:
    props = feature.get("properties") or {}
    classification = props.get("classification")
    if isinstance(classification, dict):
        return classification.get("name")
    if classification is not None:
        return classification
    return props.get("class", props.get("label"))


def _read_geojson(path: Path, text: str, lookup: _ClassLookup) -> _Rows:
    import shapely.geometry

    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: line {exc.lineno}: not valid JSON ({exc.msg})") from None
    features = geojson_features(data)
    if features is None:
        raise ValueError(f"{path}: expected a GeoJSON FeatureCollection, Feature or list of Features")
    xy: list[tuple[float, float]] = []
    cls: list[int] = []
    score: list[float] = []
    for n, feature in enumerate(features):
        where = f"feature {n}"
        geometry = feature.get("geometry") if isinstance(feature, dict) else None
        if not isinstance(geometry, dict):
            raise ValueError(f"{path}: {where}: has no geometry")
        kind = geometry.get("type")
        try:
            shape = shapely.geometry.shape(geometry)
        except Exception as exc:
            raise ValueError(f"{path}: {where}: invalid {kind} geometry ({exc})") from None
        if kind == "Point":
            points = [shape]
        elif kind == "MultiPoint":
            points = list(shape.geoms)
        elif kind in ("Polygon", "MultiPolygon"):
            if shape.is_empty or shape.area <= 0:
                raise ValueError(f"{path}: {where}: {kind} has no area, so no centroid")
            points = [shape.centroid]
        else:
            raise ValueError(f"{path}: {where}: {kind} geometry; expected Point, MultiPoint or Polygon")
        class_id = lookup(_feature_class(feature), where)
        props = feature.get("properties") or {}
        value = props.get("score", (props.get("measurements") or {}).get("score", 1.0))
        for point in points:
            xy.append((_number(point.x, "x", path, where), _number(point.y, "y", path, where)))
            cls.append(class_id)
            score.append(_number(value, "score", path, where))
    return xy, cls, score


def read_prompt_file(
    path: str | Path,
    *,
    classes: Sequence[NucleusClass] = (),
    offset_l0: tuple[float, float] = (0.0, 0.0),
) -> PointSet:
    """Prompt points of a CSV/TSV or GeoJSON file as a PointSet in level-0 px (edge frame).

    classes: the names (and ids) labels may use; ids outside them are rejected when given.
    offset_l0: (x, y) added to every point (the slide's bounds offset for QuPath exports).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: prompt file not found")
    suffix = path.suffixes[-2] if path.suffix == ".gz" and len(path.suffixes) > 1 else path.suffix
    suffix = suffix.lower()
    if suffix not in _CSV_SUFFIXES | _JSON_SUFFIXES:
        raise ValueError(f"{path}: unsupported prompt file type {suffix!r}; use .csv, .tsv or .geojson")
    try:
        text = _read_text(path)
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: cannot read the prompt file as UTF-8 text ({exc})") from None
    lookup = _ClassLookup(path, classes)
    reader = _read_csv if suffix in _CSV_SUFFIXES else _read_geojson
    xy, cls, score = reader(path, text, lookup)
    if lookup.ignored_names:
        logger.warning(
            "%s: class names %s kept as unclassified: no classes were given to match them",
            path,
            sorted(lookup.ignored_names)[:5],
        )
    if not xy:
        return PointSet.empty()
    points = np.asarray(xy, dtype=np.float64) + np.asarray(offset_l0, dtype=np.float64)
    return PointSet(points, np.clip(np.asarray(score), 0.0, 1.0), np.asarray(cls))
