"""Generic pairs: `NAME.<png|tif|tiff|jpg|jpeg>` beside `NAME.labels.<tif|tiff|png|npy>`.

The label map is an instance map of the image's height and width (0 = background, any
positive ids, kept as they are).  mpp comes from a manifest.json (see manifest_json), the
image's TIFF resolution tags or the user's `mpp=`, in that order.
"""

from __future__ import annotations

from pathlib import Path

from wsiseg.datasets.image_files import LABEL_SUFFIXES, find_beside, read_label_map, read_rgb
from wsiseg.datasets.item import DatasetError, NucleusItem


def find_label_file(image: Path) -> Path | None:
    """`NAME.labels.<tif|tiff|png|npy>` beside `image` (first found in that order), or None."""
    return find_beside(image, LABEL_SUFFIXES, infix=".labels")


def load_pair(image: Path, labels: Path, mpp: float, name: str) -> NucleusItem:
    """Read one image and its label map.

    Returns a NucleusItem with image (H, W, 3) uint8 RGB, labels (H, W) int32 (ids as stored),
    classes None.  Raises DatasetError naming the file for unreadable or non-RGB images,
    non-integer or colour label maps, and a label map whose size differs from the image's.
    """
    rgb = read_rgb(image)
    label_map = read_label_map(labels)
    if label_map.shape != rgb.shape[:2]:
        raise DatasetError(
            f"{labels}: labels are {label_map.shape[1]}x{label_map.shape[0]} px but the image {image.name} is "
            f"{rgb.shape[1]}x{rgb.shape[0]} px; save labels of the image's size"
        )
    return NucleusItem(name=name, image=rgb, mpp=mpp, labels=label_map, source=image)
