"""Streaming QuPath GeoJSON writer (.geojson, .geojson.gz, or a .zip of FeatureCollections).

What QuPath 0.4-0.7 accepts (see the design notes on QuPath GeoJSON): a FeatureCollection
of Features, each with a UUID ``id``, one closed ``Polygon`` valid *after* rounding to 2
decimals (QuPath >= 0.6 rejects the whole file for one invalid polygon),
``properties.objectType`` ("detection", or "cell" with a Feature-level
``nucleusGeometry``), ``properties.classification`` = {"name", "color": [r, g, b]} (absent
for unclassified nuclei) and a flat ``properties.measurements`` {name: number}.

Coordinates written = level-0 pixels (pixel-edge frame) minus `offset_l0` (the slide's
``openslide.bounds-x/y`` when QuPath crops to the bounds).  Every nucleus also carries
the measurement ``label_id``: 1 + its position in the stream of nuclei given to
`write`, the same id the Zarr store writes, so the two outputs join on it.

Features are formatted batch by batch (one compiled call, `wsiseg.writers.geojson_text`) and
streamed to ``<path>.partial-<hex>``, renamed onto `path` by `close`; `abort` deletes it.
"""

from __future__ import annotations

import gzip
import io
import json
import logging
import os
import secrets
import uuid
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal

import numpy as np
import shapely

from wsiseg.disk_space import names_full_disk
from wsiseg.models.protocols import NucleusClass
from wsiseg.nuclei import NucleusTable
from wsiseg.writers.report import jsonable
from wsiseg.writers.base import StreamingWriter
from wsiseg.writers.geojson_text import feature_texts, pieces
from wsiseg.writers.simple_rings import certainly_valid

__all__ = ["GeoJSONSummary", "GeoJSONWriter", "check_qupath_geojson", "make_qupath_valid"]

logger = logging.getLogger(__name__)

GeoJSONFormat = Literal["gz", "geojson", "zip"]
_SUFFIXES = {"gz": (".geojson.gz", ".json.gz"), "geojson": (".geojson", ".json"), "zip": (".zip",)}
_OBJECT_TYPES = ("detection", "cell")
_GRID = 0.01  # QuPath >= 0.6 reduces every geometry to a 0.01 px grid


@dataclass(frozen=True)
class GeoJSONSummary:
    """What `GeoJSONWriter.close` wrote: features, repaired and dropped polygons, zip entries."""

    path: Path
    n_features: int
    n_repaired: int
    n_dropped: int
    n_entries: int


def _round2(coords: np.ndarray) -> np.ndarray:
    return np.round(coords, 2) + 0.0  # + 0.0 turns -0.0 into 0.0


def _largest_polygon(geom: shapely.Geometry) -> shapely.Polygon | None:
    """The largest-area Polygon part of any geometry (collections are flattened), or None."""
    parts, polygons = [geom], []
    while parts:
        g = parts.pop()
        if isinstance(g, shapely.Polygon) and not g.is_empty and g.area > 0:
            polygons.append(g)
        elif isinstance(g, (shapely.MultiPolygon, shapely.GeometryCollection)):
            parts.extend(shapely.get_parts(g))
    return max(polygons, key=lambda p: p.area) if polygons else None


def _repair(geom: shapely.Geometry) -> shapely.Polygon | None:
    """A valid polygon on the 0.01 grid close to `geom`, or None when nothing with area is left."""
    part = _largest_polygon(shapely.make_valid(geom))
    # Snap-rounding to the grid keeps the result valid; then take the largest part again.
    part = None if part is None else _largest_polygon(shapely.set_precision(part, _GRID))
    if part is None:
        return None
    part = shapely.transform(part, _round2)
    return part if shapely.is_valid(part) and part.area > 0 else None


def make_qupath_valid(polygons: np.ndarray) -> tuple[np.ndarray, int]:
    """Round polygons to 2 decimals and repair the ones that are invalid afterwards.

    polygons: (N,) object array of shapely Polygons (already rounded or not).
    Returns (polygons, n_invalid): a same-length object array of valid polygons on the
    0.01 grid (None where nothing valid with area remains) and how many needed repair.
    """
    polys = shapely.transform(np.asarray(polygons, dtype=object), _round2)
    bad = np.flatnonzero(~shapely.is_valid(polys) | (shapely.area(polys) <= 0))
    for i in bad:
        polys[i] = _repair(polys[i])
    return polys, len(bad)


def _class_members(classes: Sequence[NucleusClass]) -> dict[int, str]:
    members: dict[int, str] = {-1: ""}
    for c in classes:
        if c.id in members:
            raise ValueError(f"GeoJSONWriter classes: class id {c.id} appears twice")
        r, g, b = (int(v) for v in c.color)
        members[c.id] = f',"classification":{{"name":{json.dumps(c.name)},"color":[{r},{g},{b}]}}'
    return members


def _members_json(members: Mapping[str, Any]) -> str:
    """Foreign members as ``"k":v,`` text (each followed by a comma)."""
    out = []
    for key, value in members.items():
        if key in ("type", "features", "bbox"):
            raise ValueError(f"GeoJSONWriter foreign member {key!r} is reserved by GeoJSON; rename it")
        out.append(f"{json.dumps(str(key))}:{json.dumps(jsonable(value), separators=(',', ':'), allow_nan=False)},")
    return "".join(out)


class GeoJSONWriter(StreamingWriter):
    """Stream nuclei into a QuPath-importable GeoJSON file.

    path: final file; its suffix must match `fmt` (.geojson.gz for "gz", .geojson for
    "geojson", .zip for "zip").  An existing file is replaced atomically at `close`.
    classes: the model's classes (id -> name, colour); class_id -1 = unclassified.
    offset_l0: (bx, by) subtracted from level-0 coordinates (QuPath's cropped frame).
    shard_size: nuclei per zip entry (`<stem>-0000.geojson`, ...); each entry is a
    complete FeatureCollection.  Consecutive nuclei share an entry, so a tile-major
    stream gives spatially compact entries.
    foreign_members: extra top-level FeatureCollection members (provenance); QuPath
    ignores them.  ``coordinate_frame`` (with the offset) is always added.
    seed: seeds the UUID generator (same seed + same input = same file); None = random.
    """

    @names_full_disk  # a full disk: one line naming it and its free space
    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        fmt: GeoJSONFormat = "gz",
        classes: Sequence[NucleusClass] = (),
        offset_l0: tuple[float, float] = (0.0, 0.0),
        object_type: str = "detection",
        shard_size: int = 100_000,
        foreign_members: Mapping[str, Any] | None = None,
        compresslevel: int = 4,
        seed: int | None = None,
    ) -> None:
        self.path = Path(path)
        if fmt not in _SUFFIXES:
            raise ValueError(f"GeoJSONWriter fmt must be one of {sorted(_SUFFIXES)}, got {fmt!r}")
        if not self.path.name.lower().endswith(_SUFFIXES[fmt]):
            raise ValueError(
                f"GeoJSON output {self.path}: fmt={fmt!r} needs a name ending in {' or '.join(_SUFFIXES[fmt])}"
            )
        if object_type not in _OBJECT_TYPES:
            raise ValueError(f"GeoJSONWriter object_type must be one of {_OBJECT_TYPES}, got {object_type!r}")
        if shard_size < 1:
            raise ValueError(f"GeoJSONWriter shard_size must be >= 1, got {shard_size}")
        if not 0 <= compresslevel <= 9:
            raise ValueError(f"GeoJSONWriter compresslevel must be 0-9, got {compresslevel}")
        offset = np.asarray(offset_l0, np.float64).reshape(-1)
        if offset.shape != (2,) or not np.isfinite(offset).all():
            raise ValueError(f"GeoJSONWriter offset_l0 must be two finite numbers (bx, by), got {offset_l0!r}")
        self.fmt = fmt
        self.offset_l0 = (float(offset[0]), float(offset[1]))
        self.object_type = object_type
        self.shard_size = int(shard_size)
        members = _class_members(classes)
        self._class_ids = np.array(sorted(members), np.int64)
        self._classification = {c: members[c] for c in self._class_ids.tolist()}
        self._template = _feature_pieces(object_type)
        frame = {"space": "qupath_image_pixels", "pixel_convention": "edge", "offset_l0": list(self.offset_l0)}
        self._head = _members_json({"coordinate_frame": frame, **dict(foreign_members or {})})
        self._rng = np.random.default_rng(secrets.randbits(64) if seed is None else seed)
        self._tmp = self.path.with_name(f"{self.path.name}.partial-{uuid.uuid4().hex[:12]}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._raw: IO[bytes] = open(self._tmp, "wb")  # noqa: SIM115 - closed by close()/abort()
        self._zip: zipfile.ZipFile | None = None
        if fmt == "gz":
            self._out: Any = gzip.GzipFile(
                self.path.name, mode="wb", compresslevel=compresslevel, fileobj=self._raw, mtime=0
            )
        elif fmt == "zip":
            self._zip = zipfile.ZipFile(
                self._raw, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=compresslevel, allowZip64=True
            )
            self._out = io.BytesIO()  # replaced by the first entry
        else:
            self._out = self._raw
        self._entry_count = 0  # features in the open collection (zip entry or the single file)
        self._n_entries = 0
        self._collection_open = False
        self._n_seen = self._n_written = self._n_repaired = self._n_dropped = 0  # _n_seen: label_id source
        self._closed = False
        if fmt != "zip":
            self._open_collection()

    # -- collection framing ----------------------------------------------------------
    def _open_collection(self) -> None:
        if self._zip is not None:
            stem = self.path.name[: -len(".zip")].removesuffix(".geojson")
            name = f"{stem}-{self._n_entries:04d}.geojson"
            self._out = self._zip.open(name, "w", force_zip64=True)
        self._out.write(f'{{"type":"FeatureCollection",{self._head}"features":[\n'.encode())
        self._n_entries += 1
        self._entry_count = 0
        self._collection_open = True

    def _close_collection(self) -> None:
        self._out.write(b"\n]}\n")
        self._collection_open = False
        if self._zip is not None:
            self._out.close()

    # -- public API ------------------------------------------------------------------
    @names_full_disk  # a full disk: one line naming it and its free space
    def write(self, table: NucleusTable) -> None:
        """Append the nuclei of `table` (level-0 px).  Invalid polygons are repaired or dropped."""
        if self._closed:
            raise RuntimeError(f"GeoJSONWriter for {self.path} is closed; create a new writer")
        n = len(table)
        if n == 0:
            return
        label_id = np.arange(self._n_seen + 1, self._n_seen + n + 1, dtype=np.int64)
        self._n_seen += n
        text, ends = self._format(table, label_id)  # features separated by ",\n"
        n_features, start = len(ends), 0
        while start < n_features:
            if self._zip is not None and (not self._collection_open or self._entry_count >= self.shard_size):
                if self._collection_open:
                    self._close_collection()
                self._open_collection()
            room = self.shard_size - self._entry_count if self._zip is not None else n_features
            stop = min(start + room, n_features)
            a = 0 if start == 0 else int(ends[start - 1]) + 2  # after the previous feature's ",\n"
            chunk = text[a : int(ends[stop - 1])].tobytes()
            self._out.write(b",\n" + chunk if self._entry_count else chunk)  # one write per chunk, as always
            self._entry_count += stop - start
            self._n_written += stop - start
            start = stop

    @names_full_disk  # a full disk: one line naming it and its free space
    def close(self) -> GeoJSONSummary:
        """Finish the file and rename it onto `path`.  Returns what was written."""
        if self._closed:
            raise RuntimeError(f"GeoJSONWriter for {self.path} is already closed")
        try:
            if self._zip is not None and not self._collection_open:
                self._open_collection()  # an empty collection keeps the zip importable
            self._close_collection()
            if self.fmt == "gz":
                self._out.close()
            if self._zip is not None:
                self._zip.close()
            self._raw.flush()
            os.fsync(self._raw.fileno())
            self._raw.close()
            os.replace(self._tmp, self.path)
        except BaseException:
            self.abort()
            raise
        self._closed = True
        if self._n_dropped:
            logger.warning("%s: dropped %d nuclei with no valid polygon after rounding", self.path, self._n_dropped)
        return GeoJSONSummary(self.path, self._n_written, self._n_repaired, self._n_dropped, self._n_entries)

    def abort(self) -> None:
        """Discard everything written so far; nothing remains under `path` or the temp name."""
        self._closed = True
        for handle in (self._out, self._zip, self._raw):  # entry / gzip stream first, the file last
            try:
                if handle is not None:
                    handle.close()
            except Exception:  # noqa: BLE001 - best effort while discarding
                pass
        self._tmp.unlink(missing_ok=True)

    # -- formatting --------------------------------------------------------------------
    def _format(self, table: NucleusTable, label_id: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The kept nuclei's Features as one uint8 text, separated by ",\n", and the end of each."""
        coords = _round2(table.coords - np.asarray(self.offset_l0))
        ring_offsets, geom_offsets = table.ring_offsets, table.geom_offsets
        keep = np.ones(len(table), bool)
        # GEOS checks only what the compiled test cannot vouch for (edge-traced outlines it can)
        doubt = np.flatnonzero(~certainly_valid(coords, ring_offsets, geom_offsets))
        idx = doubt
        if len(doubt):
            polys = shapely.from_ragged_array(shapely.GeometryType.POLYGON, coords, (ring_offsets, geom_offsets))
            idx = doubt[~shapely.is_valid(polys[doubt]) | (shapely.area(polys[doubt]) <= 0)]
        if len(idx):
            fixed, _ = make_qupath_valid(polys[idx])
            dropped = np.array([g is None for g in fixed], bool)
            polys[idx] = fixed
            keep[idx[dropped]] = False
            self._n_repaired += int((~dropped).sum())
            self._n_dropped += int(dropped.sum())
            if not keep.any():
                return np.zeros(0, np.uint8), np.zeros(0, np.int64)
            _, coords, (ring_offsets, geom_offsets) = shapely.to_ragged_array(polys[keep])
        class_id = table.class_id[keep]
        class_index = np.searchsorted(self._class_ids, class_id)  # _class_ids is sorted
        unknown = self._class_ids[np.minimum(class_index, len(self._class_ids) - 1)] != class_id
        if unknown.any():
            raise ValueError(
                f"GeoJSON output {self.path}: nucleus class id {int(class_id[unknown][0])} is not among the "
                "writer's classes"
            )
        names = ["label_id"] + [k for k in table.measurements if k != "label_id"]
        columns = [label_id[keep]] + [table.measurements[k][keep] for k in names[1:]]
        values = np.stack([np.asarray(c, np.float64) for c in columns], axis=1)
        tops = np.abs(values).max(axis=0).tolist() if len(values) else [0.0] * len(names)
        decimals = np.array(
            [_decimals(name, np.issubdtype(c.dtype, np.integer), top) for name, c, top in zip(names, columns, tops)],
            np.int64,
        )
        prefixes = [("," if k else "") + json.dumps(name) + ":" for k, name in enumerate(names)]
        text, offsets = pieces([*self._template, *prefixes, *self._classification.values()])
        return feature_texts(
            _uuid_bytes(self._rng, int(keep.sum())), np.ascontiguousarray(coords, np.float64),
            np.ascontiguousarray(ring_offsets, np.int64), np.ascontiguousarray(geom_offsets, np.int64),
            class_index.astype(np.int64), values,
            decimals, text, offsets, self.object_type == "cell",
        )


def _decimals(name: str, integer: bool, top: float) -> int:
    """Decimals a measurement column is written with: about 6 significant digits of its largest
    absolute value `top` (0 for `integer` columns).  Raises ValueError when its values are too large."""
    if integer:
        decimals = 0
    else:
        decimals = int(min(max(5 - np.floor(np.log10(top)), 0), 8)) if top > 0 else 0
    if top * 10.0**decimals >= 2**62:
        raise ValueError(f"measurement {name!r} has values too large for GeoJSON output ({top:g})")
    return decimals


def _feature_pieces(object_type: str) -> tuple[str, ...]:
    """The constant texts of a Feature, in `geojson_text.feature_texts`' order: its head (the
    id's text follows), geometry head, geometry tail, nucleusGeometry head, properties head
    (its classification member follows), measurements head, Feature tail, separator."""
    return (
        '{"type":"Feature","id":"',
        '","geometry":{"type":"Polygon","coordinates":[',
        "]}",
        ',"nucleusGeometry":{"type":"Polygon","coordinates":[',
        ',"properties":{"objectType":"' + object_type + '"',
        ',"measurements":{',
        "}}}",
        ",\n",
    )


def _uuid_bytes(rng: np.random.Generator, n: int) -> np.ndarray:
    """(n, 16) uint8 bytes of n random version-4 UUIDs drawn from `rng`."""
    raw = rng.integers(0, 256, size=(n, 16), dtype=np.uint8)
    raw[:, 6] = (raw[:, 6] & 0x0F) | 0x40  # version 4
    raw[:, 8] = (raw[:, 8] & 0x3F) | 0x80  # RFC 4122 variant
    return raw


# -- validation -------------------------------------------------------------------------
_MAX_PROBLEMS = 100  # problems listed before the rest are only counted


class _NonFinite(float):
    """Marks a NaN/Infinity token met while parsing (strict JSON and QuPath 0.4 reject it)."""


def _load_collections(path: Path) -> list[tuple[str, Any]]:
    """(name, parsed JSON) for the file, or for every entry of a zip."""

    def parse(raw: bytes) -> Any:
        return json.loads(raw.decode("utf-8"), parse_constant=lambda token: _NonFinite("nan"))

    name = path.name.lower()
    if name.endswith(".zip"):
        with zipfile.ZipFile(path) as zf:
            return [
                (f"{path.name}:{info.filename}", parse(zf.read(info))) for info in zf.infolist() if not info.is_dir()
            ]
    if name.endswith(".gz"):
        with gzip.open(path, "rb") as fh:
            return [(path.name, parse(fh.read()))]
    return [(path.name, parse(path.read_bytes()))]


def _check_polygon(geom: Any, where: str) -> list[str]:
    if not isinstance(geom, dict):
        return [f"{where}: geometry is {type(geom).__name__}, expected a Polygon object"]
    if geom.get("type") != "Polygon":
        return [f"{where}: geometry type {geom.get('type')!r}, expected 'Polygon'"]
    rings = geom.get("coordinates")
    if not isinstance(rings, list) or not rings:
        return [f"{where}: Polygon has no rings"]
    problems: list[str] = []
    arrays = []
    for k, ring in enumerate(rings):
        try:
            arr = np.asarray(ring, dtype=np.float64)
            if arr.ndim != 2 or arr.shape[1] != 2 or not np.isfinite(arr).all():
                raise ValueError
        except (TypeError, ValueError):
            problems.append(f"{where}: ring {k} is not a list of finite [x, y] positions")
            continue
        if len(arr) < 4:
            problems.append(f"{where}: ring {k} has {len(arr)} positions, needs >= 4")
        elif not np.array_equal(arr[0], arr[-1]):
            problems.append(f"{where}: ring {k} is not closed (first != last position)")
        if len(np.unique(arr, axis=0)) < 3:
            problems.append(f"{where}: ring {k} has fewer than 3 distinct vertices")
        if not np.array_equal(np.round(arr, 2), arr):
            problems.append(f"{where}: ring {k} has coordinates with more than 2 decimals")
        arrays.append(arr)
    if problems:
        return problems
    poly = shapely.Polygon(arrays[0], arrays[1:])
    if not shapely.is_valid(poly):
        problems.append(f"{where}: invalid polygon ({shapely.is_valid_reason(poly)})")
    elif poly.area <= 0:
        problems.append(f"{where}: polygon has zero area")
    return problems


def _check_classification(cls: Any, where: str) -> list[str]:
    if isinstance(cls, str):
        return [] if cls else [f"{where}: empty classification name"]
    if not isinstance(cls, dict):
        return [f"{where}: classification must be a string or {{name, color}}, got {type(cls).__name__}"]
    problems = []
    name = cls.get("name")
    if not isinstance(name, str) or not name:
        problems.append(f"{where}: classification has no name")
    elif ": " in name:
        problems.append(f"{where}: classification name {name!r} contains ': ' (QuPath derived class)")
    color = cls.get("color")
    if color is None:
        problems.append(f"{where}: classification without 'color' (QuPath refuses the whole file)")
    elif not (isinstance(color, list) and len(color) == 3 and all(type(c) is int and 0 <= c <= 255 for c in color)):
        problems.append(f"{where}: classification color must be [r, g, b] integers 0-255, got {color!r}")
    return problems


def _check_feature(feature: Any, where: str, ids: set[str]) -> list[str]:
    if not isinstance(feature, dict) or feature.get("type") != "Feature":
        return [f"{where}: not a GeoJSON Feature"]
    problems = []
    fid = feature.get("id")
    try:
        if not isinstance(fid, str) or uuid.UUID(fid).version != 4:
            raise ValueError
        if fid in ids:
            problems.append(f"{where}: duplicate id {fid}")
        ids.add(fid)
    except ValueError:
        problems.append(f"{where}: id {fid!r} is not a UUID4 string")
    problems += _check_polygon(feature.get("geometry"), where)
    props = feature.get("properties")
    if not isinstance(props, dict):
        return problems + [f"{where}: properties missing"]
    if "type" in props:
        problems.append(f"{where}: properties has a 'type' key (QuPath reads it as the object type)")
    otype = props.get("objectType")
    if otype not in _OBJECT_TYPES:
        problems.append(f"{where}: properties.objectType {otype!r}, expected one of {_OBJECT_TYPES}")
    if "nucleusGeometry" in props:
        problems.append(f"{where}: nucleusGeometry belongs at Feature level, not in properties")
    if otype == "cell" and "nucleusGeometry" in feature:
        problems += _check_polygon(feature["nucleusGeometry"], f"{where} nucleusGeometry")
    if "classification" in props:
        problems += _check_classification(props["classification"], where)
    meas = props.get("measurements", {})
    if not isinstance(meas, dict):
        problems.append(f"{where}: measurements must be a flat {{name: number}} object")
    else:
        for key, value in meas.items():
            if isinstance(value, _NonFinite) or (isinstance(value, float) and not np.isfinite(value)):
                problems.append(f"{where}: measurement {key!r} is NaN or Infinity")
            elif not isinstance(value, (int, float)) or isinstance(value, bool):
                problems.append(f"{where}: measurement {key!r} is {type(value).__name__}, expected a number")
    return problems


def check_qupath_geojson(path: str | os.PathLike[str]) -> list[str]:
    """Problems that would stop QuPath 0.4-0.7 importing `path` (.geojson, .geojson.gz, .zip).

    Returns an empty list when every Feature follows the rules in the module docstring;
    otherwise one line per problem (at most 100, then a count of the rest).  Reads the
    whole file into memory: meant for tests and spot checks, not million-nucleus files.
    """
    path = Path(path)
    try:
        collections = _load_collections(path)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        return [f"{path}: cannot be read as GeoJSON ({err})"]
    if not collections:
        return [f"{path}: zip has no entries"]
    problems: list[str] = []
    ids: set[str] = set()
    for name, doc in collections:
        if (
            not isinstance(doc, dict)
            or doc.get("type") != "FeatureCollection"
            or not isinstance(doc.get("features"), list)
        ):
            problems.append(f"{name}: top level is not a FeatureCollection with a 'features' list")
            continue
        for i, feature in enumerate(doc["features"]):
            problems += _check_feature(feature, f"{name} feature {i}", ids)
    if len(problems) > _MAX_PROBLEMS:
        return problems[:_MAX_PROBLEMS] + [f"... and {len(problems) - _MAX_PROBLEMS} more problems"]
    return problems
