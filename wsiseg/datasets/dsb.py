"""2018 Data Science Bowl (stage 1): `<id>/images/<id>.png` + `<id>/masks/*.png`.

Each mask PNG is one nucleus (non-zero pixels); nucleus k (masks sorted by file name) gets
instance id k + 1, a later mask winning where two overlap.  Images may be RGBA or grey and
are converted to RGB.  The data carries no resolution and mixes microscopes: `mpp=` is
required.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from wsiseg.datasets.dataset import ItemRef
from wsiseg.datasets.image_files import is_image_file, read_rgb
from wsiseg.datasets.item import DatasetError, NucleusItem


def is_dsb_folder(folder: Path) -> bool:
    """True when some sub-folder of `folder` has an `images/` folder (the DSB layout)."""
    return any(p.is_dir() and (p / "images").is_dir() for p in folder.iterdir())


def list_dsb(folder: Path, *, mpp: float | None = None) -> list[ItemRef]:
    """One ItemRef per `<id>/` sub-folder holding `images/`.

    Raises DatasetError when mpp is None, or naming the image whose `masks/` is missing or
    empty, or the `images/` folder that holds no single image.
    """
    if mpp is None:
        raise DatasetError(f"{folder}: the 2018 Data Science Bowl data has no resolution; "
                           "pass --mpp (wsiseg eval) or --data-mpp (wsiseg train; data_mpp in a recipe; mpp= in Python) "
                           "for the images (e.g. 0.25)")
    refs = []
    for sample in sorted(p for p in folder.iterdir() if p.is_dir() and (p / "images").is_dir()):
        images = sorted(p for p in (sample / "images").iterdir() if p.is_file() and is_image_file(p))
        preferred = [p for p in images if p.stem == sample.name]
        if len(preferred) != 1 and len(images) != 1:
            raise DatasetError(f"{sample / 'images'}: expected one image ({sample.name}.png), found {len(images)}; "
                               "keep one image per sample folder")
        image = preferred[0] if preferred else images[0]
        masks_dir = sample / "masks"
        if not masks_dir.is_dir() or not any(_mask_files(masks_dir)):
            raise DatasetError(f"{image}: no labels ({masks_dir} has no mask PNGs); add the masks or remove the sample")
        refs.append(ItemRef(name=sample.name, source=image,
                            load=functools.partial(load_dsb, image, masks_dir, float(mpp), sample.name)))
    return refs


def _mask_files(masks_dir: Path) -> list[Path]:
    return sorted(p for p in masks_dir.iterdir() if p.is_file() and p.suffix.lower() == ".png")


def load_dsb(image: Path, masks_dir: Path, mpp: float, name: str) -> NucleusItem:
    """Read one sample: the image as RGB and its per-nucleus masks as an instance map."""
    from PIL import Image

    rgb = read_rgb(image)
    height, width = rgb.shape[:2]
    labels = np.zeros((height, width), np.int32)
    for k, mask_path in enumerate(_mask_files(masks_dir), start=1):
        with Image.open(mask_path) as mask_image:
            mask = np.asarray(mask_image.convert("L")) > 0
        if mask.shape != labels.shape:
            raise DatasetError(f"{mask_path}: mask is {mask.shape[1]}x{mask.shape[0]} px but the image is "
                               f"{width}x{height} px; keep only this sample's masks here")
        labels[mask] = k
    return NucleusItem(name=name, image=rgb, mpp=mpp, labels=labels, source=image)
