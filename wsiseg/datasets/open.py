"""`open_dataset`: a folder, a CSV manifest or a list of images -> a lazy, split Dataset."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from wsiseg.datasets.csv_manifest import list_csv_manifest
from wsiseg.datasets.dataset import Dataset, ItemRef
from wsiseg.datasets.dispatch import (
    Annotated,
    find_annotation,
    list_annotated_folder,
    make_refs,
    missing_annotation_error,
)
from wsiseg.datasets.dsb import is_dsb_folder, list_dsb
from wsiseg.datasets.hovernet import list_hovernet, subfolder
from wsiseg.datasets.image_files import is_image_file, list_image_files
from wsiseg.datasets.item import DatasetError
from wsiseg.datasets.manifest_json import ManifestEntry, find_manifest, read_manifest
from wsiseg.datasets.pannuke import find_pannuke_arrays, list_pannuke
from wsiseg.datasets.splits import SPLIT_NAMES

PathLike = str | os.PathLike[str]
Lister = Callable[[Path, float | None, tuple[float, float]], list[ItemRef]]


@dataclass(frozen=True)
class DatasetFormat:
    """A dataset layout: its name, what it looks like, how to list a folder of it, and which
    annotation kinds it looks for beside single image files (empty: folders only)."""

    name: str
    layout: str
    list_folder: Lister
    kinds: tuple[str, ...] = ()


def _annotated(kinds: tuple[str, ...]) -> Lister:
    def lister(folder: Path, mpp: float | None, offset_xy: tuple[float, float]) -> list[ItemRef]:
        return list_annotated_folder(folder, kinds, mpp=mpp, offset_xy=offset_xy)

    return lister


def _folder_only(function: Callable[..., list[ItemRef]]) -> Lister:
    def lister(folder: Path, mpp: float | None, offset_xy: tuple[float, float]) -> list[ItemRef]:
        return function(folder, mpp=mpp)

    return functools.wraps(function)(lister)


#: format name -> DatasetFormat, in auto-detection order of their layouts.
FORMATS: dict[str, DatasetFormat] = {
    f.name: f
    for f in (
        DatasetFormat("pannuke", "images.npy + masks.npy (+ types.npy)", _folder_only(list_pannuke)),
        DatasetFormat("hovernet", "Images/NAME.png + Labels/NAME.mat", _folder_only(list_hovernet), ("mat",)),
        DatasetFormat("dsb", "<id>/images/<id>.png + <id>/masks/*.png", _folder_only(list_dsb)),
        DatasetFormat("monuseg", "NAME.tif + NAME.xml(.gz)", _annotated(("xml",)), ("xml",)),
        DatasetFormat("qupath", "NAME.png + NAME.geojson", _annotated(("geojson",)), ("geojson",)),
        DatasetFormat("pairs", "NAME.png + NAME.labels.tif|png|npy", _annotated(("labels", "xml", "geojson")),
                      ("labels", "xml", "geojson")),
    )
}
_ALL_KINDS = ("labels", "xml", "geojson", "mat")


def detect_format(folder: Path) -> str:
    """The FORMATS name of `folder`'s layout.

    PanNuke arrays -> "pannuke"; Images/ + Labels/ -> "hovernet"; `Tissue Images/` +
    `Annotations/` -> "monuseg"; sample folders with images/ -> "dsb"; image files (or a
    manifest.json listing them) -> "pairs", which also reads an image's NAME.xml or
    NAME.geojson when it has no NAME.labels.* file.  Raises DatasetError when none fits.
    """
    if find_pannuke_arrays(folder) is not None:
        return "pannuke"
    if subfolder(folder, "Images") is not None and subfolder(folder, "Labels") is not None:
        return "hovernet"
    if (folder / "Tissue Images").is_dir() and (folder / "Annotations").is_dir():
        return "monuseg"
    if is_dsb_folder(folder):
        return "dsb"
    manifest = find_manifest(folder)
    if list_image_files(folder) or (manifest is not None and manifest.parent == folder):
        return "pairs"
    layouts = "; ".join(f"{f.name}: {f.layout}" for f in FORMATS.values())
    raise DatasetError(f"{folder}: no labelled images found; expected one of these layouts: {layouts}")


def open_dataset(
    spec: PathLike | Sequence[PathLike],
    *,
    format: str | None = None,  # noqa: A002 - the user-facing name
    mpp: float | None = None,
    split: str | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
    offset: tuple[float, float] = (0.0, 0.0),
) -> Dataset:
    """Open labelled nucleus images as a lazy Dataset of NucleusItem.

    spec: a folder (layout auto-detected, or forced with `format`, one of FORMATS), a CSV
    manifest (`image,labels,mpp[,split]`, see csv_manifest), a manifest.json, or a list of
    image files and folders (each image's labels are found beside it: NAME.labels.*,
    NAME.xml(.gz), NAME.geojson, ../Labels/NAME.mat).
    mpp: µm per pixel for images whose files and manifests state none (required for DSB).
    split: None for all images, else only "train" or "val" (or a manifest's "test").
    val_fraction, seed: the seeded split by whole image (see split_images); a manifest's
    split column wins; readers' groups (organ, PanNuke tissue) spread validation over them.
    offset: (x, y) px added to QuPath GeoJSON coordinates (the slide's bounds when QuPath
    cropped to them).

    Raises DatasetError (one line naming the file and the fix) for missing paths, unknown
    formats, empty folders, images without labels or mpp, unreadable manifests.
    """
    if split is not None and split not in SPLIT_NAMES:
        raise ValueError(f"split must be None or one of {', '.join(SPLIT_NAMES)}, got {split!r}")
    if mpp is not None and not mpp > 0:
        raise ValueError(f"mpp must be positive µm per pixel, got {mpp}")
    offset_xy = (float(offset[0]), float(offset[1]))
    if isinstance(spec, (str, os.PathLike)):
        where, refs = Path(spec), _refs_of_path(Path(spec), format, mpp, offset_xy)
    else:
        paths = [Path(p) for p in spec]
        where = paths[0].parent if paths else Path(".")
        refs = _refs_of_list(paths, format, mpp, offset_xy)
    if not refs:
        raise DatasetError(f"{where}: no labelled images found; point at a folder or manifest that lists some")
    dataset = Dataset(refs, val_fraction=val_fraction, seed=seed)
    return dataset.split(split) if split is not None else dataset


def _format(name: str | None, where: Path) -> DatasetFormat | None:
    if name is None:
        return None
    if name not in FORMATS:
        raise DatasetError(f"{where}: unknown dataset format {name!r}; use one of {', '.join(sorted(FORMATS))} "
                           "or leave format unset to detect it")
    return FORMATS[name]


def _refs_of_path(path: Path, format_name: str | None, mpp: float | None,
                  offset_xy: tuple[float, float]) -> list[ItemRef]:
    fmt = _format(format_name, path)
    if path.is_dir():
        fmt = fmt or FORMATS[detect_format(path)]
        return fmt.list_folder(path, mpp, offset_xy)
    if not path.exists():
        raise DatasetError(f"{path}: no such file or folder; check the path")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return list_csv_manifest(path, mpp=mpp, offset_xy=offset_xy)
    if suffix == ".json":
        entries = [Annotated(e.image, e.labels, e.name, e.mpp, e.group)
                   for e in read_manifest(path).values() if e.labels is not None]
        return make_refs(entries, mpp=mpp, offset_xy=offset_xy)
    if is_image_file(path):
        return _refs_of_list([path], format_name, mpp, offset_xy)
    raise DatasetError(f"{path}: not a dataset folder, CSV manifest or image; pass one of those")


def _refs_of_list(paths: list[Path], format_name: str | None, mpp: float | None,
                  offset_xy: tuple[float, float]) -> list[ItemRef]:
    fmt = _format(format_name, paths[0] if paths else Path("."))
    refs: list[ItemRef] = []
    entries: list[Annotated] = []
    manifests: dict[Path, dict[Path, ManifestEntry]] = {}
    for path in paths:
        if path.is_dir() or path.suffix.lower() in (".csv", ".json"):
            refs.extend(_refs_of_path(path, format_name, mpp, offset_xy))
            continue
        if not path.is_file():
            raise DatasetError(f"{path}: no such file; check the path")
        if not is_image_file(path):
            raise DatasetError(f"{path}: not an image (.png, .tif, .jpg); list images, folders or manifests")
        kinds = fmt.kinds if fmt is not None else _ALL_KINDS
        if not kinds:
            raise DatasetError(f"{path}: the {fmt.name if fmt else ''} format reads whole folders; pass its folder")
        annotation = find_annotation(path, kinds)
        if annotation is None:
            raise missing_annotation_error(path, kinds)
        manifest_path = find_manifest(path.parent)
        if manifest_path is not None and manifest_path not in manifests:
            manifests[manifest_path] = read_manifest(manifest_path)
        stated = manifests[manifest_path].get(path.resolve()) if manifest_path is not None else None
        entries.append(Annotated(path, annotation, stated.name if stated else path.stem,
                                 stated.mpp if stated else None, stated.group if stated else None))
    return refs + make_refs(entries, mpp=mpp, offset_xy=offset_xy)
