"""Rules of the format readers: MoNuSeg XML, QuPath GeoJSON, PanNuke, HoVer-Net .mat, DSB.

Every test writes a tiny dataset in exactly that format's layout in tmp_path."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.io import savemat
from skimage.draw import polygon

from wsiseg.datasets import DatasetError, detect_format, open_dataset


def save_rgb(path: Path, h: int = 10, w: int = 12, seed: int = 0) -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return pixels


# ---------------------------------------------------------------- MoNuSeg / ImageScope XML

REGIONS: list[list[tuple[float, float]]] = [
    [(1, 1), (6, 1), (6, 5), (1, 5)],  # a rectangle
    [(2.5, 2.5), (2.5, 3.5)],  # two vertices: skipped
    [(4, 3), (9, 3), (9, 8), (4.5, 8.5)],  # overlaps the first: wins there
]


def imagescope_xml(regions: list[list[tuple[float, float]]], mpp: float | None = 0.2527) -> str:
    body = "".join(
        "<Region><Vertices>" + "".join(f'<Vertex X="{x}" Y="{y}" Z="0"/>' for x, y in r) + "</Vertices></Region>"
        for r in regions
    )
    attr = f' MicronsPerPixel="{mpp}"' if mpp is not None else ""
    return (f'<?xml version="1.0"?><Annotations{attr}><Annotation Id="1"><Regions>{body}</Regions>'
            "</Annotation></Annotations>")


def test_monuseg_xml_is_filled_like_skimage_polygon_in_file_order(tmp_path: Path) -> None:
    save_rgb(tmp_path / "k.png")
    (tmp_path / "k.xml").write_text(imagescope_xml(REGIONS))
    item = open_dataset(tmp_path, format="monuseg")[0]
    expected = np.zeros((10, 12), np.int32)
    for new_id, region in ((1, REGIONS[0]), (2, REGIONS[2])):
        xy = np.asarray(region, float)
        expected[polygon(xy[:, 1], xy[:, 0], expected.shape)] = new_id
    np.testing.assert_array_equal(item.labels, expected)
    assert item.labels[1, 1] == 1 and item.labels[4, 5] == 2  # vertices included, later region wins
    assert item.mpp == pytest.approx(0.2527)


def test_gzipped_xml_beside_an_image_without_labels_goes_to_the_xml_reader(tmp_path: Path) -> None:
    save_rgb(tmp_path / "a.png")
    np.save(tmp_path / "a.labels.npy", np.ones((10, 12), np.int32))
    save_rgb(tmp_path / "b.png", seed=1)
    with gzip.open(tmp_path / "b.xml.gz", "wt") as f:
        f.write(imagescope_xml(REGIONS[:1], mpp=None))
    assert detect_format(tmp_path) == "pairs"
    items = {item.name: item for item in open_dataset(tmp_path, mpp=0.4)}
    assert items["a"].labels.min() == 1  # from the label map
    assert items["b"].labels.sum() == 30 and items["b"].mpp == 0.4  # 6x5 rectangle; no MicronsPerPixel


def test_monuseg_release_layout_is_detected(tmp_path: Path) -> None:
    save_rgb(tmp_path / "Tissue Images" / "t.png")
    (tmp_path / "Annotations").mkdir()
    (tmp_path / "Annotations" / "t.xml").write_text(imagescope_xml(REGIONS))
    assert detect_format(tmp_path) == "monuseg"
    assert open_dataset(tmp_path)[0].labels.max() == 2


def test_xml_without_regions_is_an_error_naming_it(tmp_path: Path) -> None:
    save_rgb(tmp_path / "e.png")
    (tmp_path / "e.xml").write_text(imagescope_xml(REGIONS[1:2]))
    with pytest.raises(DatasetError, match=r"e\.xml: no Region with 3 or more vertices"):
        open_dataset(tmp_path)[0]


# ---------------------------------------------------------------- QuPath GeoJSON


def feature(rings: list[list[list[float]]], cls: object = None, kind: str = "detection",
            multi: bool = False) -> dict[str, object]:
    geometry = {"type": "MultiPolygon", "coordinates": [[r] for r in rings]} if multi else {
        "type": "Polygon", "coordinates": rings}
    props: dict[str, object] = {"objectType": kind}
    if cls is not None:
        props["classification"] = cls
    return {"type": "Feature", "geometry": geometry, "properties": props}


def square(x0: float, y0: float, x1: float, y1: float) -> list[list[float]]:
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]


def write_geojson(path: Path, features: object) -> None:
    path.write_text(json.dumps(features))


def test_qupath_square_covers_exactly_the_pixels_whose_centres_it_contains(tmp_path: Path) -> None:
    save_rgb(tmp_path / "q.png")
    write_geojson(tmp_path / "q.geojson", {"type": "FeatureCollection", "features": [
        feature([square(1, 2, 3, 5)]),  # pixel-edge frame: columns 1-2, rows 2-4
        feature([square(7.6, 1.6, 8.4, 2.4)]),  # holds no pixel centre (7.5 and 8.5 lie outside)
        feature([square(9.2, 6.2, 9.9, 6.9)]),  # holds one centre: (9.5, 6.5)
    ]})
    item = open_dataset(tmp_path, mpp=0.5)[0]
    expected = np.zeros((10, 12), np.int32)
    expected[2:5, 1:3] = 1
    expected[6, 9] = 3
    np.testing.assert_array_equal(item.labels, expected)


def test_qupath_holes_multipolygons_cells_offset_and_classes(tmp_path: Path) -> None:
    save_rgb(tmp_path / "a.png")
    save_rgb(tmp_path / "b.png", seed=1)
    ring_with_hole = [square(0, 0, 5, 5), square(2, 2, 3, 3)]
    write_geojson(tmp_path / "a.geojson", [  # a bare list of Features
        feature(ring_with_hole, cls={"name": "Tumor", "color": [255, 0, 0]}),
        feature([square(6, 0, 7, 1), square(8, 0, 9, 1)], cls="Immune", multi=True),
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [square(0, 6, 12, 10)]},
         "nucleusGeometry": {"type": "Polygon", "coordinates": [square(10, 8, 11, 9)]},
         "properties": {"objectType": "cell"}},
        feature([square(0, 0, 12, 10)], kind="tile"),  # not a nucleus: skipped
    ])
    write_geojson(tmp_path / "b.geojson", {"type": "FeatureCollection", "features": [
        feature([square(-2, -2, 0, 0)], cls={"names": ["Tumor", "Positive"], "color": [1, 2, 3]})]})
    ds = open_dataset(tmp_path, format="qupath", mpp=0.5, offset=(0, 0))
    a = ds[0]
    assert a.labels[2, 2] == 0 and a.labels[1, 1] == 1 and (a.labels == 1).sum() == 24
    assert a.labels[0, 6] == 2 and a.labels[0, 8] == 2 and a.labels[0, 7] == 0
    assert a.labels[8, 10] == 3 and (a.labels == 3).sum() == 1  # the cell's nucleus, not its boundary
    # class ids in sorted name order over the whole dataset; unclassified nuclei have no class
    assert a.class_names == {0: "Immune", 1: "Tumor", 2: "Tumor: Positive"}
    assert a.classes == {1: 1, 2: 0}
    shifted = open_dataset(tmp_path / "b.png", format="qupath", mpp=0.5, offset=(3, 4))[0]
    assert (shifted.labels == 1).sum() == 4 and shifted.labels[2:4, 1:3].min() == 1
    assert shifted.classes == {1: 0} and shifted.class_names == {0: "Tumor: Positive"}


def test_empty_qupath_file_is_an_error_naming_it(tmp_path: Path) -> None:
    save_rgb(tmp_path / "e.png")
    write_geojson(tmp_path / "e.geojson", {"type": "FeatureCollection", "features": []})
    with pytest.raises(DatasetError, match=r"e\.geojson: no annotation, detection or cell with a Polygon"):
        open_dataset(tmp_path, mpp=0.5)


# ---------------------------------------------------------------- PanNuke


def test_pannuke_fold_relabels_colliding_ids_and_takes_classes_from_channels(tmp_path: Path) -> None:
    fold = tmp_path / "fold1"
    fold.mkdir()
    images = np.random.default_rng(0).uniform(0, 255, (2, 8, 8, 3))
    masks = np.zeros((2, 8, 8, 6))
    masks[0, 0:2, 0:2, 0] = 7  # Neoplastic id 7
    masks[0, 4:6, 4:6, 1] = 7  # Inflammatory, same id 7
    masks[0, 6:8, 0:2, 4] = 3  # Epithelial
    masks[..., 5] = (masks[..., :5].sum(-1) == 0)
    np.save(fold / "images.npy", images)
    np.save(fold / "masks.npy", masks)
    np.save(fold / "types.npy", np.array(["Breast", "Colon"]))
    assert detect_format(fold) == "pannuke"
    ds = open_dataset(fold)
    assert ds.names == ["fold1-0", "fold1-1"]
    item = ds[0]
    assert item.mpp == 0.25 and item.group == "Breast" and item.image.dtype == np.uint8
    np.testing.assert_array_equal(item.image, np.clip(np.rint(images[0]), 0, 255).astype(np.uint8))
    ids = {int(item.labels[0, 0]), int(item.labels[4, 4]), int(item.labels[6, 0])}
    assert len(ids) == 3 and 0 not in ids
    assert item.classes == {int(item.labels[0, 0]): 0, int(item.labels[4, 4]): 1, int(item.labels[6, 0]): 4}
    assert item.class_names is not None and item.class_names[1] == "Inflammatory"
    assert ds[1].labels.max() == 0 and open_dataset(fold, mpp=0.5)[0].mpp == 0.5


def test_pannuke_masks_of_another_size_are_an_error(tmp_path: Path) -> None:
    np.save(tmp_path / "images.npy", np.zeros((2, 8, 8, 3), np.uint8))
    np.save(tmp_path / "masks.npy", np.zeros((3, 8, 8, 6)))
    with pytest.raises(DatasetError, match=r"masks\.npy: shape \(3, 8, 8, 6\) does not match"):
        open_dataset(tmp_path)


# ---------------------------------------------------------------- HoVer-Net .mat


def test_hovernet_mat_gives_inst_map_and_types_as_stored(tmp_path: Path) -> None:
    pixels = save_rgb(tmp_path / "Images" / "c1.png")
    (tmp_path / "Labels").mkdir()
    inst = np.zeros((10, 12), np.int32)
    inst[0:3, 0:3], inst[5:8, 5:9] = 1, 2
    savemat(tmp_path / "Labels" / "c1.mat", {"inst_map": inst, "inst_type": np.array([[4], [7]])})
    assert detect_format(tmp_path) == "hovernet"
    item = open_dataset(tmp_path)[0]
    np.testing.assert_array_equal(item.labels, inst)
    np.testing.assert_array_equal(item.image, pixels)
    assert item.classes == {1: 4, 2: 7} and item.mpp == 0.25


def test_hovernet_image_without_mat_is_an_error_naming_it(tmp_path: Path) -> None:
    save_rgb(tmp_path / "Images" / "c2.png")
    (tmp_path / "Labels").mkdir()
    with pytest.raises(DatasetError, match=r"c2\.png: no labels .*c2\.mat"):
        open_dataset(tmp_path)


# ---------------------------------------------------------------- 2018 Data Science Bowl


def write_dsb_sample(root: Path, sample: str, pixels: np.ndarray, masks: list[np.ndarray]) -> None:
    (root / sample / "images").mkdir(parents=True)
    (root / sample / "masks").mkdir()
    Image.fromarray(pixels).save(root / sample / "images" / f"{sample}.png")
    for k, mask in enumerate(masks):
        Image.fromarray(mask.astype(np.uint8) * 255).save(root / sample / "masks" / f"m{k}.png")


def test_dsb_masks_become_instances_and_rgba_becomes_rgb(tmp_path: Path) -> None:
    rgba = np.random.default_rng(0).integers(0, 256, (6, 7, 4), dtype=np.uint8)
    rgba[..., 3] = 255
    first, second = np.zeros((6, 7), bool), np.zeros((6, 7), bool)
    first[0:2, 0:2], second[3:6, 3:7] = True, True
    write_dsb_sample(tmp_path, "abc", rgba, [first, second])
    assert detect_format(tmp_path) == "dsb"
    item = open_dataset(tmp_path, mpp=0.3)[0]
    assert item.name == "abc" and item.mpp == 0.3
    np.testing.assert_array_equal(item.image, rgba[..., :3])
    np.testing.assert_array_equal(item.labels, first * 1 + second * 2)


def test_dsb_without_mpp_or_masks_is_an_error(tmp_path: Path) -> None:
    write_dsb_sample(tmp_path, "abc", np.zeros((4, 4, 3), np.uint8), [np.ones((4, 4), bool)])
    with pytest.raises(DatasetError, match="no resolution; pass --mpp"):
        open_dataset(tmp_path)
    write_dsb_sample(tmp_path, "nomasks", np.zeros((4, 4, 3), np.uint8), [])
    with pytest.raises(DatasetError, match=r"nomasks\.png: no labels"):
        open_dataset(tmp_path, mpp=0.3)


def test_pannuke_release_layout_is_found_under_the_fold_folder(tmp_path: Path) -> None:
    fold = tmp_path / "Fold 2"
    (fold / "images" / "fold2").mkdir(parents=True)
    (fold / "masks" / "fold2").mkdir(parents=True)
    masks = np.zeros((1, 4, 4, 6))
    masks[0, 1:3, 1:3, 2] = 5
    np.save(fold / "images" / "fold2" / "images.npy", np.full((1, 4, 4, 3), 200, np.uint8))
    np.save(fold / "images" / "fold2" / "types.npy", np.array(["Liver"]))
    np.save(fold / "masks" / "fold2" / "masks.npy", masks)
    item = open_dataset(fold)[0]
    assert item.name == "Fold2-0" and item.group == "Liver"
    assert item.classes == {1: 2} and (item.labels == 1).sum() == 4
