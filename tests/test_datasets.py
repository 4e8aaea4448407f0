"""Rules of wsiseg.datasets: generic pairs, manifests, lazy access, splits and bad input.

Every test writes its own tiny files (a few pixels) in tmp_path."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
from PIL import Image

import wsiseg.datasets as datasets
from wsiseg.datasets import DatasetError, open_dataset, split_images


def rgb(h: int = 6, w: int = 8, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def labels_with(ids: list[int], h: int = 6, w: int = 8) -> np.ndarray:
    lab = np.zeros((h, w), np.int32)
    for k, i in enumerate(ids):
        lab[k, : k + 2] = i
    return lab


def write_pair(folder: Path, name: str, image: np.ndarray, labels: np.ndarray, *, label_ext: str = ".tif",
               image_ext: str = ".png", mpp: float | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}{image_ext}"
    if image_ext in (".tif", ".tiff"):
        res: dict[str, Any] = {}
        if mpp is not None:
            res = {"resolution": (1e4 / mpp, 1e4 / mpp), "resolutionunit": "CENTIMETER"}
        tifffile.imwrite(path, image, **res)
    else:
        Image.fromarray(image).save(path)
    lab_path = folder / f"{name}.labels{label_ext}"
    if label_ext == ".npy":
        np.save(lab_path, labels)
    elif label_ext == ".png":
        Image.fromarray(labels.astype(np.uint16)).save(lab_path)
    else:
        tifffile.imwrite(lab_path, labels.astype(np.uint16))
    return path


def write_manifest(path: Path, items: list[dict[str, object]]) -> None:
    path.write_text(json.dumps({"items": items}))


# ---------------------------------------------------------------- generic pairs


def test_pairs_folder_reads_images_labels_and_manifest_json_mpp_from_the_parent(tmp_path: Path) -> None:
    folder = tmp_path / "monuseg"
    a, b = rgb(seed=1), rgb(seed=2)
    write_pair(folder, "a", a, labels_with([1, 2]), label_ext=".tif")
    write_pair(folder, "b", b, labels_with([5]), label_ext=".npy", image_ext=".jpg")
    write_manifest(tmp_path / "manifest.json", [
        {"name": "a", "image": "monuseg/a.png", "labels": "monuseg/a.labels.tif", "mpp": 0.2527, "organ": "lung (x)"},
        {"name": "b", "image": "monuseg/b.jpg", "labels": "monuseg/b.labels.npy", "mpp": 0.5, "organ": "breast"},
    ])
    ds = open_dataset(folder)
    assert ds.names == ["a", "b"]
    items = {item.name: item for item in ds}
    assert items["a"].mpp == pytest.approx(0.2527) and items["b"].mpp == pytest.approx(0.5)
    assert items["a"].group == "lung" and items["b"].group == "breast"
    np.testing.assert_array_equal(items["a"].image, a)
    np.testing.assert_array_equal(items["a"].labels, labels_with([1, 2]))
    assert items["b"].image.shape == (6, 8, 3) and items["b"].labels.max() == 5  # JPEG: lossy pixels
    assert items["a"].labels.dtype == np.int32 and items["a"].classes is None
    assert items["a"].source == folder / "a.png"


def test_folder_whose_manifest_json_lists_the_images_opens_through_it(tmp_path: Path) -> None:
    write_pair(tmp_path / "sub", "a", rgb(), labels_with([1]))
    write_manifest(tmp_path / "manifest.json",
                   [{"name": "a", "image": "sub/a.png", "labels": "sub/a.labels.tif", "mpp": 0.25}])
    ds = open_dataset(tmp_path)
    assert ds.names == ["a"] and ds[0].mpp == 0.25


def test_non_consecutive_label_ids_are_preserved(tmp_path: Path) -> None:
    ids = [3, 17, 40000]
    for ext in (".tif", ".png", ".npy"):
        write_pair(tmp_path / ext[1:], "x", rgb(), labels_with(ids), label_ext=ext)
        item = open_dataset(tmp_path / ext[1:], mpp=0.5)[0]
        assert sorted(np.unique(item.labels).tolist()) == [0, *ids], ext


def test_tiff_resolution_tags_give_mpp_and_mpp_argument_is_the_fallback(tmp_path: Path) -> None:
    write_pair(tmp_path / "tagged", "t", rgb(), labels_with([1]), image_ext=".tif", mpp=0.5)
    assert open_dataset(tmp_path / "tagged", mpp=0.25)[0].mpp == pytest.approx(0.5)
    write_pair(tmp_path / "plain", "p", rgb(), labels_with([1]))
    assert open_dataset(tmp_path / "plain", mpp=0.25)[0].mpp == 0.25


def test_missing_mpp_names_the_image_and_says_pass_mpp(tmp_path: Path) -> None:
    write_pair(tmp_path, "p", rgb(), labels_with([1]))
    with pytest.raises(DatasetError, match=r"p\.png.*mpp="):
        open_dataset(tmp_path)


def test_rgba_and_grey_images_become_rgb(tmp_path: Path) -> None:
    colour = rgb()
    rgba = np.dstack([colour, np.full(colour.shape[:2], 255, np.uint8)])
    rgba[0, 0] = (10, 20, 30, 0)  # transparent: white after compositing
    write_pair(tmp_path / "rgba", "r", rgba, labels_with([1]))
    item = open_dataset(tmp_path / "rgba", mpp=0.5)[0]
    assert item.image.shape == (6, 8, 3) and item.image.dtype == np.uint8
    np.testing.assert_array_equal(item.image[1:], colour[1:])
    assert item.image[0, 0].tolist() == [255, 255, 255]
    grey = colour[..., 0]
    write_pair(tmp_path / "grey", "g", grey, labels_with([1]))
    item = open_dataset(tmp_path / "grey", mpp=0.5)[0]
    np.testing.assert_array_equal(item.image, np.repeat(grey[..., None], 3, axis=2))


def test_csv_manifest_dispatches_on_label_suffix_and_its_split_column_wins(tmp_path: Path) -> None:
    write_pair(tmp_path / "d", "a", rgb(seed=1), labels_with([2]), label_ext=".npy")
    write_pair(tmp_path / "d", "b", rgb(seed=2), labels_with([1, 2]))
    (tmp_path / "d" / "c.png").write_bytes((tmp_path / "d" / "a.png").read_bytes())
    (tmp_path / "d" / "c.xml").write_text(
        '<Annotations MicronsPerPixel="0.3"><Annotation><Regions><Region><Vertices>'
        '<Vertex X="1" Y="1"/><Vertex X="4" Y="1"/><Vertex X="4" Y="3"/></Vertices></Region></Regions>'
        "</Annotation></Annotations>"
    )
    (tmp_path / "list.csv").write_text(
        "image,labels,mpp,split\n"
        "d/a.png,d/a.labels.npy,0.25,val\n"
        "d/b.png,d/b.labels.tif,0.5,train\n"
        "d/c.png,d/c.xml,,train\n"
    )
    ds = open_dataset(tmp_path / "list.csv", val_fraction=0.5, seed=3)
    assert ds.splits == {"a": "val", "b": "train", "c": "train"}
    assert open_dataset(tmp_path / "list.csv", split="val").names == ["a"]
    items = {item.name: item for item in ds}
    assert [items[n].mpp for n in "abc"] == [0.25, 0.5, 0.3]
    assert items["a"].split == "val" and items["b"].split == "train"
    assert items["c"].labels.max() == 1 and items["c"].labels[1, 1:5].tolist() == [1, 1, 1, 1]


def test_list_of_image_files_finds_labels_beside_each(tmp_path: Path) -> None:
    a = write_pair(tmp_path, "a", rgb(seed=1), labels_with([4]))
    b = write_pair(tmp_path, "b", rgb(seed=2), labels_with([7]), label_ext=".png")
    write_pair(tmp_path, "unlisted", rgb(seed=3), labels_with([1]))
    ds = open_dataset([str(b), a], mpp=0.5)
    assert ds.names == ["b", "a"]
    assert ds[0].labels.max() == 7 and ds[1].labels.max() == 4


def test_images_are_read_on_access_not_on_open(tmp_path: Path) -> None:
    write_pair(tmp_path, "good", rgb(), labels_with([1]))
    write_pair(tmp_path, "zbroken", rgb(), labels_with([1]))
    (tmp_path / "zbroken.png").write_bytes(b"\x89PNG not really")
    ds = open_dataset(tmp_path, mpp=0.5)
    assert len(ds) == 2 and ds[0].name == "good"
    with pytest.raises(DatasetError, match="zbroken.png"):
        ds[1]


def test_dataset_pickles_for_worker_processes(tmp_path: Path) -> None:
    write_pair(tmp_path, "a", rgb(), labels_with([9]))
    ds = open_dataset(tmp_path, mpp=0.5)
    clone = pickle.loads(pickle.dumps(ds))
    np.testing.assert_array_equal(clone[0].labels, ds[0].labels)
    assert clone.splits == ds.splits


# ---------------------------------------------------------------- splits


def test_split_is_deterministic_disjoint_and_sized_by_val_fraction() -> None:
    names = [f"img{i:02d}" for i in range(30)]
    first = split_images(names, 0.2, seed=7)
    assert split_images(names, 0.2, seed=7) == first
    assert set(split_images(list(reversed(names)), 0.2, seed=7)["val"]) == set(first["val"])
    assert len(first["val"]) == 6 and not set(first["val"]) & set(first["train"])
    assert sorted(first["val"] + first["train"]) == names
    assert first["val"] != split_images(names, 0.2, seed=8)["val"]


def test_two_images_give_one_validation_image_and_one_gives_none() -> None:
    assert len(split_images(["a", "b"], 0.2, 0)["val"]) == 1
    assert split_images(["a"], 0.2, 0) == {"train": ["a"], "val": []}
    assert split_images(["a", "b", "c"], 0.0, 0)["val"] == []


def test_groups_put_one_image_of_each_group_in_validation() -> None:
    names = [f"{organ}{i}" for organ in ("lung", "kidney", "colon") for i in range(4)]
    groups = {n: n.rstrip("0123456789") for n in names}
    for seed in range(5):
        val = split_images(names, 0.25, seed, groups=groups)["val"]
        assert len(val) == 3 and {groups[n] for n in val} == {"lung", "kidney", "colon"}


def test_dataset_split_and_split_argument_agree(tmp_path: Path) -> None:
    for i in range(5):
        write_pair(tmp_path, f"i{i}", rgb(seed=i), labels_with([1]))
    ds = open_dataset(tmp_path, mpp=0.5, val_fraction=0.4, seed=1)
    val, train = ds.split("val"), ds.split("train")
    assert len(val) == 2 and len(train) == 3 and not set(val.names) & set(train.names)
    assert open_dataset(tmp_path, mpp=0.5, val_fraction=0.4, seed=1, split="val").names == val.names
    assert all(item.split == "val" for item in val)
    assert open_dataset(tmp_path, mpp=0.5, val_fraction=0.4, seed=1).splits == ds.splits


# ---------------------------------------------------------------- bad input


def test_image_without_labels_is_an_error_naming_it(tmp_path: Path) -> None:
    write_pair(tmp_path, "a", rgb(), labels_with([1]))
    Image.fromarray(rgb()).save(tmp_path / "lonely.png")
    with pytest.raises(DatasetError, match=r"lonely\.png: no labels found"):
        open_dataset(tmp_path, mpp=0.5)


def test_label_shape_mismatch_names_the_labels_file(tmp_path: Path) -> None:
    write_pair(tmp_path, "a", rgb(6, 8), labels_with([1], 5, 8))
    with pytest.raises(DatasetError, match=r"a\.labels\.tif: labels are 8x5 px but the image a\.png is 8x6"):
        open_dataset(tmp_path, mpp=0.5)[0]


def test_sixteen_bit_image_is_rejected_as_non_rgb(tmp_path: Path) -> None:
    write_pair(tmp_path, "deep", rgb().astype(np.uint16) * 200, labels_with([1]), image_ext=".tif")
    with pytest.raises(DatasetError, match=r"deep\.tif: pixels are uint16; convert the image to 8-bit RGB"):
        open_dataset(tmp_path, mpp=0.5)[0]


def test_colour_label_image_is_rejected(tmp_path: Path) -> None:
    write_pair(tmp_path, "a", rgb(), labels_with([1]))
    Image.fromarray(rgb()).save(tmp_path / "a.labels.png")
    (tmp_path / "a.labels.tif").unlink()
    with pytest.raises(DatasetError, match=r"a\.labels\.png: label image has mode RGB"):
        open_dataset(tmp_path, mpp=0.5)[0]


def test_unknown_format_empty_folder_and_missing_path_are_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="unknown dataset format 'coco'"):
        open_dataset(tmp_path, format="coco")
    with pytest.raises(DatasetError, match="no labelled images found"):
        open_dataset(tmp_path)
    with pytest.raises(DatasetError, match="nowhere: no such file or folder"):
        open_dataset(tmp_path / "nowhere")


def test_csv_manifest_errors_name_the_csv(tmp_path: Path) -> None:
    (tmp_path / "no_labels.csv").write_text("image,mpp\na.png,0.25\n")
    with pytest.raises(DatasetError, match=r"no_labels\.csv: missing column\(s\) labels"):
        open_dataset(tmp_path / "no_labels.csv")
    write_pair(tmp_path, "a", rgb(), labels_with([1]))
    (tmp_path / "bad_mpp.csv").write_text("image,labels,mpp\na.png,a.labels.tif,forty\n")
    with pytest.raises(DatasetError, match=r"bad_mpp\.csv:2: mpp 'forty' is not a number"):
        open_dataset(tmp_path / "bad_mpp.csv")
    (tmp_path / "gone.csv").write_text("image,labels,mpp\na.png,gone.labels.tif,0.25\n")
    with pytest.raises(DatasetError, match=r"gone\.labels\.tif: labels not found"):
        open_dataset(tmp_path / "gone.csv")


def test_error_messages_are_one_line(tmp_path: Path) -> None:
    Image.fromarray(rgb()).save(tmp_path / "lonely.png")
    with pytest.raises(DatasetError) as info:
        open_dataset(tmp_path, mpp=0.5)
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------- package


def test_every_public_name_resolves() -> None:
    for name in datasets.__all__:
        assert getattr(datasets, name) is not None


def test_import_wsiseg_datasets_is_cheap(tmp_path: Path) -> None:
    code = ("import sys, wsiseg.datasets; "
            "print(sorted(m for m in ('torch', 'dask', 'zarr', 'scipy', 'skimage') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path)
    assert out.stdout.strip() == "[]"
