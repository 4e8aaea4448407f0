"""PanNuke folds: `images.npy`, `masks.npy` and `types.npy` of one fold.

Layout: the three files in one folder, or the release layout `images/<fold>/images.npy`,
`images/<fold>/types.npy`, `masks/<fold>/masks.npy` under the given folder.
  images.npy  (N, 256, 256, 3) float (0..255) or uint8 RGB
  masks.npy   (N, 256, 256, 6): channels 0-4 are per-class instance maps (Neoplastic,
              Inflammatory, Connective, Dead, Epithelial), channel 5 is background
  types.npy   (N,) tissue names (optional here; they become the items' groups)
Items are named `<fold>-<index>` (fold: the folder's name without spaces or odd characters).
Instance ids of different channels may collide, so every (channel, id) becomes a new id,
1..M in channel order then id order; a later channel wins where two overlap.  Class ids are
the channel (0..4).  PanNuke is scanned at 40x: mpp 0.25 unless `mpp=` is given.  Arrays are
memory-mapped, so listing a fold reads only the file headers.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import numpy as np

from wsiseg.datasets.dataset import ItemRef
from wsiseg.datasets.item import DatasetError, NucleusItem

#: Class id (mask channel) -> PanNuke class name.
PANNUKE_CLASS_NAMES: dict[int, str] = {0: "Neoplastic", 1: "Inflammatory", 2: "Connective", 3: "Dead", 4: "Epithelial"}
#: PanNuke's resolution (40x), µm per pixel.
PANNUKE_MPP = 0.25


def find_pannuke_arrays(folder: Path) -> tuple[Path, Path, Path | None] | None:
    """(images.npy, masks.npy, types.npy or None) of the fold in `folder`, or None."""
    images, masks = folder / "images.npy", folder / "masks.npy"
    if images.is_file() and masks.is_file():
        types = folder / "types.npy"
        return images, masks, types if types.is_file() else None
    found_images = sorted(folder.glob("images/*/images.npy"))
    found_masks = sorted(folder.glob("masks/*/masks.npy"))
    if len(found_images) == 1 and len(found_masks) == 1:
        types = found_images[0].parent / "types.npy"
        return found_images[0], found_masks[0], types if types.is_file() else None
    return None


@functools.lru_cache(maxsize=8)
def _open_array(path: str) -> np.ndarray:
    try:
        array: np.ndarray = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise DatasetError(f"{path}: not a readable .npy array ({exc}); save it with numpy.save") from exc
    return array


def list_pannuke(folder: Path, *, mpp: float | None = None) -> list[ItemRef]:
    """One ItemRef per image of the fold in `folder`.

    Raises DatasetError naming the file when the arrays are missing or their shapes disagree.
    """
    found = find_pannuke_arrays(folder)
    if found is None:
        raise DatasetError(f"{folder}: no images.npy and masks.npy of a PanNuke fold; point at the fold's folder")
    images_path, masks_path, types_path = found
    images, masks = _open_array(str(images_path)), _open_array(str(masks_path))
    if images.ndim != 4 or images.shape[3] != 3:
        raise DatasetError(f"{images_path}: shape {images.shape} is not (N, H, W, 3); use PanNuke's images.npy")
    if masks.ndim != 4 or masks.shape[:3] != images.shape[:3] or masks.shape[3] < 5:
        raise DatasetError(f"{masks_path}: shape {masks.shape} does not match images {images.shape[:3]} "
                           "with 6 channels; use the masks.npy of the same fold")
    tissues: list[str | None] = [None] * images.shape[0]
    if types_path is not None:
        types = np.load(types_path, allow_pickle=False)
        if types.shape != (images.shape[0],):
            raise DatasetError(f"{types_path}: {types.shape[0] if types.ndim else 0} tissue names for "
                               f"{images.shape[0]} images; use the types.npy of the same fold")
        tissues = [str(t) for t in types.tolist()]
    fold = re.sub(r"[^A-Za-z0-9._-]+", "", folder.name) or "fold"
    resolved_mpp = mpp if mpp is not None else PANNUKE_MPP
    return [
        ItemRef(
            name=f"{fold}-{i}",
            source=images_path,
            load=functools.partial(load_pannuke, images_path, masks_path, i, f"{fold}-{i}", resolved_mpp, tissues[i]),
            group=tissues[i],
        )
        for i in range(images.shape[0])
    ]


def pannuke_instances(mask: np.ndarray) -> tuple[np.ndarray, dict[int, int]]:
    """(labels (H, W) int32, {instance id: class id}) from one (H, W, 6) PanNuke mask.

    Ids are renumbered 1..M over channels 0-4 in order (then by original id), so ids that
    collide across channels become distinct; channel 5 (background) is ignored.
    """
    labels = np.zeros(mask.shape[:2], np.int32)
    classes: dict[int, int] = {}
    next_id = 1
    for channel in range(min(5, mask.shape[2])):
        plane = np.rint(np.asarray(mask[..., channel])).astype(np.int64)
        ids, inverse = np.unique(plane, return_inverse=True)
        inverse = inverse.reshape(plane.shape)
        new_ids = np.zeros(ids.size, np.int32)
        positive = ids > 0
        new_ids[positive] = np.arange(next_id, next_id + int(positive.sum()), dtype=np.int32)
        for new_id in new_ids[positive].tolist():
            classes[new_id] = channel
        next_id += int(positive.sum())
        inside = plane > 0
        labels[inside] = new_ids[inverse[inside]]
    present = set(np.unique(labels).tolist())
    return labels, {i: c for i, c in classes.items() if i in present}


def load_pannuke(
    images_path: Path, masks_path: Path, index: int, name: str, mpp: float, tissue: str | None
) -> NucleusItem:
    """Read image `index` of a fold: RGB uint8 (floats rounded and clipped to 0..255)."""
    pixels = np.asarray(_open_array(str(images_path))[index])
    if pixels.dtype != np.uint8:
        pixels = np.clip(np.rint(pixels), 0, 255).astype(np.uint8)
    labels, classes = pannuke_instances(np.asarray(_open_array(str(masks_path))[index]))
    return NucleusItem(name=name, image=pixels, mpp=mpp, labels=labels, classes=classes,
                       class_names=dict(PANNUKE_CLASS_NAMES), source=images_path, group=tissue)
