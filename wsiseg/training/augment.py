"""Augmentation that matters for H&E: flips, 90° rotations, scale jitter, stain (HED) jitter, blur, JPEG.

Every function takes a numpy Generator so a seeded run draws the same augmentations.  Images
are (H, W, 3) uint8 RGB; label maps (H, W) integer instance ids, transformed with the image
(nearest-neighbour where resampled).

Stain jitter follows Tellez et al. (Med. Image Anal. 2019): the image is unmixed into
haematoxylin, eosin and DAB optical densities (Ruifrok & Johnston 2001, as in
`wsiseg.stain`), each channel scaled by 1 + U(-s, s) and shifted by U(-b, b), and remixed.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np


@dataclass(frozen=True)
class AugmentConfig:
    """Probabilities and ranges (our own choices; the stain ranges are Tellez et al.'s "HED light")."""

    flip: bool = True
    rotate90: bool = True
    scale_jitter: float = 0.1  # scale factor drawn from [1 - s, 1 + s]
    hed_sigma: float = 0.05
    hed_bias: float = 0.05
    blur_p: float = 0.2
    blur_sigma_px: float = 1.0
    jpeg_p: float = 0.2
    jpeg_quality: tuple[int, int] = (60, 95)

    def __post_init__(self) -> None:
        if not 0 <= self.scale_jitter < 0.5:
            raise ValueError(f"scale_jitter must be in [0, 0.5), got {self.scale_jitter}")
        for name in ("blur_p", "jpeg_p"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be a probability, got {getattr(self, name)}")


# Ruifrok & Johnston (2001) H&E-DAB stain vectors (rows: H, E, DAB), the same as skimage's rgb_from_hed.
_RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
_RGB_FROM_HED = _RGB_FROM_HED / np.linalg.norm(_RGB_FROM_HED, axis=1, keepdims=True)
_HED_FROM_RGB = np.linalg.inv(_RGB_FROM_HED)


def hed_jitter(image: np.ndarray, rng: np.random.Generator, sigma: float, bias: float) -> np.ndarray:
    """(H, W, 3) uint8 -> the same with each stain's optical density scaled and shifted."""
    od = -np.log(np.maximum(image.astype(np.float32), 1.0) / 255.0)
    hed = od.reshape(-1, 3) @ _HED_FROM_RGB.astype(np.float32)
    alpha = 1 + rng.uniform(-sigma, sigma, 3).astype(np.float32)
    beta = rng.uniform(-bias, bias, 3).astype(np.float32)
    hed = hed * alpha + beta
    rgb = np.exp(-(hed @ _RGB_FROM_HED.astype(np.float32))) * 255.0
    return np.clip(rgb, 0, 255).reshape(image.shape).astype(np.uint8)


def rescale(image: np.ndarray, labels: np.ndarray, factor: float) -> tuple[np.ndarray, np.ndarray]:
    """Resize by `factor` (area/linear for the image, nearest for labels)."""
    if abs(factor - 1.0) < 1e-6:
        return image, labels
    h, w = labels.shape
    size = (max(1, int(round(w * factor))), max(1, int(round(h * factor))))
    interp = cv2.INTER_AREA if factor < 1 else cv2.INTER_LINEAR
    out_image = cv2.resize(image, size, interpolation=interp)
    out_labels = cv2.resize(labels.astype(np.int32), size, interpolation=cv2.INTER_NEAREST)
    return out_image, out_labels


def augment_pair(
    image: np.ndarray, labels: np.ndarray, rng: np.random.Generator, config: AugmentConfig
) -> tuple[np.ndarray, np.ndarray]:
    """Geometric + colour augmentation of an image crop and its instance labels (same shape out)."""
    if config.flip and rng.random() < 0.5:
        image, labels = image[:, ::-1], labels[:, ::-1]
    if config.rotate90:
        k = int(rng.integers(4))
        image, labels = np.rot90(image, k), np.rot90(labels, k)
    image = np.ascontiguousarray(image)
    labels = np.ascontiguousarray(labels)
    if config.hed_sigma > 0 or config.hed_bias > 0:
        image = hed_jitter(image, rng, config.hed_sigma, config.hed_bias)
    if rng.random() < config.blur_p:
        image = cv2.GaussianBlur(image, (0, 0), float(rng.uniform(0.1, config.blur_sigma_px)))
    if rng.random() < config.jpeg_p:
        quality = int(rng.integers(config.jpeg_quality[0], config.jpeg_quality[1] + 1))
        ok, buf = cv2.imencode(".jpg", image[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, quality])
        if ok:
            image = np.ascontiguousarray(cv2.imdecode(buf, cv2.IMREAD_COLOR)[..., ::-1])
    return image, labels
