"""Image + annotation file -> ItemRef, choosing the reader by the annotation's kind.

Kinds, by file name: "labels" (`.tif`/`.tiff`/`.png`/`.npy` label map, generic pairs),
"xml" (`.xml`/`.xml.gz`, MoNuSeg), "geojson" (`.geojson`/`.geojson.gz`/`.json`, QuPath),
"mat" (`.mat`, HoVer-Net).  Beside an image they are looked for as `NAME.labels.<ext>`,
`NAME.xml[.gz]` (or `../Annotations/`), `NAME.geojson[.gz]` and `../Labels/NAME.mat`.

mpp of each image, first found: the value stated by a manifest (CSV cell or manifest.json),
the XML's MicronsPerPixel, the image's TIFF tags, the user's `mpp=`, the format's nominal
value (HoVer-Net sets: 0.25); none -> DatasetError naming the image.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from wsiseg.datasets.dataset import ItemRef
from wsiseg.datasets.hovernet import find_mat, hovernet_ref
from wsiseg.datasets.image_files import LABEL_SUFFIXES, list_image_files, resolve_mpp
from wsiseg.datasets.item import DatasetError
from wsiseg.datasets.manifest_json import ManifestEntry, find_manifest, read_manifest
from wsiseg.datasets.monuseg import find_xml, load_monuseg, read_xml_mpp
from wsiseg.datasets.pairs import find_label_file, load_pair
from wsiseg.datasets.qupath import collect_class_names, find_geojson, load_qupath

#: kind -> finder of that kind's annotation beside an image, in lookup order.
ANNOTATION_FINDERS: dict[str, Callable[[Path], Path | None]] = {
    "labels": find_label_file,
    "xml": find_xml,
    "geojson": find_geojson,
    "mat": find_mat,
}
_EXPECTED = {
    "labels": "NAME.labels.tif|png|npy",
    "xml": "NAME.xml(.gz)",
    "geojson": "NAME.geojson",
    "mat": "../Labels/NAME.mat",
}


@dataclass(frozen=True)
class Annotated:
    """An image with its annotation file; mpp/group/split as a manifest states them (or None)."""

    image: Path
    annotation: Path
    name: str
    mpp: float | None = None
    group: str | None = None
    split: str | None = None


def annotation_kind(path: Path) -> str | None:
    """"labels", "xml", "geojson" or "mat" from the file name, or None."""
    name = path.name.lower()
    if name.endswith((".xml", ".xml.gz")):
        return "xml"
    if name.endswith((".geojson", ".geojson.gz", ".json")):
        return "geojson"
    if name.endswith(".mat"):
        return "mat"
    if path.suffix.lower() in LABEL_SUFFIXES:
        return "labels"
    return None


def find_annotation(image: Path, kinds: Sequence[str]) -> Path | None:
    """The first annotation of `kinds` (in that order) found beside `image`, or None."""
    for kind in kinds:
        found = ANNOTATION_FINDERS[kind](image)
        if found is not None:
            return found
    return None


def missing_annotation_error(image: Path, kinds: Sequence[str]) -> DatasetError:
    """The error for an image without labels, naming what was looked for."""
    expected = " or ".join(_EXPECTED[k] for k in kinds)
    return DatasetError(f"{image}: no labels found (looked for {expected}); add them or remove the image")


def make_refs(
    entries: Sequence[Annotated], *, mpp: float | None = None, offset_xy: tuple[float, float] = (0.0, 0.0)
) -> list[ItemRef]:
    """One ItemRef per entry.  QuPath entries share one sorted class list, read from all of
    their GeoJSON files here (an empty file raises DatasetError now, not on access)."""
    kinds = []
    for entry in entries:
        kind = annotation_kind(entry.annotation)
        if kind is None:
            raise DatasetError(f"{entry.annotation}: unknown annotation type; use a label map (.tif/.png/.npy), "
                               "an ImageScope .xml, a QuPath .geojson or a HoVer-Net .mat")
        if not entry.image.is_file():
            raise DatasetError(f"{entry.image}: image not found; fix the path")
        if not entry.annotation.is_file():
            raise DatasetError(f"{entry.annotation}: labels not found for {entry.image.name}; fix the path")
        kinds.append(kind)
    class_order = collect_class_names(e.annotation for e, k in zip(entries, kinds) if k == "geojson")
    refs = []
    for entry, kind in zip(entries, kinds):
        image, annotation, name = entry.image, entry.annotation, entry.name
        if kind == "mat":
            refs.append(hovernet_ref(image, annotation, name, stated_mpp=entry.mpp, mpp=mpp, group=entry.group,
                                     split=entry.split))
            continue
        if kind == "xml":
            resolved = resolve_mpp(image, entry.mpp, read_xml_mpp(annotation), fallback=mpp)
            load = functools.partial(load_monuseg, image, annotation, resolved, name)
        elif kind == "geojson":
            resolved = resolve_mpp(image, entry.mpp, fallback=mpp)
            load = functools.partial(load_qupath, image, annotation, resolved, name, class_order, offset_xy)
        else:
            resolved = resolve_mpp(image, entry.mpp, fallback=mpp)
            load = functools.partial(load_pair, image, annotation, resolved, name)
        refs.append(ItemRef(name=name, source=image, load=load, group=entry.group, split=entry.split))
    return refs


def list_annotated_folder(
    folder: Path,
    kinds: Sequence[str],
    *,
    mpp: float | None = None,
    offset_xy: tuple[float, float] = (0.0, 0.0),
) -> list[ItemRef]:
    """Every image of `folder` (or of its `Tissue Images/` sub-folder, MoNuSeg's release
    layout) with its annotation of the first of `kinds` found; mpp, group and name from a
    manifest.json in the folder or its parent.  A folder with no images but a manifest.json
    listing images and labels is read through the manifest.

    Raises DatasetError naming the first image without an annotation, or the folder when it
    holds no image.
    """
    tissue_images = folder / "Tissue Images"
    image_dir = tissue_images if "xml" in kinds and tissue_images.is_dir() else folder
    images = list_image_files(image_dir)
    manifest_path = find_manifest(folder)
    manifest: dict[Path, ManifestEntry] = read_manifest(manifest_path) if manifest_path is not None else {}
    if not images and manifest_path is not None and manifest_path.parent == folder:
        entries = [
            Annotated(e.image, e.labels, e.name, e.mpp, e.group)
            for e in manifest.values()
            if e.labels is not None and annotation_kind(e.labels) in kinds
        ]
        if entries:
            return make_refs(entries, mpp=mpp, offset_xy=offset_xy)
    if not images:
        raise DatasetError(f"{folder}: no images found (.png, .tif, .jpg); point at the folder that holds them")
    entries = []
    for image in images:
        annotation = find_annotation(image, kinds)
        if annotation is None:
            raise missing_annotation_error(image, kinds)
        stated = manifest.get(image.resolve())
        entries.append(Annotated(
            image, annotation, stated.name if stated else image.stem,
            stated.mpp if stated else None, stated.group if stated else None,
        ))
    return make_refs(entries, mpp=mpp, offset_xy=offset_xy)
