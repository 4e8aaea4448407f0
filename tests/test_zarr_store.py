"""Nuclei Zarr store: round trip, tile-sorted table and region queries, label pyramid, atomicity."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import shapely

from wsiseg.models.protocols import NucleusClass
from wsiseg.nuclei import MEASUREMENTS, NucleusTable
from wsiseg.readers.base import SlideProperties
from wsiseg.writers.labels import pyramid_shapes, rasterize_polygons
from wsiseg.writers.zarr_store import NucleiStoreError, ZarrWriter, open_nuclei

CLASSES = (NucleusClass(0, "Neoplastic", (255, 0, 0)), NucleusClass(1, "Immune", (0, 128, 255)))
SLIDE = {"width": 1200, "height": 900, "vendor": "synthetic"}


def make_table(polygons: Any, class_id: Any = None, seed: int = 0) -> NucleusTable:
    n = len(polygons)
    rng = np.random.default_rng(seed)
    cid = rng.integers(-1, 2, n) if class_id is None else class_id
    meas = {m: rng.uniform(0, 10, n).astype(np.float32) for m in MEASUREMENTS}
    return NucleusTable.from_polygons(polygons, cid, meas, touches_edge=rng.random(n) < 0.1)


def blob_polygons(n: int, width: int, height: int, seed: int = 0, max_size: int = 14) -> np.ndarray:
    """n edge-traced (integer-vertex) polygons: boxes, L shapes and boxes with a hole, maybe overlapping."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, width - max_size, n)
    y = rng.integers(0, height - max_size, n)
    w, h = rng.integers(4, max_size, n), rng.integers(4, max_size, n)
    polys = []
    for i in range(n):
        x0, y0, x1, y1 = int(x[i]), int(y[i]), int(x[i] + w[i]), int(y[i] + h[i])
        if i % 5 == 1:
            polys.append(shapely.Polygon([(x0, y0), (x1, y0), (x1, y0 + 2), (x0 + 2, y0 + 2), (x0 + 2, y1), (x0, y1)]))
        elif i % 5 == 2:
            polys.append(
                shapely.Polygon(
                    shapely.box(x0, y0, x0 + 6, y0 + 6).exterior, [shapely.box(x0 + 2, y0 + 2, x0 + 4, y0 + 4).exterior]
                )
            )
        else:
            polys.append(shapely.box(x0, y0, x1, y1))
    return np.array(polys, dtype=object)


def write_store(path: Path, tables: list[NucleusTable], **options: Any) -> Path:
    options = {"slide": SLIDE, "classes": CLASSES, "label_mpp": (0.25, 0.25), **options}
    writer = ZarrWriter(path, **options)
    for t in tables:
        writer.write(t)
    return writer.close()


def batches(table: NucleusTable, size: int) -> list[NucleusTable]:
    return [table.take(np.arange(s, min(len(table), s + size))) for s in range(0, len(table), size)]


def test_table_round_trips_exactly_including_holes(tmp_path: Path) -> None:
    table = make_table(blob_polygons(300, 1200, 900))
    store = open_nuclei(write_store(tmp_path / "s.zarr", batches(table, 70), tile_size_l0=256))
    assert store.count == 300 and len(store) == 300
    got = store.table()
    order = np.argsort(store.label_ids())
    assert np.array_equal(store.label_ids()[order], np.arange(1, 301))
    assert shapely.equals_exact(got.polygons()[order], table.polygons(), 0).all()
    for name in ("centroid_l0", "bbox_l0", "class_id", "area_px", "touches_edge"):
        assert np.array_equal(getattr(got, name)[order], getattr(table, name)), name
    for m in MEASUREMENTS:
        assert np.array_equal(got.measurements[m][order], table.measurements[m])
    assert (np.diff(got.geom_offsets) > 1).sum() == (np.diff(table.geom_offsets) > 1).sum() > 0
    assert [c.name for c in store.classes] == ["Neoplastic", "Immune"]


def test_a_table_written_in_many_blocks_equals_one_written_in_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import wsiseg.writers.zarr_store as zarr_store

    table = make_table(blob_polygons(300, 1200, 900))
    one = open_nuclei(write_store(tmp_path / "one.zarr", batches(table, 70), tile_size_l0=256)).table()
    # blocks of 32 rows and 100 coordinates: several writes per shard, the rings' ends cut anywhere
    for name, value in (("ROW_CHUNK", 32), ("ROW_SHARD", 64), ("COORD_CHUNK", 100), ("COORD_SHARD", 300)):
        monkeypatch.setattr(zarr_store, name, value)
    many = open_nuclei(write_store(tmp_path / "many.zarr", batches(table, 70), tile_size_l0=256)).table()
    for name in ("coords", "ring_offsets", "geom_offsets", "centroid_l0", "bbox_l0", "class_id", "area_px"):
        assert np.array_equal(getattr(many, name), getattr(one, name)), name
    for m in MEASUREMENTS:
        assert np.array_equal(many.measurements[m], one.measurements[m]), m


def test_rows_are_tile_major_and_the_tile_index_points_at_them(tmp_path: Path) -> None:
    table = make_table(blob_polygons(400, 1200, 900, seed=1))
    store = open_nuclei(write_store(tmp_path / "s.zarr", batches(table, 150), tile_size_l0=256))
    a = store.objects_attrs
    assert (a["n_tiles_x"], a["n_tiles_y"], a["tile_size"]) == (5, 4, 256)
    got = store.table()
    tile = (got.centroid_l0[:, 1] // 256) * 5 + got.centroid_l0[:, 0] // 256
    offsets = np.asarray(store._objects["tile_offsets"][:])
    assert len(offsets) == 21 and offsets[-1] == 400
    for t in range(20):
        rows = slice(offsets[t], offsets[t + 1])
        assert (tile[rows] == t).all()
        assert (np.diff(store.label_ids()[rows].astype(np.int64)) > 0).all()


def test_region_query_returns_exactly_the_intersecting_nuclei(tmp_path: Path) -> None:
    # Long nuclei (up to 120 px) on 64 px tiles: the query must look beyond neighbouring tiles.
    polys = list(blob_polygons(250, 1200, 900, seed=2))
    polys += [shapely.box(100 + 37 * i, 50 + 29 * i, 220 + 37 * i, 54 + 29 * i) for i in range(10)]
    table = make_table(polys)
    store = open_nuclei(write_store(tmp_path / "s.zarr", [table], tile_size_l0=64))
    assert store.objects_attrs["max_object_extent"] >= 120
    truth_polys = table.polygons()
    rng = np.random.default_rng(5)
    boxes = [(0, 0, 1200, 900), (300, 300, 300, 300), (1190, 890, 1500, 1000), (-50, -50, -10, -10), (150, 60, 160, 70)]
    for _ in range(25):
        (x0, x1), (y0, y1) = np.sort(rng.uniform(-20, 1220, 2)), np.sort(rng.uniform(-20, 920, 2))
        boxes.append((x0, y0, x1, y1))
    for x0, y0, x1, y1 in boxes:
        expected = np.flatnonzero(shapely.intersects(truth_polys, shapely.box(x0, y0, x1, y1))) + 1
        result = store.query(x0, y0, x1, y1)
        ids = store.label_ids(store.query_rows(x0, y0, x1, y1))
        assert sorted(ids.tolist()) == expected.tolist(), (x0, y0, x1, y1)
        assert shapely.equals_exact(result.polygons(), truth_polys[ids - 1], 0).all()
    with pytest.raises(ValueError, match="x0 <= x1"):
        store.query(10, 0, 5, 5)


def test_label_pixels_equal_polygon_areas_for_edge_traced_polygons(tmp_path: Path) -> None:
    # Non-overlapping nuclei on a grid, some with holes and some crossing shard borders.
    polys = []
    for i in range(12 * 9):
        x, y = 100 * (i % 12) + 37, 100 * (i // 12) + 41
        polys.append(
            blob_polygons(1, 60, 60, seed=i, max_size=40)[0] if i % 4 else shapely.box(x - 30, y - 30, x + 30, y + 20)
        )
        if i % 4:
            polys[-1] = shapely.affinity.translate(polys[-1], x, y)
    table = make_table(polys)
    store = open_nuclei(write_store(tmp_path / "s.zarr", batches(table, 50), tile_size_l0=128))
    labels = np.asarray(store.labels(0)[:])
    assert labels.shape == (900, 1200) and labels.dtype == np.uint32
    counts = np.bincount(labels.ravel(), minlength=len(polys) + 1)
    assert np.array_equal(counts[1:], table.area_px.astype(np.int64))
    assert counts[0] == labels.size - table.area_px.sum()


def test_overlapping_nuclei_higher_label_wins(tmp_path: Path) -> None:
    table = make_table([shapely.box(10, 10, 30, 30), shapely.box(20, 20, 40, 40)])
    labels = np.asarray(open_nuclei(write_store(tmp_path / "s.zarr", [table])).labels(0)[:])
    assert labels[25, 25] == 2 and labels[15, 15] == 1 and labels[35, 35] == 2
    assert (labels == 1).sum() == 400 - 100 and (labels == 2).sum() == 400


def test_label_pyramid_levels_and_ome_metadata(tmp_path: Path) -> None:
    slide = {"width": 5000, "height": 300}
    table = make_table(blob_polygons(200, 5000, 300, seed=3))
    path = write_store(tmp_path / "s.zarr", [table], slide=slide, label_mpp=(0.25, 0.3))
    assert pyramid_shapes((300, 5000)) == [(300, 5000), (150, 2500), (75, 1250)]
    store = open_nuclei(path)
    level0 = np.asarray(store.labels(0)[:])
    for k, shape in enumerate([(300, 5000), (150, 2500), (75, 1250)]):
        level = store.labels(k)
        assert level.shape == shape and level.metadata.dimension_names == ("y", "x")
        assert np.array_equal(level[:], level0[:: 2**k, :: 2**k])
    ome = json.loads((path / "labels" / "nuclei" / "zarr.json").read_text())["attributes"]["ome"]
    assert ome["version"] == "0.5" and ome["image-label"]["version"] == "0.5"
    (ms,) = ome["multiscales"]
    assert [a["name"] for a in ms["axes"]] == ["y", "x"]
    scales = [d["coordinateTransformations"][0]["scale"] for d in ms["datasets"]]
    assert scales == [[0.3, 0.25], [0.6, 0.5], [1.2, 1.0]]
    assert json.loads((path / "labels" / "zarr.json").read_text())["attributes"]["ome"]["labels"] == ["nuclei"]


def test_rasterizer_matches_pixel_centre_containment() -> None:
    rng = np.random.default_rng(4)
    polys = []
    for _ in range(40):
        g = shapely.make_valid(shapely.Polygon(rng.uniform(-5, 45, (7, 2))))
        parts = [p for p in shapely.get_parts(g) if isinstance(p, shapely.Polygon) and p.area > 0]
        polys.append(max(parts, key=lambda p: p.area) if parts else shapely.box(1, 1, 3, 3))
    polys.append(shapely.box(0, 0, 20, 20).difference(shapely.box(5.3, 5.3, 9.7, 14.2)))
    for i, poly in enumerate(polys):
        _, coords, (ring_offsets, geom_offsets) = shapely.to_ragged_array([poly])
        canvas = np.zeros((30, 35), np.uint32)
        rasterize_polygons(canvas, coords, ring_offsets, geom_offsets, np.array([9]), origin_xy=(3, 2))
        jj, ii = np.meshgrid(np.arange(35), np.arange(30))
        assert np.array_equal(canvas == 9, shapely.contains_xy(poly, jj + 3.5, ii + 2.5)), i


def test_overlapping_polygons_leave_each_pixel_the_largest_label_containing_its_centre() -> None:
    rng = np.random.default_rng(7)
    polys = []
    for _ in range(60):
        x0, y0 = rng.uniform(-3, 28, 2)
        polys.append(shapely.box(x0, y0, x0 + rng.uniform(1, 9), y0 + rng.uniform(1, 9)))
    labels = rng.permutation(len(polys)).astype(np.uint32) + 5
    _, coords, (ring_offsets, geom_offsets) = shapely.to_ragged_array(polys)
    canvas = np.zeros((30, 32), np.uint32)
    canvas[0, :] = 3  # painted pixels only ever grow
    rasterize_polygons(canvas, coords, ring_offsets, geom_offsets, labels)
    jj, ii = np.meshgrid(np.arange(32), np.arange(30))
    expected = np.zeros((30, 32), np.uint32)
    expected[0, :] = 3
    for poly, label in zip(polys, labels):
        inside = shapely.contains_xy(poly, jj + 0.5, ii + 0.5)
        expected[inside] = np.maximum(expected[inside], label)
    assert np.array_equal(canvas, expected)
    assert len(np.unique(canvas)) > 20


def test_provenance_status_and_consolidated_metadata(tmp_path: Path) -> None:
    props = SlideProperties(Path("/data/s.svs"), "tiffslide", "aperio", ((1200, 900),), (1.0,), (0.5, 0.5), 20.0, None)
    path = write_store(tmp_path / "s.zarr", [make_table(blob_polygons(20, 1200, 900))], slide=props,
                       label_mpp=None, provenance={"model": {"name": "m", "sha256": "ab"}})  # fmt: skip
    root = json.loads((path / "zarr.json").read_text())
    attrs = root["attributes"]["wsiseg"]
    assert attrs["status"] == "complete" and attrs["model"]["name"] == "m"
    assert attrs["source"]["width"] == 1200 and attrs["source"]["mpp"] == [0.5, 0.5]
    assert attrs["counts"]["nuclei"] == 20
    assert "objects/coords" in root["consolidated_metadata"]["metadata"]
    scale = open_nuclei(path).labels(0).attrs  # level arrays carry no OME metadata themselves
    assert dict(scale) == {}
    assert not any(p.name.startswith("_spool") for p in path.iterdir())


def test_empty_store_is_valid(tmp_path: Path) -> None:
    store = open_nuclei(write_store(tmp_path / "s.zarr", [NucleusTable.empty()]))
    assert store.count == 0 and len(store.table()) == 0 and len(store.query(0, 0, 100, 100)) == 0
    assert not np.asarray(store.labels(0)[:]).any()


def test_interrupted_writes_are_never_complete_or_under_the_final_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    table = make_table(blob_polygons(50, 1200, 900))
    final = tmp_path / "s.zarr"
    # Killed before close: only the partial folder exists, and it is refused.
    writer = ZarrWriter(final, slide=SLIDE, label_mpp=(0.25, 0.25))
    writer.write(table)
    assert not final.exists()
    (partial,) = tmp_path.glob("s.zarr.partial-*")
    with pytest.raises(NucleiStoreError, match="incomplete"):
        open_nuclei(partial)
    writer.abort()
    assert list(tmp_path.iterdir()) == []
    # An exception inside the writer's context, and a failure inside close().
    with pytest.raises(RuntimeError, match="boom"):
        with ZarrWriter(final, slide=SLIDE, label_mpp=(0.25, 0.25)) as w:
            w.write(table)
            raise RuntimeError("boom")
    writer = ZarrWriter(final, slide=SLIDE, label_mpp=(0.25, 0.25))
    writer.write(table)
    monkeypatch.setattr(ZarrWriter, "_write_labels", lambda self, *a: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        writer.close()
    assert list(tmp_path.iterdir()) == []
    # The table failing while the label raster is painted in its thread: that thread is waited
    # for before the partial store is deleted, so nothing is left behind.
    monkeypatch.undo()
    writer = ZarrWriter(final, slide=SLIDE, label_mpp=(0.25, 0.25))
    writer.write(table)
    monkeypatch.setattr(ZarrWriter, "_write_objects", lambda self: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        writer.close()
    assert list(tmp_path.iterdir()) == []


def test_existing_store_is_replaced_only_when_allowed(tmp_path: Path) -> None:
    path = write_store(tmp_path / "s.zarr", [make_table(blob_polygons(5, 1200, 900))])
    with pytest.raises(FileExistsError, match="overwrite"):
        ZarrWriter(path, slide=SLIDE, label_mpp=(0.25, 0.25), overwrite=False)
    write_store(path, [make_table(blob_polygons(7, 1200, 900))])
    assert open_nuclei(path).count == 7 and sorted(p.name for p in tmp_path.iterdir()) == ["s.zarr"]


def test_bad_input_is_refused_with_a_clear_message(tmp_path: Path) -> None:
    with pytest.raises(NucleiStoreError, match="not a Zarr store"):
        open_nuclei(tmp_path / "missing.zarr")
    with pytest.raises(ValueError, match="--mpp"):
        ZarrWriter(tmp_path / "a.zarr", slide=SLIDE)
    with pytest.raises(ValueError, match="width"):
        ZarrWriter(tmp_path / "a.zarr", slide={"height": 5}, write_labels=False)
    writer = ZarrWriter(tmp_path / "a.zarr", width=100, height=100, write_labels=False)
    table = make_table(blob_polygons(3, 100, 100))
    writer.write(table)
    table.measurements.pop("iou")
    with pytest.raises(ValueError, match="differ from earlier"):
        writer.write(table)
    writer.abort()


def _tiny_nuclei(start: int, stop: int) -> NucleusTable:
    """Nuclei start..stop-1 of a stream of 2x2-px squares on a 4-px grid (500 per row), as ragged arrays."""
    i = np.arange(start, stop)
    n = len(i)
    x, y = 4.0 * (i % 500), 4.0 * (i // 500)
    corners = np.array([[0, 0], [2, 0], [2, 2], [0, 2], [0, 0]], float)
    coords = (np.stack([x, y], 1)[:, None, :] + corners).reshape(-1, 2)
    rng = np.random.default_rng(start)
    return NucleusTable(
        coords, np.arange(n + 1) * 5, np.arange(n + 1), np.stack([x + 1, y + 1], 1), np.stack([x, y, x + 2, y + 2], 1),
        rng.integers(-1, 2, n), np.full(n, 4.0), {m: rng.random(n).astype(np.float32) for m in MEASUREMENTS},
    )  # fmt: skip


def _peak_bytes(path: Path, n: int, batch: int = 25_000) -> int:
    tracemalloc.start()
    writer = ZarrWriter(path, width=2000, height=1600, label_mpp=(0.5, 0.5), tile_size_l0=512)
    for s in range(0, n, batch):
        writer.write(_tiny_nuclei(s, min(n, s + batch)))
    writer.close()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak


def test_streaming_write_memory_is_roughly_flat_in_nuclei_count(tmp_path: Path) -> None:
    # The peak depends on how the label-painting thread overlaps the table writes (about 19 or 40 MB
    # for 50k nuclei, from run to run), so each size runs twice: the smaller peak of 4x the nuclei
    # must stay under twice the larger peak of the small run (memory in proportion to the nuclei
    # would put it near 4x).
    small = max(_peak_bytes(tmp_path / f"small-{i}.zarr", 50_000) for i in range(2))
    large = min(_peak_bytes(tmp_path / f"large-{i}.zarr", 200_000) for i in range(2))
    assert large < 2 * small
    store = open_nuclei(tmp_path / "large-1.zarr")
    assert store.count == 200_000
    assert int((np.asarray(store.labels(0)[:]) > 0).sum()) == 4 * 200_000


def test_a_reused_shard_canvas_is_zero_whatever_the_last_shard_painted() -> None:
    from wsiseg.writers.labels import ShardCanvas

    canvases = ShardCanvas(64 * 64)
    first = canvases.take(64, 64)
    assert first.shape == (64, 64) and first.dtype == np.uint32 and first.flags.c_contiguous and not first.any()
    first[:] = 7
    smaller = canvases.take(30, 50)  # an edge shard
    assert smaller.shape == (30, 50) and smaller.flags.c_contiguous and not smaller.any()
    smaller[-1, -1] = 3
    assert not canvases.take(64, 64).any()


def test_labels_painted_shard_by_shard_equal_labels_painted_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import wsiseg.writers.labels as labels

    table = make_table(blob_polygons(400, 1200, 900, seed=3))
    one = np.asarray(open_nuclei(write_store(tmp_path / "one.zarr", [table])).labels(0)[:])
    monkeypatch.setattr(labels, "SHARD_PX", 512)  # 3 x 2 shards, the last column and row smaller
    many = np.asarray(open_nuclei(write_store(tmp_path / "many.zarr", [table])).labels(0)[:])
    assert one.any() and np.array_equal(many, one)
