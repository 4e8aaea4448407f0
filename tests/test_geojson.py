"""QuPath GeoJSON writer: every QuPath import rule, repairs after rounding, formats, streaming."""

from __future__ import annotations

import gzip
import json
import tracemalloc
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import shapely

from wsiseg.models.protocols import NucleusClass
from wsiseg.nuclei import MEASUREMENTS, NucleusTable
from wsiseg.writers.geojson import GeoJSONWriter, check_qupath_geojson
from wsiseg.writers.geojson_text import _put_number

CLASSES = (NucleusClass(0, "Neoplastic", (255, 0, 0)), NucleusClass(1, "Immune cell", (0, 128, 255)))
SUFFIX = {"gz": ".geojson.gz", "geojson": ".geojson", "zip": ".zip"}


def make_table(polygons: list[shapely.Polygon], class_id: list[int] | np.ndarray | None = None) -> NucleusTable:
    n = len(polygons)
    rng = np.random.default_rng(n)
    cid = np.zeros(n, np.int16) if class_id is None else np.asarray(class_id, np.int16)
    meas = {m: rng.uniform(0, 100, n).astype(np.float32) for m in MEASUREMENTS}
    return NucleusTable.from_polygons(polygons, cid, meas)


def grid_table(n: int, seed: int = 0) -> NucleusTable:
    """n edge-traced nuclei (boxes and L shapes, some with holes) on a grid, mixed classes."""
    rng = np.random.default_rng(seed)
    polys = []
    for i in range(n):
        x, y = 20 * (i % 50) + 100, 20 * (i // 50) + 200
        w, h = int(rng.integers(3, 12)), int(rng.integers(3, 12))
        if i % 7 == 3:
            polys.append(
                shapely.Polygon(
                    [(x, y), (x + 10, y), (x + 10, y + 10), (x, y + 10)],
                    [[(x + 3, y + 3), (x + 6, y + 3), (x + 6, y + 6), (x + 3, y + 6)]],
                )
            )
        elif i % 3 == 1:
            polys.append(
                shapely.Polygon([(x, y), (x + w, y), (x + w, y + 2), (x + 2, y + 2), (x + 2, y + h), (x, y + h)])
            )
        else:
            polys.append(shapely.box(x, y, x + w, y + h))
    return make_table(polys, rng.integers(-1, 2, n))


def write(path: Path, tables: list[NucleusTable], **options: Any) -> Any:
    writer = GeoJSONWriter(path, classes=CLASSES, **options)
    for t in tables:
        writer.write(t)
    return writer.close()


def read_features(path: Path) -> list[dict[str, Any]]:
    if path.name.endswith(".zip"):
        with zipfile.ZipFile(path) as zf:
            return [f for name in zf.namelist() for f in json.loads(zf.read(name))["features"]]
    raw = gzip.decompress(path.read_bytes()) if path.name.endswith(".gz") else path.read_bytes()
    return json.loads(raw)["features"]


def test_every_feature_follows_qupath_rules(tmp_path: Path) -> None:
    table = grid_table(120)
    path = tmp_path / "slide.geojson.gz"
    summary = write(path, [table], foreign_members={"wsiseg": {"model": "test"}})
    assert check_qupath_geojson(path) == []
    assert summary.n_features == 120 and summary.n_dropped == 0 and summary.n_repaired == 0
    doc = json.loads(gzip.decompress(path.read_bytes()))
    assert doc["type"] == "FeatureCollection" and doc["wsiseg"] == {"model": "test"}
    for feature, cid in zip(doc["features"], table.class_id):
        props = feature["properties"]
        assert props["objectType"] == "detection" and "type" not in props
        if cid < 0:
            assert "classification" not in props
        else:
            cls = CLASSES[cid]
            assert props["classification"] == {"name": cls.name, "color": list(cls.color)}
        assert set(props["measurements"]) == {"label_id", *MEASUREMENTS}
        assert all(np.isfinite(v) for v in props["measurements"].values())


def test_measurements_keep_float32_precision_and_label_ids_run_across_batches(tmp_path: Path) -> None:
    table = grid_table(60)
    path = tmp_path / "a.geojson"
    write(path, [table.take(np.arange(0, 25)), NucleusTable.empty(), table.take(np.arange(25, 60))], fmt="geojson")
    features = read_features(path)
    assert [f["properties"]["measurements"]["label_id"] for f in features] == list(range(1, 61))
    for m in MEASUREMENTS:
        got = np.array([f["properties"]["measurements"][m] for f in features])
        np.testing.assert_allclose(got, table.measurements[m], rtol=0, atol=1e-4 * 100)


def test_coordinates_are_level0_minus_offset_and_rings_closed(tmp_path: Path) -> None:
    poly = shapely.Polygon([(1000, 2000), (1010.25, 2000), (1010.25, 2007.5), (1000, 2007.5)])
    path = tmp_path / "a.geojson"
    write(path, [make_table([poly])], fmt="geojson", offset_l0=(1000, 1990.5))
    (feature,) = read_features(path)
    ring = feature["geometry"]["coordinates"][0]
    assert ring[0] == ring[-1]
    assert shapely.equals(shapely.Polygon(ring), shapely.Polygon([(0, 9.5), (10.25, 9.5), (10.25, 17), (0, 17)]))
    assert json.loads(path.read_text())["coordinate_frame"]["offset_l0"] == [1000, 1990.5]


def test_polygon_invalid_only_after_rounding_is_repaired(tmp_path: Path) -> None:
    # The reflex vertex (1, 0.005) sits above edge A-B (y = 0.004 at x = 1) but rounds to
    # (1, 0), below the rounded edge (y = 0.005): the rounded ring crosses itself.
    poly = shapely.Polygon([(0, 0), (2, 0.008), (2, 1), (1, 0.005), (0, 1)])
    assert poly.is_valid
    assert not shapely.transform(poly, lambda c: np.round(c, 2)).is_valid
    path = tmp_path / "a.geojson"
    summary = write(path, [make_table([poly, shapely.box(5, 5, 9, 9)])], fmt="geojson")
    assert check_qupath_geojson(path) == []
    assert (summary.n_features, summary.n_repaired, summary.n_dropped) == (2, 1, 0)
    repaired = shapely.Polygon(read_features(path)[0]["geometry"]["coordinates"][0])
    assert repaired.area > 0.4 * poly.area  # the largest part survives


def test_bowtie_and_spike_are_repaired_and_degenerate_polygons_dropped(tmp_path: Path) -> None:
    bowtie = shapely.Polygon([(0, 0), (10, 10), (10, 0), (0, 10)])
    spike = shapely.Polygon([(20, 0), (30, 0), (30, 10), (30, 15), (30, 10), (20, 10)])
    tiny = shapely.Polygon([(50, 50), (50.001, 50), (50.001, 50.001), (50, 50.001)])
    assert not bowtie.is_valid and not spike.is_valid
    path = tmp_path / "a.zip"
    summary = write(path, [make_table([bowtie, spike, tiny, shapely.box(40, 40, 44, 44)])], fmt="zip")
    assert check_qupath_geojson(path) == []
    assert (summary.n_features, summary.n_repaired, summary.n_dropped) == (3, 2, 1)
    features = read_features(path)
    assert [f["properties"]["measurements"]["label_id"] for f in features] == [1, 2, 4]
    spike_fixed = shapely.Polygon(features[1]["geometry"]["coordinates"][0])
    assert spike_fixed.equals(shapely.box(20, 0, 30, 10))


@pytest.mark.parametrize("fmt", ["gz", "geojson", "zip"])
def test_all_formats_hold_the_same_features(tmp_path: Path, fmt: str) -> None:
    table = grid_table(75)
    reference = tmp_path / "ref.geojson"
    write(reference, [table], fmt="geojson", seed=7)
    path = tmp_path / f"slide{SUFFIX[fmt]}"
    write(path, [table.take(np.arange(0, 40)), table.take(np.arange(40, 75))], fmt=fmt, seed=7, shard_size=30)
    assert check_qupath_geojson(path) == []
    assert read_features(path) == read_features(reference)


def test_zip_entries_are_complete_collections_of_at_most_shard_size(tmp_path: Path) -> None:
    table = grid_table(25)
    path = tmp_path / "slide.geojson.zip"
    batches = [table.take(np.arange(s, min(25, s + 7))) for s in range(0, 25, 7)]
    summary = write(path, batches, fmt="zip", shard_size=10)
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        sizes = [len(json.loads(zf.read(n))["features"]) for n in names]
    assert names == ["slide-0000.geojson", "slide-0001.geojson", "slide-0002.geojson"]
    assert sizes == [10, 10, 5] and summary.n_entries == 3 and sum(sizes) == 25


def test_empty_outputs_are_valid(tmp_path: Path) -> None:
    for fmt in ("gz", "geojson", "zip"):
        path = tmp_path / f"empty{SUFFIX[fmt]}"
        assert write(path, [], fmt=fmt).n_features == 0
        assert check_qupath_geojson(path) == [] and read_features(path) == []


def test_cell_objects_carry_nucleus_geometry_at_feature_level(tmp_path: Path) -> None:
    path = tmp_path / "cells.geojson"
    write(path, [grid_table(5)], fmt="geojson", object_type="cell")
    assert check_qupath_geojson(path) == []
    for f in read_features(path):
        assert f["properties"]["objectType"] == "cell" and f["nucleusGeometry"] == f["geometry"]


def test_abort_and_errors_leave_nothing_behind(tmp_path: Path) -> None:
    for fmt in ("gz", "geojson", "zip"):
        writer = GeoJSONWriter(tmp_path / f"a{SUFFIX[fmt]}", fmt=fmt, classes=CLASSES)  # type: ignore[arg-type]
        writer.write(grid_table(10))
        writer.abort()
    with pytest.raises(RuntimeError, match="boom"):
        with GeoJSONWriter(tmp_path / "b.geojson.gz", classes=CLASSES) as writer:
            writer.write(grid_table(10))
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_bad_arguments_are_refused_with_a_clear_message(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"\.geojson\.gz"):
        GeoJSONWriter(tmp_path / "a.geojson", fmt="gz")
    with pytest.raises(ValueError, match="object_type"):
        GeoJSONWriter(tmp_path / "a.geojson.gz", object_type="annotation")
    with pytest.raises(ValueError, match="appears twice"):
        GeoJSONWriter(tmp_path / "a.geojson.gz", classes=(CLASSES[0], CLASSES[0]))
    writer = GeoJSONWriter(tmp_path / "a.geojson.gz", classes=CLASSES[:1])
    with pytest.raises(ValueError, match="class id 1"):
        writer.write(make_table([shapely.box(0, 0, 2, 2)], [1]))
    writer.abort()


def _number_texts(values: np.ndarray, decimals: int) -> list[str]:
    out = []
    for v in values:
        buf = np.empty(32, np.uint8)
        used = _put_number(buf, 0, float(v), decimals)
        out.append(bytes(buf[:used]).decode())
    return out


def _fixed_point(value: float, decimals: int) -> str:
    """The number text by its definition: rint(value * 10**decimals) with the point put back,
    trailing zeros after it dropped, no point when nothing is left after it."""
    n = int(np.rint(value * float(10**decimals)))
    digits = str(abs(n)).rjust(decimals + 1, "0")
    whole, frac = digits[: len(digits) - decimals], digits[len(digits) - decimals :].rstrip("0")
    return ("-" if n < 0 else "") + whole + ("." + frac if frac else "")


def test_number_text_follows_its_definition_for_every_decimals() -> None:
    rng = np.random.default_rng(4)
    values = np.concatenate([rng.uniform(-3e4, 3e4, 300), rng.uniform(-1, 1, 300), 10.0 ** rng.integers(-9, 9, 100),
                             [0.0, -0.0, 1e-9, -5e-9, 100.0, 0.1, 7.0]])
    for decimals in range(9):
        assert _number_texts(values, decimals) == [_fixed_point(float(v), decimals) for v in values], decimals


def test_number_text_parses_back_to_the_rounded_values(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    values = np.concatenate(
        [rng.uniform(-2e5, 2e5, 5000), [0.0, -0.0, -0.001, 0.005, 1.005, 2.675, 99999.995, 1e7 + 0.01]]
    )
    texts = _number_texts(values, 2)
    assert [float(t) for t in texts] == (np.round(values, 2) + 0.0).tolist()
    assert all(not t.startswith("-0") or t.startswith("-0.") for t in texts) and "-0" not in texts
    assert not any(t.endswith("0") and "." in t for t in texts)  # no trailing zeros after the point
    assert _number_texts(np.array([120.0, -7.5, 3.25]), 0) == ["120", "-8", "3"]  # rint: half to even
    cols = [np.array([0.123456789, 5e-7, 3.0], np.float32), np.array([123456.7, 0.5, -2.25], np.float32)]
    table = make_table([shapely.box(i, 0, i + 1, 1) for i in range(3)])
    table.measurements["score"], table.measurements["iou"] = cols
    with GeoJSONWriter(tmp_path / "m.geojson", fmt="geojson", classes=CLASSES) as writer:
        writer.write(table)
    parsed = [f["properties"]["measurements"] for f in json.loads((tmp_path / "m.geojson").read_text())["features"]]
    for name, col in zip(("score", "iou"), cols):  # about 6 significant digits of the column's largest value
        got = [p[name] for p in parsed]
        np.testing.assert_allclose(got, col, rtol=0, atol=1e-5 * np.abs(col).max())


def test_validator_reports_each_broken_rule(tmp_path: Path) -> None:
    good = {"type": "Polygon", "coordinates": [[[0, 0], [4, 0], [4, 4], [0, 4], [0, 0]]]}
    uid = "7d1c3a3e-8a4b-4c8f-9f5e-1b2c3d4e5f60"

    def feature(i: int, geometry: Any = good, **props: Any) -> dict[str, Any]:
        return {"type": "Feature", "id": uid[:-2] + f"{i:02d}", "geometry": geometry,
                "properties": {"objectType": "detection", **props}}  # fmt: skip

    features = [
        feature(1, classification={"name": "Tumor"}),
        feature(2, measurements={"score": float("nan")}),
        feature(3, type="detection"),
        feature(4, {"type": "Polygon", "coordinates": [[[0, 0], [4, 0], [4, 4], [0, 4]]]}),
        feature(5, {"type": "Polygon", "coordinates": [[[0, 0], [4.001, 0], [4, 4], [0, 4], [0, 0]]]}),
        feature(6, {"type": "Polygon", "coordinates": [[[0, 0], [4, 4], [4, 0], [0, 4], [0, 0]]]}),
        feature(7, None),
        {**feature(8), "id": "not-a-uuid"},
        feature(9),
        feature(9),
    ]
    path = tmp_path / "bad.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    problems = check_qupath_geojson(path)
    for i, needle in [(0, "without 'color'"), (1, "NaN"), (2, "'type' key"), (3, "not closed"),
                      (4, "more than 2 decimals"), (5, "invalid polygon"), (6, "expected a Polygon"),
                      (7, "not a UUID4"), (9, "duplicate id")]:  # fmt: skip
        assert any(f"feature {i}:" in p and needle in p for p in problems), (i, needle)
    assert not any("feature 8:" in p for p in problems)
    (tmp_path / "junk.geojson.gz").write_bytes(b"not gzip")
    assert "cannot be read" in check_qupath_geojson(tmp_path / "junk.geojson.gz")[0]


def _peak_bytes(path: Path, n_batches: int) -> int:
    batch = grid_table(5000, seed=1)
    tracemalloc.start()
    writer = GeoJSONWriter(path, classes=CLASSES)
    for _ in range(n_batches):
        writer.write(batch)
    writer.close()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak


def test_streaming_memory_does_not_grow_with_nuclei_count(tmp_path: Path) -> None:
    small = _peak_bytes(tmp_path / "small.geojson.gz", 2)
    large = _peak_bytes(tmp_path / "large.geojson.gz", 8)
    assert large < 1.5 * small
