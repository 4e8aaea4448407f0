"""Training crops of labelled images at a model's resolution, augmented, drawn from a seeded rng.

Every image is resampled once to the model's mpp.  A crop is drawn from an image chosen with
probability proportional to its area: a window of `crop_px + 2 * margin_px` (divided by a
scale drawn from [1 - s, 1 + s]) at a uniform position, resampled by that scale, augmented
(`wsiseg.training.augment`) and returned whole, so a caller can compute properties of
nuclei cut by the crop (their full centroid) from the margin.  Images smaller than the
window are padded with white glass (255) and background labels (0): padding never invents
unlabelled nuclei.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from wsiseg.training.augment import AugmentConfig, augment_pair, rescale

if TYPE_CHECKING:
    from wsiseg.datasets.item import NucleusItem


@dataclass(frozen=True)
class Crop:
    """One training sample.

    image: (crop_px, crop_px, 3) uint8 RGB.
    window_labels: (crop_px + 2 m, crop_px + 2 m) int32 instance ids of the crop plus a margin
        m = `margin_px` on every side (the crop is the centre).
    """

    image: np.ndarray
    window_labels: np.ndarray
    margin_px: int

    @property
    def labels(self) -> np.ndarray:
        """(crop_px, crop_px) int32 instance ids of the crop itself."""
        m = self.margin_px
        h, w = self.window_labels.shape
        return self.window_labels[m : h - m, m : w - m]


class CropSampler:
    """Draws augmented crops of `items` resampled to `mpp`.

    crop_px: side of the returned image; margin_px: extra labels around it (see Crop);
    augment: None for no augmentation (and no scale jitter).
    """

    def __init__(
        self,
        items: list[NucleusItem],
        *,
        mpp: float,
        crop_px: int,
        margin_px: int = 0,
        augment: AugmentConfig | None = None,
    ) -> None:
        if not items:
            raise ValueError("CropSampler needs at least one image")
        self.crop_px = int(crop_px)
        self.margin_px = int(margin_px)
        self.augment = augment
        self.images = [rescale(it.image, it.labels, it.mpp / mpp) for it in items]
        areas = np.array([lab.size for _, lab in self.images], np.float64)
        self.weights = areas / areas.sum()

    def sample(self, rng: np.random.Generator) -> Crop:
        """One crop (the image drawn by area, position, scale and augmentation all from rng)."""
        index = int(rng.choice(len(self.images), p=self.weights))
        image, labels = self.images[index]
        jitter = self.augment.scale_jitter if self.augment is not None else 0.0
        scale = float(rng.uniform(1 - jitter, 1 + jitter)) if jitter > 0 else 1.0
        side = self.crop_px + 2 * self.margin_px
        window = int(math.ceil(side / scale)) + (2 if jitter > 0 else 0)
        h, w = labels.shape
        if h < window or w < window:
            pad = ((0, max(0, window - h)), (0, max(0, window - w)))
            image = np.pad(image, (*pad, (0, 0)), mode="constant", constant_values=255)
            labels = np.pad(labels, pad, mode="constant")
            h, w = labels.shape
        y0 = int(rng.integers(0, h - window + 1))
        x0 = int(rng.integers(0, w - window + 1))
        img = image[y0 : y0 + window, x0 : x0 + window]
        lab = labels[y0 : y0 + window, x0 : x0 + window]
        if scale != 1.0:
            img, lab = rescale(img, lab, scale)
        if self.augment is not None:
            img, lab = augment_pair(img, lab, rng, self.augment)
        cy, cx = (lab.shape[0] - side) // 2, (lab.shape[1] - side) // 2
        lab = lab[cy : cy + side, cx : cx + side]
        m = self.margin_px
        img = img[cy + m : cy + m + self.crop_px, cx + m : cx + m + self.crop_px]
        return Crop(np.ascontiguousarray(img), np.ascontiguousarray(lab, dtype=np.int32), m)

    def batch(self, rng: np.random.Generator, size: int) -> list[Crop]:
        """`size` crops drawn one after another from rng."""
        return [self.sample(rng) for _ in range(size)]
