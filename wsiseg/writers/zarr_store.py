"""The nuclei Zarr v3 store: a tile-sorted polygon table plus an OME-Zarr label pyramid.

Layout of ``<stem>.zarr`` (all coordinates level-0 px, OpenSlide frame, pixel edges)::

    zarr.json        attributes["wsiseg"]: provenance, "status" ("complete" is set last); consolidated
    objects/         N rows sorted tile-major by centroid (then by label_id);
                     attributes["wsiseg_objects"]: tile_size, n_tiles_x/y,
                     max_object_extent, measurements, classes, counts
      label_id     (N,)   uint32   1 + position of the nucleus in the written stream
                                   (the GeoJSON writer emits the same id)
      centroid     (N, 2) float64  x, y
      bbox         (N, 4) float64  xmin, ymin, xmax, ymax
      area         (N,)   float64  px^2 (level 0)
      class_id     (N,)   int16    -1 = unclassified
      touches_edge (N,)   bool
      <measurement> (N,)  float32  one array per measurement (score, iou, area_um2, ...)
      geom_offsets (N+1,) int64    polygon -> ring starts (GeoArrow)
      ring_offsets (R+1,) int64    ring -> coordinate starts (ring 0 of a polygon = exterior)
      coords       (M, 2) float64  x, y; rings closed (float64 keeps any input exactly)
      tile_offsets (T+1,) int64    rows of tile t = [tile_offsets[t], tile_offsets[t+1]),
                                   t = ty * n_tiles_x + tx from the centroid (clipped)
    labels/nuclei    OME-Zarr 0.5 uint32 label pyramid (see wsiseg.writers.labels)

Writing streams: `ZarrWriter.write` appends each batch to raw spool files inside ``<stem>.zarr.partial-<hex>``;
`close` sorts by tile (only N int64 keys in memory), gathers rows block by block from memory-mapped spools
(every table array created at once, and a block's pieces of all of them written at once, through zarr's
asyncio API), paints the label raster one shard at a time (in a second thread while the table is written),
marks the store complete and renames it onto the final name.
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import logging
import math
import os
import shutil
import uuid
import warnings
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import shapely
import zarr
import zarr.api.asynchronous
from zarr.core.sync import sync as zarr_sync

from wsiseg._version import __version__
from wsiseg.disk_space import names_full_disk
from wsiseg.models.protocols import NucleusClass
from wsiseg.nuclei import MEASUREMENTS, NucleusTable
from wsiseg.readers.base import SlideProperties
from wsiseg.writers.labels import (
    ShardCanvas,
    concat_ranges,
    create_label_pyramid,
    iter_shards,
    label_grid,
    rasterize_polygons,
    write_label_block,
)
from wsiseg.writers.report import jsonable
from wsiseg.writers.zarr_rows import RaggedRows
from wsiseg.writers.base import StreamingWriter

__all__ = ["NucleiStore", "NucleiStoreError", "ZarrWriter", "open_nuclei"]

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
ROW_CHUNK = 65_536  # rows per chunk of per-object arrays (and per write block)
ROW_SHARD = 16 * ROW_CHUNK
COORD_CHUNK = 131_072  # coordinate pairs per chunk (2 MiB float64)
COORD_SHARD = 8 * COORD_CHUNK  # 16 MiB: what a write buffers, whatever the slide size
_OBJECT_COLUMNS = {  # name -> (dtype, trailing shape)
    "centroid": ("f8", (2,)),
    "bbox": ("f8", (4,)),
    "area": ("f8", ()),
    "class_id": ("i2", ()),
    "touches_edge": ("?", ()),
}
_SPOOL_COLUMNS = {  # spooled per batch; "m.<name>" measurement columns are float32
    **_OBJECT_COLUMNS,
    **{k: ("i8", ()) for k in ("ring_start", "coord_start", "n_coords", "ring_len")},
    "n_rings": ("i4", ()),
    "coords": ("f8", (2,)),
}
_FRAME = {"space": "level0_pixels", "origin": "openslide_level0_top_left", "y_axis": "down", "pixel_convention": "edge"}
_RESERVED = set(_OBJECT_COLUMNS) | {"label_id", "geom_offsets", "ring_offsets", "coords", "tile_offsets"}


class NucleiStoreError(Exception):
    """A nuclei store cannot be used; the message names the store and the fix."""


class _Spool:
    """Append-only raw column files in a folder; `load` memory-maps them."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True)
        self._files: dict[str, Any] = {}
        self.rows: dict[str, int] = {}

    def append(self, name: str, values: np.ndarray) -> None:
        dtype, shape = _SPOOL_COLUMNS.get(name, ("f4", ()))
        arr = np.ascontiguousarray(values, dtype=dtype).reshape((-1, *shape))
        if name not in self._files:
            self._files[name] = open(self.folder / f"{name}.bin", "ab")  # noqa: SIM115 - closed by close()
            self.rows[name] = 0
        self._files[name].write(arr.tobytes())
        self.rows[name] += len(arr)

    def close(self) -> None:
        """Close every file, even when one's last flush fails (a full disk); then raise that error."""
        errors: list[OSError] = []
        for fh in self._files.values():
            try:
                fh.close()
            except OSError as exc:
                errors.append(exc)
        self._files.clear()
        if errors:
            raise errors[0]

    def load(self, name: str) -> np.ndarray:
        """The column as a read-only memmap (empty array when nothing was appended)."""
        dtype, shape = _SPOOL_COLUMNS.get(name, ("f4", ()))
        n = self.rows.get(name, 0)
        if n == 0:
            return np.zeros((0, *shape), dtype)
        return np.memmap(self.folder / f"{name}.bin", dtype=dtype, mode="r", shape=(n, *shape))


def _slide_info(
    slide: SlideProperties | Mapping[str, Any] | None, width: int | None, height: int | None
) -> dict[str, Any]:
    if slide is None:
        slide = {"width": width, "height": height}
    if isinstance(slide, SlideProperties):
        fields = ("path", "reader", "vendor", "mpp", "objective_power", "bounds_l0", "level_dimensions")
        info: dict[str, Any] = {f: getattr(slide, f) for f in fields}
        info["width"], info["height"] = slide.size_l0
    else:
        info = dict(slide)
        if info.get("width") is None or info.get("height") is None:
            raise ValueError("ZarrWriter slide: give SlideProperties or a mapping with level-0 'width' and 'height'")
    if int(info["width"]) < 1 or int(info["height"]) < 1:
        raise ValueError(f"ZarrWriter slide: width/height must be >= 1, got {info['width']} x {info['height']}")
    info["width"], info["height"] = int(info["width"]), int(info["height"])
    return jsonable(info)


class ZarrWriter(StreamingWriter):
    """Stream NucleusTables into a nuclei Zarr store (layout in the module docstring).

    path: final store folder (``<stem>.zarr``); the store is built under
    ``<path>.partial-<hex>`` and renamed at `close`; `abort` deletes it.
    slide: SlideProperties, or a mapping with level-0 ``width``/``height`` (+ any metadata);
    or give only `width` and `height` (level-0 px).
    classes: the model's classes.  provenance: tool/model/parameter info for the root
    attributes.  label_mpp: (mpp_x, mpp_y) of level 0 for the OME scale (default: the
    slide's mpp).  tile_size_l0: edge of the spatial-index tiles, level-0 px.
    overwrite: replace an existing store at `path` once the new one is complete (else
    refuse at construction).
    """

    @names_full_disk  # a full disk: one line naming it and its free space
    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        slide: SlideProperties | Mapping[str, Any] | None = None,
        width: int | None = None,
        height: int | None = None,
        classes: Sequence[NucleusClass] = (),
        provenance: Mapping[str, Any] | None = None,
        label_mpp: tuple[float, float] | None = None,
        write_labels: bool = True,
        tile_size_l0: int = 4096,
        overwrite: bool = True,
    ) -> None:
        self.path = Path(path)
        if self.path.exists() and not overwrite:
            raise FileExistsError(f"Zarr output {self.path} exists; delete it or pass overwrite=True (--overwrite)")
        if tile_size_l0 < 1:
            raise ValueError(f"ZarrWriter tile_size_l0 must be >= 1, got {tile_size_l0}")
        self.slide = _slide_info(slide, width, height)
        if label_mpp is None and self.slide.get("mpp"):
            label_mpp = (float(self.slide["mpp"][0]), float(self.slide["mpp"][1]))
        if write_labels and label_mpp is None:
            raise ValueError(
                f"Zarr output {self.path}: the label pyramid needs label_mpp (the slide has no mpp; use --mpp)"
            )
        self.label_mpp = None if label_mpp is None else (float(label_mpp[0]), float(label_mpp[1]))
        self.write_labels = write_labels
        self.tile_size_l0 = int(tile_size_l0)
        self.overwrite = overwrite
        self.classes = tuple(classes)
        self._provenance = {
            "format_version": FORMAT_VERSION,
            "tool": "wsiseg",
            "version": __version__,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "status": "writing",
            "source": self.slide,
            "coordinate_frame": _FRAME,
            "classes": [{"id": c.id, "name": c.name, "color": list(c.color)} for c in self.classes],
            **jsonable(dict(provenance or {})),
        }
        self.partial = self.path.with_name(f"{self.path.name}.partial-{uuid.uuid4().hex[:12]}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._root: Any = zarr.create_group(str(self.partial), zarr_format=3, attributes={"wsiseg": self._provenance})
            self._spool = _Spool(self.partial / "_spool")
        except BaseException:  # e.g. a full disk: leave nothing behind
            shutil.rmtree(self.partial, ignore_errors=True)
            raise
        self._measurements: tuple[str, ...] | None = None
        self._n = self._rings = self._coords = 0
        self._closed = False

    @names_full_disk  # a full disk: one line naming it and its free space
    def write(self, table: NucleusTable) -> None:
        """Append the nuclei of `table`; label ids continue from the previous batch."""
        if self._closed:
            raise RuntimeError(f"ZarrWriter for {self.path} is closed; create a new writer")
        names = tuple(table.measurements)
        if self._measurements is None:
            clash = sorted(set(names) & _RESERVED)
            if clash:
                raise ValueError(f"Zarr output {self.path}: measurement names {clash} clash with table columns")
            self._measurements = names
        elif set(names) != set(self._measurements):
            raise ValueError(
                f"Zarr output {self.path}: batch measurements {sorted(names)} differ from earlier "
                f"batches {sorted(self._measurements)}"
            )
        n = len(table)
        if n == 0:
            return
        sp = self._spool
        for name in _OBJECT_COLUMNS:
            attr = {"centroid": "centroid_l0", "bbox": "bbox_l0", "area": "area_px"}.get(name, name)
            sp.append(name, getattr(table, attr))
        for name in self._measurements:
            sp.append(f"m.{name}", table.measurements[name])
        starts = table.ring_offsets[table.geom_offsets]  # coordinate start of each polygon, + end
        sp.append("ring_start", table.geom_offsets[:-1] + self._rings)
        sp.append("n_rings", np.diff(table.geom_offsets))
        sp.append("coord_start", starts[:-1] + self._coords)
        sp.append("n_coords", np.diff(starts))
        sp.append("ring_len", np.diff(table.ring_offsets))
        sp.append("coords", table.coords)
        self._n += n
        self._rings += len(table.ring_offsets) - 1
        self._coords += len(table.coords)

    # -- finishing -------------------------------------------------------------------
    @names_full_disk  # a full disk: one line naming it and its free space
    def close(self, extra_attributes: Mapping[str, Any] | None = None) -> Path:
        """Sort, write the table and the label pyramid, mark complete, rename; returns the store path.

        extra_attributes: merged into the root provenance (e.g. timings, the run report).
        """
        if self._closed:
            raise RuntimeError(f"ZarrWriter for {self.path} is already closed")
        try:
            self._spool.close()
            if self._measurements is None:
                self._measurements = MEASUREMENTS
            self._sort()
            levels = self._create_labels() if self.write_labels else None
            # the label raster is painted in a second thread while the table is written: its
            # kernel and zarr's codecs release the GIL, and the run's other core is free by now
            with ThreadPoolExecutor(1, thread_name_prefix="wsiseg-labels") as pool:
                painting = pool.submit(self._write_labels, levels) if levels is not None else None
                counts = self._write_objects()
                if painting is not None:
                    painting.result()
            shutil.rmtree(self._spool.folder)
            self._provenance.update(jsonable(dict(extra_attributes or {})))
            self._provenance["counts"] = {**self._provenance.get("counts", {}), **counts}
            self._provenance["status"] = "complete"
            self._root.attrs["wsiseg"] = self._provenance
            with warnings.catch_warnings():  # consolidated metadata is a deliberate, documented choice
                warnings.filterwarnings("ignore", "Consolidated metadata", category=UserWarning)
                zarr.consolidate_metadata(str(self.partial))
            self._publish()
        except BaseException:
            self.abort()
            raise
        self._closed = True
        logger.info("wrote %d nuclei to %s", self._n, self.path)
        return self.path

    def abort(self) -> None:
        """Discard the partial store; nothing remains under the final or the temporary name."""
        self._closed = True
        try:
            self._spool.close()
        except OSError:  # e.g. the disk is full: the files are discarded anyway
            pass
        shutil.rmtree(self.partial, ignore_errors=True)

    def _publish(self) -> None:
        if self.path.exists():
            if not self.overwrite:
                raise FileExistsError(f"Zarr output {self.path} appeared while writing; delete it and rerun")
            old = self.path.with_name(f"{self.path.name}.old-{uuid.uuid4().hex[:12]}")
            os.rename(self.path, old)
            os.rename(self.partial, self.path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(self.partial, self.path)

    def _grid(self) -> tuple[int, int]:
        ts = self.tile_size_l0
        return max(1, -(-self.slide["width"] // ts)), max(1, -(-self.slide["height"] // ts))

    def _tile_keys(self, centroid: np.ndarray) -> np.ndarray:
        n_tx, n_ty = self._grid()
        c = np.nan_to_num(np.asarray(centroid, np.float64))
        tx = np.clip(np.floor(c[:, 0] / self.tile_size_l0), 0, n_tx - 1).astype(np.int64)
        ty = np.clip(np.floor(c[:, 1] / self.tile_size_l0), 0, n_ty - 1).astype(np.int64)
        return ty * n_tx + tx

    async def _array(self, group: Any, name: str, shape: tuple[int, ...], dtype: str, chunk: int, shard: int) -> Any:
        rows = shape[0]
        chunk_rows = max(1, min(chunk, rows))
        shard_rows = chunk_rows * max(1, min(shard // chunk, -(-rows // chunk_rows)))
        tail = shape[1:]
        return await group.create_array(
            name, shape=shape, dtype=dtype, chunks=(chunk_rows, *tail), shards=(shard_rows, *tail)
        )

    def _sort(self) -> None:
        """The tile-major row order, the rows of every tile and the largest object extent."""
        sp, n = self._spool, self._n
        centroid, bbox = sp.load("centroid"), sp.load("bbox")
        keys = np.concatenate(
            [self._tile_keys(centroid[s : s + ROW_CHUNK]) for s in range(0, n, ROW_CHUNK)] or [np.zeros(0, np.int64)]
        )
        n_tx, n_ty = self._grid()
        tile_offsets = np.zeros(n_tx * n_ty + 1, np.int64)
        np.cumsum(np.bincount(keys, minlength=n_tx * n_ty), out=tile_offsets[1:])
        order = np.argsort(keys, kind="stable")
        del keys
        self._order = order
        extent = 0.0
        for s in range(0, n, ROW_CHUNK):
            b, c = bbox[s : s + ROW_CHUNK], centroid[s : s + ROW_CHUNK]
            size = np.concatenate([b[:, 2:] - b[:, :2], b[:, 2:] - c, c - b[:, :2]], axis=1)
            extent = max(extent, float(np.nanmax(size)) if len(size) else 0.0)
        self._extent = extent
        self._tile_offsets = tile_offsets

    def _write_objects(self) -> dict[str, int]:
        """The object table, every array of it created at once and written block by block, the
        blocks' pieces at once (zarr's asyncio API: the store and the codecs overlap their work).
        Runs the coroutine on zarr's own event loop thread, as zarr's synchronous API does."""
        return cast(dict[str, int], zarr_sync(self._write_objects_async()))

    async def _write_objects_async(self) -> dict[str, int]:
        sp, n, order = self._spool, self._n, self._order
        n_tx, n_ty = self._grid()
        root = await zarr.api.asynchronous.open_group(store=str(self.partial), mode="r+")
        objects = await root.create_group("objects")
        columns: list[tuple[str, np.ndarray | None, str, tuple[int, ...]]] = [("label_id", None, "u4", ())]
        columns += [(k, sp.load(k), dt, shp) for k, (dt, shp) in _OBJECT_COLUMNS.items()]
        columns += [(m, sp.load(f"m.{m}"), "f4", ()) for m in self._measurements or ()]
        tile_offsets = self._tile_offsets
        specs = [(name, (n, *shape), dtype, ROW_CHUNK, ROW_SHARD) for name, _, dtype, shape in columns]
        specs += [
            ("geom_offsets", (n + 1,), "i8", ROW_CHUNK, ROW_SHARD),
            ("ring_offsets", (self._rings + 1,), "i8", ROW_CHUNK, ROW_SHARD),
            ("coords", (self._coords, 2), "f8", COORD_CHUNK, COORD_SHARD),
        ]
        arrays = await asyncio.gather(
            *(self._array(objects, *spec) for spec in specs),
            objects.create_array("tile_offsets", shape=tile_offsets.shape, dtype="i8", chunks=tile_offsets.shape),
        )
        tiles = arrays.pop()
        geom, rings, xy = arrays[len(columns) :]
        ragged = RaggedRows(
            n, self._ragged_spool()[:5], lambda: self._spool.load("coords"), geom, rings, xy,
            ring_chunk=ROW_CHUNK, coord_chunk=COORD_CHUNK,
        )
        for s in range(0, n, ROW_CHUNK):
            idx = order[s : s + ROW_CHUNK]
            writes = [
                arr.setitem(slice(s, s + len(idx)), (idx + 1).astype(np.uint32) if source is None else source[idx])
                for arr, (_, source, _, _) in zip(arrays, columns)
            ]
            await asyncio.gather(*writes, *ragged.block(s, idx))
        await asyncio.gather(*ragged.finish(), tiles.setitem(slice(None), tile_offsets))
        await objects.update_attributes({"wsiseg_objects": {
            "count": n, "n_rings": self._rings, "n_coords": self._coords, "tile_size": self.tile_size_l0,
            "n_tiles_x": n_tx, "n_tiles_y": n_ty, "max_object_extent": self._extent,
            "sort": "tile-major by centroid (t = ty * n_tiles_x + tx), then label_id",
            "measurements": list(self._measurements or ()), "classes": self._provenance["classes"],
            "coords": "level-0 px, pixel-edge frame, closed rings, exterior first",
        }})
        return {"nuclei": n, "rings": self._rings, "coords": self._coords}

    def _ragged_spool(self) -> tuple[np.ndarray, ...]:
        """Memmaps of ring_start, n_rings, coord_start, n_coords, ring_len, coords (input row order)."""
        return tuple(
            self._spool.load(k) for k in ("ring_start", "n_rings", "coord_start", "n_coords", "ring_len", "coords")
        )

    def _create_labels(self) -> list[Any]:
        """The empty label pyramid's level arrays."""
        assert self.label_mpp is not None
        labels = self._root.create_group("labels", attributes={"ome": {"version": "0.5", "labels": ["nuclei"]}})
        return create_label_pyramid(labels, "nuclei", (self.slide["height"], self.slide["width"]), self.label_mpp)

    def _write_labels(self, levels: Sequence[Any]) -> None:
        """Paint level 0 one shard at a time (at most 16384 polygons per pass) and subsample it into every level."""
        shape = (self.slide["height"], self.slide["width"])
        bbox = self._spool.load("bbox")
        ring_start, n_rings, coord_start, n_coords, ring_len, _ = self._ragged_spool()
        tile_offsets = self._tile_offsets
        n_tx, n_ty = self._grid()
        shard = label_grid(shape)[1]
        canvases = ShardCanvas(shard * shard)
        for y0, y1, x0, x1 in iter_shards(shape, shard):
            box = (x0, y0, x1, y1)
            runs = _row_runs(tile_offsets, n_tx, n_ty, self.tile_size_l0, self._extent, box)
            objs = self._order[concat_ranges(runs[:, 0], runs[:, 1] - runs[:, 0])]
            b = bbox[objs]
            objs = objs[(b[:, 2] > x0) & (b[:, 0] < x1) & (b[:, 3] > y0) & (b[:, 1] < y1)]
            if len(objs) == 0:
                continue
            canvas = canvases.take(y1 - y0, x1 - x0)
            coords = self._spool.load("coords")  # re-mapped per shard, so RSS stays flat
            for part in np.array_split(objs, -(-len(objs) // 16384)):  # pixels keep the max label: any order
                nr = n_rings[part].astype(np.int64)
                lens = ring_len[concat_ranges(ring_start[part], nr)]
                xy = coords[concat_ranges(coord_start[part], n_coords[part])]
                offsets = np.concatenate([[0], np.cumsum(lens)]), np.concatenate([[0], np.cumsum(nr)])
                rasterize_polygons(canvas, xy, *offsets, part + 1, (x0, y0))
            del coords
            write_label_block(levels, canvas, y0, x0)


def _row_runs(
    tile_offsets: np.ndarray, n_tx: int, n_ty: int, tile: int, extent: float, box: tuple[float, float, float, float]
) -> np.ndarray:
    """(k, 2) int64 [start, stop) row ranges, one per tile row, that can hold nuclei touching `box`.

    A nucleus touching the box has its centroid within `extent` of it, so only tiles
    overlapping the box grown by `extent` are visited (centroid tiles are clipped to the grid).
    """
    x0, y0, x1, y1 = box
    tx0, tx1 = (int(np.clip(math.floor(v / tile), 0, n_tx - 1)) for v in (x0 - extent, x1 + extent))
    ty0, ty1 = (int(np.clip(math.floor(v / tile), 0, n_ty - 1)) for v in (y0 - extent, y1 + extent))
    rows = np.arange(ty0, ty1 + 1) * n_tx
    runs = np.stack([tile_offsets[rows + tx0], tile_offsets[rows + tx1 + 1]], axis=1).astype(np.int64)
    return runs[runs[:, 1] > runs[:, 0]]


# -- reading -------------------------------------------------------------------------------
def open_nuclei(path: str | os.PathLike[str]) -> NucleiStore:
    """Open a finished nuclei store; refuses stores whose write did not complete."""
    return NucleiStore(path)


class NucleiStore:
    """Read access to a nuclei store (store row order); attrs = root provenance, objects_attrs = table metadata."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        try:
            self._root: Any = cast(Any, zarr.open_group(str(self.path), mode="r"))
        except (FileNotFoundError, zarr.errors.GroupNotFoundError) as err:
            raise NucleiStoreError(f"{self.path} is not a Zarr store ({err}); check the path") from None
        self.attrs: dict[str, Any] = dict(self._root.attrs.get("wsiseg", {}))
        status = self.attrs.get("status")
        if status != "complete":
            why = "is not a wsiseg nuclei store" if not self.attrs else f"is incomplete (status {status!r})"
            raise NucleiStoreError(f"{self.path} {why}: its write did not finish; rerun wsiseg for this slide")
        self._objects: Any = self._root["objects"]
        self.objects_attrs: dict[str, Any] = dict(self._objects.attrs["wsiseg_objects"])
        self.count = int(self.objects_attrs["count"])
        self.measurement_names: tuple[str, ...] = tuple(self.objects_attrs["measurements"])
        self._tile_offsets = np.asarray(self._objects["tile_offsets"][:])

    def __len__(self) -> int:
        return self.count

    def column(self, name: str) -> np.ndarray:
        """One per-object array in store row order (e.g. "centroid", "class_id", "area")."""
        return np.asarray(self._objects[name][:])

    @property
    def classes(self) -> list[NucleusClass]:
        return [NucleusClass(c["id"], c["name"], tuple(c["color"])) for c in self.attrs.get("classes", [])]

    def labels(self, level: int = 0) -> Any:
        """Level `level` of the label pyramid as a zarr array (uint32, (H, W))."""
        if "labels" not in self._root:
            raise NucleiStoreError(f"{self.path} has no label raster (written with write_labels=False)")
        return self._root[f"labels/nuclei/{level}"]

    def _read_run(self, start: int, stop: int) -> NucleusTable:
        obj = self._objects
        geom = np.asarray(obj["geom_offsets"][start : stop + 1])
        ring = np.asarray(obj["ring_offsets"][geom[0] : geom[-1] + 1])
        return NucleusTable(
            coords=np.asarray(obj["coords"][ring[0] : ring[-1]]),
            ring_offsets=ring - ring[0],
            geom_offsets=geom - geom[0],
            centroid_l0=obj["centroid"][start:stop],
            bbox_l0=obj["bbox"][start:stop],
            class_id=obj["class_id"][start:stop],
            area_px=obj["area"][start:stop],
            measurements={m: np.asarray(obj[m][start:stop]) for m in self.measurement_names},
            touches_edge=obj["touches_edge"][start:stop],
        )

    def label_ids(self, rows: np.ndarray | None = None) -> np.ndarray:
        """label_id of `rows` (all rows when None), uint32."""
        ids = np.asarray(self._objects["label_id"][:])
        return ids if rows is None else ids[np.asarray(rows, np.int64)]

    def table(self, rows: np.ndarray | Sequence[int] | None = None) -> NucleusTable:
        """Rows `rows` (store order; all rows when None) as a NucleusTable with the stored values.

        Nearby rows are read as one span (gaps up to 4096 rows), so scattered rows cost few reads.
        """
        if rows is None:
            return self._read_run(0, self.count)
        rows = np.asarray(rows, np.int64).reshape(-1)
        if len(rows) and (rows.min() < 0 or rows.max() >= self.count):
            raise IndexError(f"{self.path}: rows must be in [0, {self.count}), got {rows.min()}..{rows.max()}")
        uniq = np.unique(rows)
        if len(uniq) == 0:
            return self._read_run(0, 0)
        cuts = np.flatnonzero(np.diff(uniq) > 4096) + 1
        starts, stops = uniq[np.r_[0, cuts]], uniq[np.r_[cuts - 1, len(uniq) - 1]] + 1
        merged = NucleusTable.concat([self._read_run(int(a), int(b)) for a, b in zip(starts, stops)])
        span = np.searchsorted(starts, uniq, side="right") - 1
        position = uniq - starts[span] + np.r_[0, np.cumsum(stops - starts)][span]
        return _take_rows(merged, position[np.searchsorted(uniq, rows)])

    def query(self, x0: float, y0: float, x1: float, y1: float) -> NucleusTable:
        """The nuclei whose polygon intersects the closed box [x0, x1] x [y0, y1] (level-0 px).

        Uses the tile index (tiles within max_object_extent of the box), then the bounding
        boxes, then an exact shapely test.  Rows come back in store order.
        """
        return self._query(x0, y0, x1, y1)[1]

    def query_rows(self, x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
        """Store rows of the nuclei `query` returns, ascending."""
        return self._query(x0, y0, x1, y1)[0]

    def _query(self, x0: float, y0: float, x1: float, y1: float) -> tuple[np.ndarray, NucleusTable]:
        if not (x0 <= x1 and y0 <= y1):
            raise ValueError(f"query box needs x0 <= x1 and y0 <= y1, got ({x0}, {y0}, {x1}, {y1})")
        a = self.objects_attrs
        box = (x0, y0, x1, y1)
        near = []
        for start, stop in _row_runs(
            self._tile_offsets, a["n_tiles_x"], a["n_tiles_y"], a["tile_size"], a["max_object_extent"], box
        ).tolist():
            b = np.asarray(self._objects["bbox"][start:stop])
            near.append(start + np.flatnonzero((b[:, 2] >= x0) & (b[:, 0] <= x1) & (b[:, 3] >= y0) & (b[:, 1] <= y1)))
        rows = np.concatenate(near) if near else np.zeros(0, np.int64)
        table = self.table(rows)
        hit = np.flatnonzero(shapely.intersects(table.polygons(), shapely.box(*box))) if len(rows) else rows
        return rows[hit], _take_rows(table, hit)


def _take_rows(table: NucleusTable, index: np.ndarray) -> NucleusTable:
    """Rows `index` of `table`, keeping every stored value (no geometry recomputation)."""
    index = np.asarray(index, np.int64)
    go, ro = table.geom_offsets, table.ring_offsets
    n_rings = go[index + 1] - go[index]
    ring_idx = concat_ranges(go[index], n_rings)
    ring_len = ro[ring_idx + 1] - ro[ring_idx]
    coord_idx = concat_ranges(ro[ring_idx], ring_len)
    return NucleusTable(
        coords=table.coords[coord_idx],
        ring_offsets=np.concatenate([[0], np.cumsum(ring_len)]),
        geom_offsets=np.concatenate([[0], np.cumsum(n_rings)]),
        centroid_l0=table.centroid_l0[index],
        bbox_l0=table.bbox_l0[index],
        class_id=table.class_id[index],
        area_px=table.area_px[index],
        measurements={k: v[index] for k, v in table.measurements.items()},
        touches_edge=table.touches_edge[index],
    )
