"""Instance labels from files: rasters, wsiseg GeoJSON (every container, QuPath offset) and Zarr stores."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import shapely
import tifffile
from PIL import Image
from skimage.draw import polygon as draw_polygon

from wsiseg.instances_io import (
    InstanceFileError,
    instances_mpp,
    load_instance_pair,
    load_instances,
    rasterize_polygons,
    read_geojson_polygons,
)
from wsiseg.nuclei import MEASUREMENTS, NucleusTable
from wsiseg.writers.geojson import GeoJSONWriter
from wsiseg.writers.zarr_store import ZarrWriter

# level-0 px, edge frame: a 6 x 6 box (36 px) and an 8 x 8 box with a 2 x 2 hole (60 px)
POLYGONS = [
    shapely.box(2, 3, 8, 9),
    shapely.Polygon(shapely.box(12, 2, 20, 10).exterior, [shapely.box(14, 4, 16, 6).exterior]),
]
SHAPE = (12, 24)


def table(polygons: list[shapely.Polygon]) -> NucleusTable:
    n = len(polygons)
    measurements = {m: np.ones(n, np.float32) for m in MEASUREMENTS}
    return NucleusTable.from_polygons(polygons, np.full(n, -1, np.int16), measurements)


def expected_raster() -> np.ndarray:
    labels = np.zeros(SHAPE, np.uint32)
    labels[3:9, 2:8] = 1
    labels[2:10, 12:20] = 2
    labels[4:6, 14:16] = 0
    return labels


def skimage_reference(polygons: list[shapely.Polygon], shape: tuple[int, int]) -> np.ndarray:
    """Centre-inside rule with skimage: vertices shifted by -0.5, holes subtracted."""
    out = np.zeros(shape, np.uint32)
    for label, poly in enumerate(polygons, start=1):
        mask = np.zeros(shape, bool)
        x, y = np.asarray(poly.exterior.coords).T
        mask[draw_polygon(y - 0.5, x - 0.5, shape)] = True
        for hole in poly.interiors:
            hx, hy = np.asarray(hole.coords).T
            mask[draw_polygon(hy - 0.5, hx - 0.5, shape)] = False
        out[mask] = label
    return out


def test_rasterized_polygons_cover_the_pixels_whose_centres_they_contain() -> None:
    assert np.array_equal(rasterize_polygons(POLYGONS, SHAPE), expected_raster())
    odd = [
        shapely.Polygon([(1.2, 1.7), (9.6, 2.3), (4.1, 10.8)]),
        shapely.Polygon([(14.3, 0.4), (22.9, 5.1), (15.2, 11.6)]),
    ]
    assert np.array_equal(rasterize_polygons(odd, SHAPE), skimage_reference(odd, SHAPE))
    multi = shapely.MultiPolygon([shapely.box(0, 0, 2, 2), shapely.box(4, 4, 5, 5)])
    assert np.array_equal(np.flatnonzero(rasterize_polygons([multi], (6, 6), [9])), [0, 1, 6, 7, 28])
    assert rasterize_polygons([multi], (6, 6), [9]).max() == 9


@pytest.mark.parametrize(("fmt", "name"), [("gz", "p.geojson.gz"), ("geojson", "p.geojson"), ("zip", "p.zip")])
def test_geojson_output_is_painted_back_in_the_level0_frame(tmp_path: Path, fmt: str, name: str) -> None:
    path = tmp_path / name
    writer = GeoJSONWriter(path, fmt=fmt, offset_l0=(3.0, 5.0), shard_size=1, seed=0)  # type: ignore[arg-type]
    writer.write(table(POLYGONS))
    writer.close()
    polygons, labels = read_geojson_polygons(path)
    assert labels.tolist() == [1, 2]  # the label_id measurement
    assert shapely.equals(polygons[1], POLYGONS[1])  # the writer's offset (3, 5) is added back
    assert np.array_equal(load_instances(path, SHAPE), expected_raster())


def test_geojson_without_label_ids_numbers_features_in_order(tmp_path: Path) -> None:
    path = tmp_path / "qupath.geojson"
    path.write_text(
        '{"type":"FeatureCollection","features":['
        '{"type":"Feature","geometry":{"type":"Point","coordinates":[1,1]},"properties":{}},'
        '{"type":"Feature","geometry":{"type":"Polygon","coordinates":[[[0,0],[2,0],[2,2],[0,2],[0,0]]]},'
        '"properties":{"objectType":"detection"}}]}'
    )
    labels = load_instances(path)
    assert labels.shape == (2, 2) and (labels == 1).all()  # grid from the extent; the point is ignored


def test_zarr_store_gives_its_label_raster_or_paints_its_polygons(tmp_path: Path) -> None:
    store = tmp_path / "s.zarr"
    slide = {"width": SHAPE[1], "height": SHAPE[0], "mpp": [0.5, 0.5]}
    writer = ZarrWriter(store, slide=slide, label_mpp=(0.5, 0.5))
    writer.write(table(POLYGONS))
    writer.close()
    assert np.array_equal(load_instances(store), expected_raster())
    wider = load_instances(store, (10, 30))  # another grid: polygons painted onto it
    assert wider.shape == (10, 30) and np.array_equal(wider[:10, :24], expected_raster()[:10])
    assert instances_mpp(store) == 0.5
    assert instances_mpp(tmp_path / "t.tif") is None


def test_rasters_load_as_stored_and_define_the_grid_for_polygons(tmp_path: Path) -> None:
    truth = expected_raster().astype(np.uint16)
    tifffile.imwrite(tmp_path / "t.tif", truth)
    Image.fromarray(truth.astype(np.uint8)).save(tmp_path / "t.png")
    np.save(tmp_path / "t.npy", truth.astype(np.int64))
    for name in ("t.tif", "t.png", "t.npy"):
        assert np.array_equal(load_instances(tmp_path / name), truth), name
    writer = GeoJSONWriter(tmp_path / "p.geojson", fmt="geojson", seed=0)
    writer.write(table(POLYGONS[:1]))
    writer.close()
    pred, grid = load_instance_pair(tmp_path / "p.geojson", tmp_path / "t.tif")
    assert pred.shape == grid.shape == SHAPE and (pred == 1).sum() == 36


def test_unreadable_inputs_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(InstanceFileError, match="nope.tif: no such file"):
        load_instances(tmp_path / "nope.tif")
    (tmp_path / "labels.csv").write_text("1,2\n")
    with pytest.raises(InstanceFileError, match=r"labels.csv: unsupported"):
        load_instances(tmp_path / "labels.csv")
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "rgb.png")
    with pytest.raises(InstanceFileError, match="rgb.png: a RGB PNG"):
        load_instances(tmp_path / "rgb.png")
    np.save(tmp_path / "f.npy", np.full((3, 3), 0.5))
    with pytest.raises(InstanceFileError, match="f.npy: labels must be whole numbers"):
        load_instances(tmp_path / "f.npy")
    np.save(tmp_path / "small.npy", np.zeros((3, 3), np.int32))
    with pytest.raises(InstanceFileError, match=r"small.npy: labels of shape \(3, 3\) do not match"):
        load_instances(tmp_path / "small.npy", (4, 4))
    (tmp_path / "broken.geojson").write_text('{"type": "FeatureCollection", "features": [')
    with pytest.raises(InstanceFileError, match="broken.geojson: not readable GeoJSON"):
        load_instances(tmp_path / "broken.geojson", (4, 4))
