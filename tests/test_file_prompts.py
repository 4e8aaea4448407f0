"""Prompt files (CSV/TSV, GeoJSON) read as level-0 PointSets, and their bad-input messages."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from wsiseg.models.prompters.file_prompts import read_prompt_file
from wsiseg.models.prompters.point import PANNUKE_CLASSES


def test_csv_with_class_names_and_ids_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "points.csv"
    path.write_text("X,Y,label,score\n10.5,20.25,Neoplastic,0.9\n1000,2000.5,3,\n7,8,,0.4\n\n")
    points = read_prompt_file(path, classes=PANNUKE_CLASSES)
    np.testing.assert_allclose(points.xy, [[10.5, 20.25], [1000, 2000.5], [7, 8]])
    assert points.class_id.tolist() == [0, 3, -1]
    np.testing.assert_allclose(points.score, [0.9, 1.0, 0.4])


def test_tsv_semicolon_and_gzip_are_read(tmp_path: Path) -> None:
    (tmp_path / "a.tsv").write_text("class\ty\tx\ninflammatory\t2\t1\n")
    assert read_prompt_file(tmp_path / "a.tsv", classes=PANNUKE_CLASSES).class_id.tolist() == [1]
    (tmp_path / "b.csv").write_text("x;y\n1;2\n3;4\n")
    np.testing.assert_allclose(read_prompt_file(tmp_path / "b.csv").xy, [[1, 2], [3, 4]])
    (tmp_path / "c.csv.gz").write_bytes(gzip.compress(b"x,y\n5,6\n"))
    np.testing.assert_allclose(read_prompt_file(tmp_path / "c.csv.gz").xy, [[5, 6]])


def test_offset_shifts_points_into_the_level0_frame(tmp_path: Path) -> None:
    (tmp_path / "p.csv").write_text("x,y\n1,2\n")
    points = read_prompt_file(tmp_path / "p.csv", offset_l0=(100.0, 200.0))
    np.testing.assert_allclose(points.xy, [[101, 202]])


def test_names_without_classes_are_kept_unclassified(tmp_path: Path) -> None:
    (tmp_path / "p.csv").write_text("x,y,class\n1,2,Tumor\n3,4,2\n")
    assert read_prompt_file(tmp_path / "p.csv").class_id.tolist() == [-1, 2]


def test_empty_data_gives_an_empty_pointset(tmp_path: Path) -> None:
    (tmp_path / "p.csv").write_text("x,y\n")
    assert len(read_prompt_file(tmp_path / "p.csv")) == 0
    (tmp_path / "p.geojson").write_text('{"type": "FeatureCollection", "features": []}')
    assert len(read_prompt_file(tmp_path / "p.geojson")) == 0


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("x,y\n1,2\n3,abc\n", r"line 3: y 'abc' is not a number"),
        ("x,y\n1,2\n3\n", r"line 3: 1 fields"),
        ("x,y\n1,nan\n", r"line 2: y is nan"),
        ("a,b\n1,2\n", r"line 1: the header .* needs columns named x and y"),
        ("x,y,label\n1,2,Macrophage\n", r"line 2: unknown class 'Macrophage'; known classes: Neoplastic"),
        ("x,y,label\n1,2,9\n", r"line 2: class id 9 is not one of \[0, 1, 2, 3, 4\]"),
        ("", r"empty prompt file"),
    ],
)
def test_bad_csv_rows_name_the_file_and_line(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(ValueError, match=message) as info:
        read_prompt_file(path, classes=PANNUKE_CLASSES)
    assert str(path) in str(info.value)


def feature(geometry: dict, **properties: object) -> dict:
    return {"type": "Feature", "geometry": geometry, "properties": properties}


def point(x: float, y: float, **properties: object) -> dict:
    return feature({"type": "Point", "coordinates": [x, y]}, **properties)


def test_geojson_points_multipoints_and_polygon_centroids(tmp_path: Path) -> None:
    square = [[[10, 10], [14, 10], [14, 14], [10, 14], [10, 10]]]
    data = {
        "type": "FeatureCollection",
        "features": [
            point(1.5, 2.5, classification={"name": "Dead", "color": [1, 0, 0]}),
            feature({"type": "MultiPoint", "coordinates": [[3, 4], [5, 6]]}, classification="Connective"),
            feature({"type": "Polygon", "coordinates": square}, measurements={"score": 0.7}),
        ],
    }
    path = tmp_path / "cells.geojson"
    path.write_text(json.dumps(data))
    points = read_prompt_file(path, classes=PANNUKE_CLASSES)
    np.testing.assert_allclose(points.xy, [[1.5, 2.5], [3, 4], [5, 6], [12, 12]])
    assert points.class_id.tolist() == [3, 2, 2, -1]
    np.testing.assert_allclose(points.score, [1, 1, 1, 0.7])


def test_geojson_feature_list_as_qupath_exports_it(tmp_path: Path) -> None:
    path = tmp_path / "qupath.json.gz"
    items = [point(7, 8, classification={"name": "epithelial"})]
    path.write_bytes(gzip.compress(json.dumps(items).encode()))
    points = read_prompt_file(path, classes=PANNUKE_CLASSES, offset_l0=(1.0, 1.0))
    np.testing.assert_allclose(points.xy, [[8, 9]])
    assert points.class_id.tolist() == [4]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"type": "FeatureCollection", "features": [', r"line 1: not valid JSON"),
        ('{"type": "Topology"}', r"expected a GeoJSON FeatureCollection"),
        (
            json.dumps([feature({"type": "LineString", "coordinates": [[0, 0], [1, 1]]})]),
            "feature 0: LineString",
        ),
        (json.dumps([{"type": "Feature", "properties": {}}]), r"feature 0: has no geometry"),
        (
            json.dumps([point(0, 0), point(0, 0, classification="Blob")]),
            r"feature 1: unknown class 'Blob'",
        ),
    ],
)
def test_bad_geojson_names_the_file_and_feature(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "bad.geojson"
    path.write_text(content)
    with pytest.raises(ValueError, match=message) as info:
        read_prompt_file(path, classes=PANNUKE_CLASSES)
    assert str(path) in str(info.value)


def test_missing_file_and_unknown_type(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        read_prompt_file(tmp_path / "nope.csv")
    (tmp_path / "p.xlsx").write_bytes(b"PK")
    with pytest.raises(ValueError, match=r"unsupported prompt file type '.xlsx'"):
        read_prompt_file(tmp_path / "p.xlsx")
