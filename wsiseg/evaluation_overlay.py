"""Evaluation overlays: an image with its true and predicted nucleus outlines drawn on it.

Colours (the legend in docs/evaluation.md): true outlines green, predicted outlines magenta,
pixels where both outlines coincide white.  Outlines are the inner boundary pixels of each
instance (a pixel of the instance with a 4-neighbour outside it), so they never leave the
instance and two touching nuclei keep separate outlines.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

TRUTH_RGB: tuple[int, int, int] = (0, 255, 0)
PREDICTION_RGB: tuple[int, int, int] = (255, 0, 255)
BOTH_RGB: tuple[int, int, int] = (255, 255, 255)


def instance_outlines(labels: np.ndarray) -> np.ndarray:
    """(H, W) bool: the inner boundary pixels of every instance of an (H, W) integer label map."""
    from skimage.segmentation import find_boundaries

    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels must be a 2-D instance map, got shape {labels.shape}")
    return find_boundaries(labels, connectivity=1, mode="inner", background=0) & (labels > 0)


def render_overlay(image: np.ndarray, truth: np.ndarray, prediction: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 RGB: `image` with true outlines green, predicted magenta, both white.

    image: (H, W, 3) uint8 RGB.  truth, prediction: (H, W) integer instance maps on the
    image's grid (0 = background).  Raises ValueError on mismatched shapes.
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be (H, W, 3) uint8 RGB, got {image.dtype} {image.shape}")
    if np.shape(truth) != image.shape[:2] or np.shape(prediction) != image.shape[:2]:
        raise ValueError(
            f"truth {np.shape(truth)} and prediction {np.shape(prediction)} must match the image {image.shape[:2]}"
        )
    true_edge = instance_outlines(truth)
    pred_edge = instance_outlines(prediction)
    out = image.copy()
    out[true_edge & ~pred_edge] = TRUTH_RGB
    out[pred_edge & ~true_edge] = PREDICTION_RGB
    out[true_edge & pred_edge] = BOTH_RGB
    return out


def write_overlay(path: Path, image: np.ndarray, truth: np.ndarray, prediction: np.ndarray) -> Path:
    """Render the overlay (see `render_overlay`) and save it as a PNG at `path`; returns `path`."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(render_overlay(image, truth, prediction)).save(path, compress_level=1)
    return path
