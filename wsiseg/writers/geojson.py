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

Features are formatted batch by batch (numpy + str.format, no per-feature dicts) and
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
        self._classification = _class_members(classes)
        self._feature_format = _feature_template(object_type).format
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
        features = self._format(table, label_id)
        start = 0
        while start < len(features):
            if self._zip is not None and (not self._collection_open or self._entry_count >= self.shard_size):
                if self._collection_open:
                    self._close_collection()
                self._open_collection()
            room = self.shard_size - self._entry_count if self._zip is not None else len(features)
            chunk = features[start : start + room]
            text = ",\n".join(chunk)
            if self._entry_count:
                text = ",\n" + text
            self._out.write(text.encode("utf-8"))
            self._entry_count += len(chunk)
            self._n_written += len(chunk)
            start += len(chunk)

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
    def _format(self, table: NucleusTable, label_id: np.ndarray) -> list[str]:
        """One compact JSON text per kept nucleus."""
        coords = _round2(table.coords - np.asarray(self.offset_l0))
        ring_offsets, geom_offsets = table.ring_offsets, table.geom_offsets
        polys = shapely.from_ragged_array(shapely.GeometryType.POLYGON, coords, (ring_offsets, geom_offsets))
        bad = ~shapely.is_valid(polys) | (shapely.area(polys) <= 0)
        keep = np.ones(len(table), bool)
        if bad.any():
            idx = np.flatnonzero(bad)
            fixed, _ = make_qupath_valid(polys[idx])
            dropped = np.array([g is None for g in fixed], bool)
            polys[idx] = fixed
            keep[idx[dropped]] = False
            self._n_repaired += int((~dropped).sum())
            self._n_dropped += int(dropped.sum())
            if not keep.any():
                return []
            _, coords, (ring_offsets, geom_offsets) = shapely.to_ragged_array(polys[keep])
        n = int(keep.sum())
        try:
            classification = [self._classification[c] for c in table.class_id[keep].tolist()]
        except KeyError as err:
            raise ValueError(
                f"GeoJSON output {self.path}: nucleus class id {err.args[0]} is not among the writer's classes"
            ) from None
        names = ["label_id"] + [k for k in table.measurements if k != "label_id"]
        columns = [label_id[keep]] + [table.measurements[k][keep] for k in names[1:]]
        return list(
            map(
                self._feature_format,
                _uuid_texts(self._rng, n),
                _polygon_texts(coords, ring_offsets, geom_offsets),
                classification,
                _measurement_texts(names, columns),
            )
        )


def _feature_template(object_type: str) -> str:
    """str.format template: {0} uuid, {1} polygon rings text, {2} classification member, {3} measurements."""
    geometry = '"geometry":{{"type":"Polygon","coordinates":[{1}]}}'
    nucleus = ',"nucleusGeometry"' + geometry[len('"geometry"') :] if object_type == "cell" else ""
    props = '"properties":{{"objectType":"' + object_type + '"{2},"measurements":{{{3}}}}}'
    return '{{"type":"Feature","id":"{0}",' + geometry + nucleus + "," + props + "}}"


# -- vectorised number formatting ---------------------------------------------------------
def _fixed_point_chars(values: np.ndarray, decimals: int) -> tuple[np.ndarray, np.ndarray]:
    """ASCII text of `values` rounded to `decimals` decimals, trailing zeros dropped.

    Returns (chars, mask), both (n, width): row i's text is ``chars[i][mask[i]]``.
    Rounding is numpy's (rint(x * 10**d)), so the text parses back to exactly
    ``np.round(x, d)``; -0 prints as 0.  |x| * 10**d must stay below 2**62.
    """
    scale = 10**decimals
    v = np.rint(np.asarray(values, np.float64) * scale)
    big = len(v) > 0 and float(np.abs(v).max()) >= 2**31 - 1
    v = v.astype(np.int64 if big else np.int32)
    n = len(v)
    rem = np.abs(v)
    ndig = len(str(int(rem.max()) // scale)) if n else 1
    width = 1 + ndig + (1 + decimals if decimals else 0)
    chars = np.empty((n, width), np.uint8)
    mask = np.empty((n, width), bool)
    col = width - 1
    if decimals:
        trailing = np.ones(n, bool)
        for _ in range(decimals):
            rem, digit = np.divmod(rem, 10)
            chars[:, col] = digit
            trailing &= digit == 0
            mask[:, col] = ~trailing
            col -= 1
        chars[:, col] = ord(".") - ord("0") + 256  # wraps to "." when "0" is added below
        mask[:, col] = ~trailing
        col -= 1
    for k in range(ndig):
        mask[:, col] = (rem > 0) if k else True
        rem, chars[:, col] = np.divmod(rem, 10)
        col -= 1
    chars += 48
    chars[:, 0] = ord("-")
    mask[:, 0] = v < 0
    return chars, mask


def _split_text(chars: np.ndarray, mask: np.ndarray, row_ends: np.ndarray) -> list[str]:
    """Concatenate the masked rows and cut the text after each row index in `row_ends` (exclusive)."""
    text = chars[mask].tobytes().decode("ascii")
    ends = np.concatenate([[0], np.cumsum(mask.sum(axis=1))])[row_ends].tolist()
    return [text[a:b] for a, b in zip([0] + ends[:-1], ends)]


def _const(text: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    raw = np.frombuffer(text.encode(), np.uint8)
    return np.broadcast_to(raw, (n, len(raw))), np.ones((n, len(raw)), bool)


def _polygon_texts(coords: np.ndarray, ring_offsets: np.ndarray, geom_offsets: np.ndarray) -> list[str]:
    """Per polygon, the text inside its "coordinates":[...]: ``[[x,y],...],[[x,y],...]`` (2 decimals)."""
    m = len(coords)
    pair_ring = np.repeat(np.arange(len(ring_offsets) - 1), np.diff(ring_offsets))
    ring_starts = np.zeros(m, bool)
    ring_starts[ring_offsets[:-1]] = True
    ring_ends = np.zeros(m, bool)
    ring_ends[ring_offsets[1:] - 1] = True
    last_ring = np.zeros(len(ring_offsets) - 1, bool)
    last_ring[geom_offsets[1:] - 1] = True
    x_chars, x_mask = _fixed_point_chars(coords[:, 0], 2)
    y_chars, y_mask = _fixed_point_chars(coords[:, 1], 2)
    open_c, open_m = _const("[[", m)
    open_m = open_m.copy()
    open_m[:, 0] = ring_starts
    comma_c, comma_m = _const(",", m)
    close_c, close_m = _const("]],", m)  # pair close, then "," within a ring or "]" at its end
    close_c = close_c.copy()
    close_c[:, 1] = np.where(ring_ends, ord("]"), ord(","))
    close_m = close_m.copy()
    close_m[:, 2] = ring_ends & ~last_ring[pair_ring]  # "," between the rings of one polygon
    chars = np.hstack([open_c, x_chars, comma_c, y_chars, close_c])
    mask = np.hstack([open_m, x_mask, comma_m, y_mask, close_m])
    return _split_text(chars, mask, ring_offsets[geom_offsets[1:]])


def _measurement_texts(names: Sequence[str], columns: Sequence[np.ndarray]) -> list[str]:
    """Per row, ``"name":value,...`` with about 6 significant digits (integers for int columns)."""
    n = len(columns[0])
    parts_c, parts_m = [], []
    for k, (name, col) in enumerate(zip(names, columns)):
        c, m = _const(("," if k else "") + json.dumps(name) + ":", n)
        parts_c.append(c)
        parts_m.append(m)
        values = np.asarray(col, np.float64)
        top = float(np.abs(values).max()) if n else 0.0
        if np.issubdtype(np.asarray(col).dtype, np.integer):
            decimals = 0
        else:
            decimals = int(np.clip(5 - np.floor(np.log10(top)), 0, 8)) if top > 0 else 0
        if top * 10.0**decimals >= 2**62:
            raise ValueError(f"measurement {name!r} has values too large for GeoJSON output ({top:g})")
        c, m = _fixed_point_chars(values, decimals)
        parts_c.append(c)
        parts_m.append(m)
    return _split_text(np.hstack(parts_c), np.hstack(parts_m), np.arange(1, n + 1))


def _uuid_texts(rng: np.random.Generator, n: int) -> list[str]:
    """n random version-4 UUID strings drawn from `rng`."""
    raw = rng.integers(0, 256, size=(n, 16), dtype=np.uint8)
    raw[:, 6] = (raw[:, 6] & 0x0F) | 0x40  # version 4
    raw[:, 8] = (raw[:, 8] & 0x3F) | 0x80  # RFC 4122 variant
    hexdigits = np.frombuffer(b"0123456789abcdef", np.uint8)
    nibbles = np.stack([raw >> 4, raw & 0x0F], axis=-1).reshape(n, 32)
    text = np.insert(hexdigits[nibbles], [8, 12, 16, 20], ord("-"), axis=1)
    flat = text.tobytes().decode("ascii")
    return [flat[i : i + 36] for i in range(0, 36 * n, 36)]


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
