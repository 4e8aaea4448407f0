"""Labelled nucleus datasets: one reader per format, one item type (NucleusItem).

    from wsiseg.datasets import open_dataset
    train = open_dataset("data/monuseg", split="train")   # format detected from the layout
    item = train[0]            # read on access: item.image (H, W, 3) uint8, item.labels (H, W) int32
    val = open_dataset("manifest.csv", split="val")

Formats (`format=`): "pairs" (NAME.png + NAME.labels.tif|png|npy), "monuseg" (+ ImageScope
NAME.xml[.gz]), "qupath" (+ NAME.geojson), "pannuke" (images.npy + masks.npy), "hovernet"
(Images/ + Labels/*.mat), "dsb" (<id>/images + <id>/masks).  Splits are by whole image,
seeded (split_images).  Every bad input raises DatasetError with one line naming the file.

`import wsiseg.datasets` is cheap: names load on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from wsiseg._lazy import lazy_attributes

if TYPE_CHECKING:
    from wsiseg.datasets.dataset import Dataset, ItemRef
    from wsiseg.datasets.hovernet import CONSEP_CLASS_NAMES, read_hovernet_mat
    from wsiseg.datasets.image_files import read_label_map, read_rgb
    from wsiseg.datasets.item import DatasetError, NucleusItem
    from wsiseg.datasets.monuseg import rasterise_regions, read_imagescope_regions
    from wsiseg.datasets.open import FORMATS, DatasetFormat, detect_format, open_dataset
    from wsiseg.datasets.pannuke import PANNUKE_CLASS_NAMES, pannuke_instances
    from wsiseg.datasets.qupath import QuPathNucleus, rasterise_nuclei, read_qupath_nuclei
    from wsiseg.datasets.splits import split_images

_LAZY: dict[str, str] = {
    **dict.fromkeys(("Dataset", "ItemRef"), "wsiseg.datasets.dataset"),
    **dict.fromkeys(("CONSEP_CLASS_NAMES", "read_hovernet_mat"), "wsiseg.datasets.hovernet"),
    **dict.fromkeys(("read_label_map", "read_rgb"), "wsiseg.datasets.image_files"),
    **dict.fromkeys(("DatasetError", "NucleusItem"), "wsiseg.datasets.item"),
    **dict.fromkeys(("rasterise_regions", "read_imagescope_regions"), "wsiseg.datasets.monuseg"),
    **dict.fromkeys(("FORMATS", "DatasetFormat", "detect_format", "open_dataset"), "wsiseg.datasets.open"),
    **dict.fromkeys(("PANNUKE_CLASS_NAMES", "pannuke_instances"), "wsiseg.datasets.pannuke"),
    **dict.fromkeys(("QuPathNucleus", "rasterise_nuclei", "read_qupath_nuclei"), "wsiseg.datasets.qupath"),
    "split_images": "wsiseg.datasets.splits",
}

__all__ = sorted(_LAZY)

__getattr__, __dir__ = lazy_attributes(__name__, _LAZY, globals(), __all__)
