"""CPM-17, CoNSeP and Kumar as HoVer-Net ships them: `Images/NAME.png` + `Labels/NAME.mat`.

Each .mat (MATLAB v5/v7, read with scipy.io.loadmat) holds `inst_map` (H, W), 0 = background,
ids 1..N, and optionally `inst_type` (N, 1): the class of instance id k is `inst_type[k-1]`.
Class ids are kept exactly as the file gives them (CoNSeP: 1..7, see CONSEP_CLASS_NAMES; 0 is
kept too), so nothing is merged or shifted; `class_names` is None because the .mat does not
name its classes.  Files without `inst_type` give classes None.  No resolution is stored:
mpp comes from the image's TIFF tags, else `mpp=`, else 0.25 (these sets are 40x).
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from wsiseg.datasets.dataset import ItemRef
from wsiseg.datasets.image_files import checked_label_map, is_image_file, read_rgb, resolve_mpp
from wsiseg.datasets.item import DatasetError, NucleusItem

#: CoNSeP's type ids (HoVer-Net's README), for users who want names for its class ids.
CONSEP_CLASS_NAMES: dict[int, str] = {
    1: "other", 2: "inflammatory", 3: "healthy epithelial", 4: "dysplastic/malignant epithelial",
    5: "fibroblast", 6: "muscle", 7: "endothelial",
}
#: The resolution of CPM-17, CoNSeP and Kumar (40x), µm per pixel.
HOVERNET_MPP = 0.25


def subfolder(folder: Path, name: str) -> Path | None:
    """The sub-folder of `folder` called `name`, matched case-insensitively, or None."""
    exact = folder / name
    if exact.is_dir():
        return exact
    return next((p for p in sorted(folder.iterdir()) if p.is_dir() and p.name.lower() == name.lower()), None)


def find_mat(image: Path) -> Path | None:
    """`../Labels/NAME.mat` for an image in an `Images/` folder, or None."""
    labels = subfolder(image.parent.parent, "Labels")
    if image.parent.name.lower() != "images" or labels is None:
        return None
    mat = labels / f"{image.stem}.mat"
    return mat if mat.is_file() else None


def list_hovernet(folder: Path, *, mpp: float | None = None) -> list[ItemRef]:
    """One ItemRef per image of `folder/Images`, each with its `folder/Labels/NAME.mat`.

    Raises DatasetError naming the image whose .mat is missing, or the folder when it has no
    Images/ and Labels/ sub-folders.
    """
    images_dir, labels_dir = subfolder(folder, "Images"), subfolder(folder, "Labels")
    if images_dir is None or labels_dir is None:
        raise DatasetError(f"{folder}: no Images/ and Labels/ sub-folders; point at the HoVer-Net split "
                           "folder (e.g. CoNSeP/Train)")
    refs = []
    for image in sorted(p for p in images_dir.iterdir() if p.is_file() and is_image_file(p)):
        mat = labels_dir / f"{image.stem}.mat"
        if not mat.is_file():
            raise DatasetError(f"{image}: no labels {mat}; add the .mat or remove the image")
        refs.append(hovernet_ref(image, mat, image.stem, mpp=mpp))
    return refs


def hovernet_ref(image: Path, mat: Path, name: str, *, stated_mpp: float | None = None,
                 mpp: float | None = None, group: str | None = None, split: str | None = None) -> ItemRef:
    """The ItemRef of one image + .mat; mpp: stated, TIFF tags, `mpp`, then HOVERNET_MPP."""
    resolved = resolve_mpp(image, stated_mpp, fallback=mpp if mpp is not None else HOVERNET_MPP)
    return ItemRef(name=name, source=image, load=functools.partial(load_hovernet, image, mat, resolved, name),
                   group=group, split=split)


def read_hovernet_mat(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """(inst_map (H, W) int32, inst_type (N,) int64 or None) from a HoVer-Net .mat file.

    Raises DatasetError naming the file for MATLAB v7.3 files, a missing inst_map, or
    negative types.
    """
    from scipy.io import loadmat

    try:
        data = loadmat(path, variable_names=("inst_map", "inst_type"))
    except NotImplementedError as exc:
        raise DatasetError(f"{path}: MATLAB v7.3 file; re-save it with save(..., '-v7')") from exc
    except (OSError, ValueError, TypeError) as exc:
        raise DatasetError(f"{path}: not a readable .mat file ({exc}); "
                           "re-save it with MATLAB or scipy.io.savemat") from exc
    if "inst_map" not in data:
        raise DatasetError(f"{path}: no inst_map variable; save the instance map as inst_map")
    inst_map = checked_label_map(np.asarray(data["inst_map"]), path)
    inst_type = None
    if "inst_type" in data:
        inst_type = np.rint(np.asarray(data["inst_type"], dtype=np.float64)).astype(np.int64).ravel()
        if inst_type.size and inst_type.min() < 0:
            raise DatasetError(f"{path}: inst_type holds negative classes; use class ids >= 0")
    return inst_map, inst_type


def load_hovernet(image: Path, mat: Path, mpp: float, name: str) -> NucleusItem:
    """Read one image and its .mat: labels = inst_map, classes = {k: inst_type[k-1]}."""
    rgb = read_rgb(image)
    labels, inst_type = read_hovernet_mat(mat)
    if labels.shape != rgb.shape[:2]:
        raise DatasetError(f"{mat}: inst_map is {labels.shape[1]}x{labels.shape[0]} px but the image {image.name} "
                           f"is {rgb.shape[1]}x{rgb.shape[0]} px; pair each image with its own .mat")
    classes = None
    if inst_type is not None:
        ids = [int(i) for i in np.unique(labels) if i > 0]
        if ids and ids[-1] > inst_type.size:
            raise DatasetError(f"{mat}: inst_map has id {ids[-1]} but inst_type only {inst_type.size} entries; "
                               "give one type per instance id 1..N")
        classes = {i: int(inst_type[i - 1]) for i in ids}
    return NucleusItem(name=name, image=rgb, mpp=mpp, labels=labels, classes=classes, source=image)
