"""The one item type every dataset reader returns: a labelled H&E image."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


class DatasetError(ValueError):
    """Bad dataset input (missing labels, shape mismatch, non-RGB image, empty annotations).

    The message is one line that names the offending file and, where there is one, the fix.
    """


@dataclass
class NucleusItem:
    """One labelled image.

    name: a unique, filesystem-safe name within its dataset (e.g. the image stem).
    image: (H, W, 3) uint8 RGB.
    mpp: µm per pixel of `image`.
    labels: (H, W) int32 instance map, 0 = background, each nucleus one positive id (ids need
        not be consecutive).
    classes: optional {instance id: class id (>= 0)}; None when the data has no classes.
    class_names: optional {class id: name}.
    source: the file the image came from (for messages), or None.
    split: "train", "val" (or "test"), as assigned by its Dataset; None outside one.
    group: what the image belongs to for stratified splits (organ, tissue type), or None.
    """

    name: str
    image: np.ndarray
    mpp: float
    labels: np.ndarray
    classes: dict[int, int] | None = None
    class_names: dict[int, str] | None = None
    source: Path | None = None
    split: str | None = field(default=None)
    group: str | None = field(default=None)

    def __post_init__(self) -> None:
        where = self.source or self.name
        image = np.asarray(self.image)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise DatasetError(f"{where}: image must be RGB uint8 (H, W, 3), got {image.dtype} {image.shape}")
        labels = np.asarray(self.labels)
        if labels.shape != image.shape[:2]:
            raise DatasetError(f"{where}: labels {labels.shape} do not match image {image.shape[:2]}")
        if labels.size and labels.min() < 0:
            raise DatasetError(f"{where}: labels must be >= 0 (0 = background)")
        if not 0.01 < float(self.mpp) < 100:
            raise DatasetError(f"{where}: mpp must be µm per pixel (e.g. 0.25), got {self.mpp}")
        self.image = image
        self.labels = labels.astype(np.int32, copy=False)
        self.mpp = float(self.mpp)
