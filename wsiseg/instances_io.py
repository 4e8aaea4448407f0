"""Instance label images from files: label rasters, wsiseg GeoJSON and wsiseg Zarr stores.

Every loader returns an (H, W) integer label image in the level-0 pixel frame (pixel
(row i, column j) covers [j, j+1) x [i, i+1)), 0 = background, one id per nucleus:

* ``.tif``/``.tiff`` (tifffile), ``.png`` (Pillow, single channel), ``.npy``: the array as
  stored; it must be 2-D with whole, non-negative values.
* ``.geojson``, ``.json``, ``.geojson.gz``, ``.json.gz``, ``.zip`` (shards), as
  `wsiseg.writers.geojson` writes them: features are in QuPath's frame (level 0 minus the
  ``coordinate_frame.offset_l0`` the file records; 0 when it records none, as in a QuPath
  export) and are shifted back to level 0.  A feature's ``nucleusGeometry`` is used when
  present, else its ``geometry``; Polygon and MultiPolygon are painted, other geometry types
  are ignored.  Ids are the features' ``measurements.label_id`` when every feature has a
  distinct one, else 1 + the feature's position.
* ``.zarr`` (a wsiseg nuclei store): its ``labels/nuclei`` level 0 when that matches the
  requested shape (or no shape was requested), else its polygons painted onto the grid;
  ids are the store's ``label_id``.

Polygons are painted by pixel centre: a pixel gets a polygon's id when its centre
(j + 0.5, i + 0.5) lies inside it, holes excluded (`wsiseg.writers.labels.rasterize_polygons`,
the rule of the Zarr label raster; the same pixels as ``skimage.draw.polygon`` on the
vertices shifted by -0.5).  Where polygons overlap, the larger id wins.

Errors are `InstanceFileError` (a ValueError) with one line naming the file and the fix.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from wsiseg.geojson_features import geojson_features

__all__ = [
    "InstanceFileError",
    "instance_file_kind",
    "instances_mpp",
    "load_instance_pair",
    "load_instances",
    "rasterize_polygons",
    "read_geojson_polygons",
]

InstanceFileKind = Literal["raster", "geojson", "zarr"]
_RASTER_SUFFIXES = (".tif", ".tiff", ".png", ".npy")
_GEOJSON_SUFFIXES = (".geojson", ".json", ".geojson.gz", ".json.gz", ".zip")
_SUPPORTED = ".tif, .tiff, .png, .npy, .geojson, .geojson.gz, .zip or .zarr"


class InstanceFileError(ValueError):
    """A file cannot be read as instance labels; the message names the file and the fix."""


def instance_file_kind(path: str | os.PathLike[str]) -> InstanceFileKind:
    """"raster", "geojson" or "zarr" from the file name; InstanceFileError for other suffixes."""
    name = Path(path).name.lower()
    if name.endswith(".zarr"):
        return "zarr"
    if name.endswith(_GEOJSON_SUFFIXES):
        return "geojson"
    if name.endswith(_RASTER_SUFFIXES):
        return "raster"
    raise InstanceFileError(f"{path}: unsupported instance file type; use {_SUPPORTED}")


def _check_exists(path: Path) -> None:
    if not path.exists():
        raise InstanceFileError(f"{path}: no such file; check the path")


def rasterize_polygons(
    polygons: Sequence[Any] | np.ndarray, shape: tuple[int, int], labels: Sequence[int] | np.ndarray | None = None
) -> np.ndarray:
    """Paint shapely (Multi)Polygons, level-0 px edge frame, into an (H, W) uint32 label image.

    labels: one id (>= 1) per polygon; default 1..N in order.  Pixel rule: centre inside,
    holes excluded, larger id wins where polygons overlap.  Empty or non-polygonal entries
    paint nothing.  Raises ValueError when labels do not fit uint32 or differ in length.
    """
    import shapely

    from wsiseg.writers.labels import rasterize_polygons as paint

    h, w = (int(v) for v in shape)
    canvas = np.zeros((h, w), np.uint32)
    geoms = np.asarray(polygons, dtype=object).reshape(-1)
    ids = np.arange(1, len(geoms) + 1, dtype=np.int64) if labels is None else np.asarray(labels, np.int64)
    if ids.shape != geoms.shape:
        raise ValueError(f"rasterize_polygons: {len(geoms)} polygons but {len(ids)} labels")
    if len(ids) and (ids.min() < 1 or ids.max() > np.iinfo(np.uint32).max):
        raise ValueError("rasterize_polygons: labels must be in 1..2**32-1")
    if len(geoms) == 0:
        return canvas
    parts, index = shapely.get_parts(geoms, return_index=True)
    keep = shapely.get_type_id(parts) == shapely.GeometryType.POLYGON
    keep &= ~shapely.is_empty(parts)
    parts, index = parts[keep], index[keep]
    if len(parts) == 0:
        return canvas
    _, coords, (ring_offsets, geom_offsets) = shapely.to_ragged_array(parts)
    paint(canvas, coords, ring_offsets, geom_offsets, ids[index].astype(np.uint32))
    return canvas


def _read_collections(path: Path) -> list[Any]:
    """The parsed JSON document(s) of a GeoJSON file, gzip file or zip of shards."""
    name = path.name.lower()
    try:
        if name.endswith(".zip"):
            with zipfile.ZipFile(path) as archive:
                entries = sorted(n for n in archive.namelist() if n.lower().endswith((".geojson", ".json")))
                if not entries:
                    raise InstanceFileError(f"{path}: the zip holds no .geojson entry; is it a wsiseg GeoJSON zip?")
                return [json.loads(archive.read(n)) for n in entries]
        if name.endswith(".gz"):
            with gzip.open(path, "rt", encoding="utf-8") as fh:
                return [json.load(fh)]
        with open(path, encoding="utf-8") as fh:
            return [json.load(fh)]
    except (json.JSONDecodeError, UnicodeDecodeError, EOFError, gzip.BadGzipFile, zipfile.BadZipFile) as err:
        raise InstanceFileError(f"{path}: not readable GeoJSON ({err}); is the file complete?") from None


def read_geojson_polygons(path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray]:
    """(polygons, labels) of a wsiseg/QuPath GeoJSON file, in the level-0 frame.

    polygons: (N,) object array of shapely Polygon/MultiPolygon; labels: (N,) int64 ids
    (see the module docstring).  Raises InstanceFileError for a missing or unreadable file.
    """
    import shapely
    import shapely.geometry

    path = Path(path)
    _check_exists(path)
    geoms: list[Any] = []
    label_ids: list[Any] = []
    for doc in _read_collections(path):
        features = geojson_features(doc)
        if features is None:
            raise InstanceFileError(f"{path}: not a GeoJSON FeatureCollection or Feature list")
        is_collection = isinstance(doc, dict) and doc.get("type") == "FeatureCollection"
        frame = (doc.get("coordinate_frame") or {}) if is_collection else {}
        offset = np.asarray(frame.get("offset_l0") or (0.0, 0.0), np.float64)
        shapes = []
        for feature in features:
            geometry = feature.get("nucleusGeometry") or feature.get("geometry")
            if not geometry or geometry.get("type") not in ("Polygon", "MultiPolygon"):
                continue
            try:
                shapes.append(shapely.geometry.shape(geometry))
            except (ValueError, TypeError, IndexError, AttributeError) as err:
                raise InstanceFileError(f"{path}: a feature has a malformed polygon ({err})") from None
            measurements = (feature.get("properties") or {}).get("measurements") or {}
            label_ids.append(measurements.get("label_id"))
        batch = np.empty(len(shapes), dtype=object)
        batch[:] = shapes
        geoms.extend(shapely.transform(batch, lambda xy: xy + offset) if offset.any() else batch)
    n = len(geoms)
    labels = np.arange(1, n + 1, dtype=np.int64)
    if n and all(isinstance(v, (int, float)) and float(v).is_integer() and v >= 1 for v in label_ids):
        given = np.asarray(label_ids, np.int64)
        if len(np.unique(given)) == n:
            labels = given
    polygons = np.empty(n, dtype=object)
    polygons[:] = geoms
    return polygons, labels


def _geojson_extent(polygons: np.ndarray) -> tuple[int, int]:
    """(H, W) covering every polygon from the origin (at least 1 x 1)."""
    import shapely

    if len(polygons) == 0:
        return 1, 1
    bounds = shapely.bounds(polygons)
    return max(1, math.ceil(float(np.nanmax(bounds[:, 3])))), max(1, math.ceil(float(np.nanmax(bounds[:, 2]))))


def _read_raster(path: Path) -> np.ndarray:
    name = path.name.lower()
    try:
        if name.endswith(".npy"):
            array = np.load(path, allow_pickle=False)
        elif name.endswith(".png"):
            from PIL import Image

            with Image.open(path) as image:
                if image.mode not in ("1", "L", "P", "I", "I;16", "I;16B", "I;16L"):
                    raise InstanceFileError(
                        f"{path}: a {image.mode} PNG is not an instance label image; "
                        "save labels as a single-channel (8/16/32-bit) PNG, TIFF or NPY"
                    )
                array = np.asarray(image)
        else:
            import tifffile

            array = tifffile.imread(path)
    except InstanceFileError:
        raise
    except (OSError, ValueError) as err:
        raise InstanceFileError(f"{path}: not a readable label image ({' '.join(str(err).split())})") from None
    array = np.squeeze(array) if array.ndim > 2 else array
    if array.ndim != 2:
        raise InstanceFileError(f"{path}: an instance label image must be 2-D (H, W), got shape {array.shape}")
    if array.dtype == bool:
        array = array.astype(np.uint8)
    if not np.issubdtype(array.dtype, np.integer):
        if not np.issubdtype(array.dtype, np.floating) or not np.array_equal(array, np.round(array)):
            raise InstanceFileError(f"{path}: labels must be whole numbers, got dtype {array.dtype}")
        array = array.astype(np.int64)
    if array.size and array.min() < 0:
        raise InstanceFileError(f"{path}: labels must be >= 0 (0 = background), got {array.min()}")
    return array


def _open_store(path: Path) -> Any:
    from wsiseg.writers.zarr_store import NucleiStoreError, open_nuclei

    try:
        return open_nuclei(path)
    except NucleiStoreError as err:
        raise InstanceFileError(str(err)) from None


def _store_shape(store: Any) -> tuple[int, int]:
    source = store.attrs.get("source") or {}
    if source.get("height") and source.get("width"):
        return int(source["height"]), int(source["width"])
    return tuple(store.labels(0).shape)  # type: ignore[return-value]


def _read_zarr(path: Path, shape: tuple[int, int] | None) -> np.ndarray:
    from wsiseg.writers.zarr_store import NucleiStoreError

    store = _open_store(path)
    try:
        raster = store.labels(0)
    except NucleiStoreError:  # written without a label raster: paint its polygons
        raster = None
    if raster is not None and (shape is None or tuple(raster.shape) == tuple(shape)):
        return np.asarray(raster[:])
    h, w = shape if shape is not None else _store_shape(store)
    rows = store.query_rows(0.0, 0.0, float(w), float(h))
    table = store.table(rows)
    return rasterize_polygons(table.polygons(), (h, w), store.label_ids(rows))


def load_instances(path: str | os.PathLike[str], shape: tuple[int, int] | None = None) -> np.ndarray:
    """(H, W) integer instance labels from `path` (formats and frames: module docstring).

    shape: the grid to paint polygons on (GeoJSON, Zarr); a raster must already have it.
    Without a shape, a GeoJSON is painted on the smallest grid from the origin that holds
    every polygon and a Zarr store on its slide's level-0 grid.
    Raises InstanceFileError for a missing, unreadable or unsupported file or a shape mismatch.
    """
    path = Path(path)
    kind = instance_file_kind(path)
    _check_exists(path)
    if kind == "raster":
        labels = _read_raster(path)
    elif kind == "geojson":
        polygons, ids = read_geojson_polygons(path)
        labels = rasterize_polygons(polygons, shape if shape is not None else _geojson_extent(polygons), ids)
    else:
        labels = _read_zarr(path, shape)
    if shape is not None and tuple(labels.shape) != tuple(shape):
        raise InstanceFileError(
            f"{path}: labels of shape {labels.shape} do not match the grid {tuple(shape)}; "
            "score label images of the same size"
        )
    return labels


def load_instance_pair(
    pred_path: str | os.PathLike[str], truth_path: str | os.PathLike[str]
) -> tuple[np.ndarray, np.ndarray]:
    """(pred, truth) label images on one grid.

    The grid is the truth's when it is a raster or Zarr store, else the prediction's; when
    both are GeoJSON, the smallest grid from the origin holding every polygon of both.
    Raises InstanceFileError (naming the file) as `load_instances`.
    """
    pred_path, truth_path = Path(pred_path), Path(truth_path)
    pred_kind, truth_kind = instance_file_kind(pred_path), instance_file_kind(truth_path)
    for path in (truth_path, pred_path):
        _check_exists(path)
    if truth_kind != "geojson":
        truth = load_instances(truth_path)
        return load_instances(pred_path, truth.shape), truth
    if pred_kind != "geojson":
        pred = load_instances(pred_path)
        return pred, load_instances(truth_path, pred.shape)
    truth_polygons, truth_ids = read_geojson_polygons(truth_path)
    pred_polygons, pred_ids = read_geojson_polygons(pred_path)
    h_t, w_t = _geojson_extent(truth_polygons)
    h_p, w_p = _geojson_extent(pred_polygons)
    shape = (max(h_t, h_p), max(w_t, w_p))
    return rasterize_polygons(pred_polygons, shape, pred_ids), rasterize_polygons(truth_polygons, shape, truth_ids)


def instances_mpp(path: str | os.PathLike[str]) -> float | None:
    """Level-0 µm per pixel recorded in a wsiseg Zarr store (mean of x and y); None for other files."""
    path = Path(path)
    if instance_file_kind(path) != "zarr":
        return None
    _check_exists(path)
    mpp = (_open_store(path).attrs.get("source") or {}).get("mpp")
    if isinstance(mpp, (list, tuple)):
        values = [float(v) for v in mpp if v is not None]
        mpp = sum(values) / len(values) if values else None
    if mpp is None or not (math.isfinite(float(mpp)) and float(mpp) > 0):
        return None
    return float(mpp)
