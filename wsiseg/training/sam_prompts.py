"""SAM training prompts from an instance label map (PromptNucSeg's scheme).

For each of up to Z instances drawn without replacement from a crop: the positive point is a
uniformly random pixel of the instance (its centre: pixel (i, j) gives (j + 0.5, i + 0.5),
the pixel-edge frame), not its centroid (PromptNucSeg `segmentor/dataset.py`), and the
negatives are the centroids of the K instances nearest to that point among all *other*
instances of the crop (as the pipeline sends the K nearest other prompts at inference,
which a prompter places near centroids).  Fewer than K other instances: the rest are
padding points (0, 0) labelled -1.  The target of each prompt is its instance's mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from wsiseg.training.targets import centroids_px


@dataclass(frozen=True)
class InstancePrompts:
    """P prompts of one crop.

    points: (P, 1 + K, 2) float32 x, y in crop px (edge frame); point 0 is the positive.
    labels: (P, 1 + K) int64: 1 positive, 0 negative, -1 padding.
    ids: (P,) int64 instance ids of the label map the prompts target.
    """

    points: np.ndarray
    labels: np.ndarray
    ids: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)

    def masks(self, labels: np.ndarray) -> np.ndarray:
        """(P, H, W) bool target masks: labels == id for each prompt."""
        return labels[None] == self.ids[:, None, None]


def sample_instance_prompts(
    labels: np.ndarray,
    rng: np.random.Generator,
    *,
    max_instances: int,
    k_negatives: int,
    min_area_px: int = 4,
) -> InstancePrompts:
    """Prompts for up to `max_instances` instances of an (H, W) integer label map (0 background).

    Instances smaller than `min_area_px` pixels in the map (slivers cut by the crop) get no
    prompt but still serve as negatives.  Draws from rng in a fixed order, so a seeded rng
    gives the same prompts.
    """
    k = int(k_negatives)
    ids, centres = centroids_px(labels)
    if len(ids) == 0:
        return InstancePrompts(np.zeros((0, 1 + k, 2), np.float32), np.zeros((0, 1 + k), np.int64),
                               np.zeros(0, np.int64))
    lab64 = labels.astype(np.int64, copy=False)
    areas = np.bincount(lab64.ravel(), minlength=int(ids.max()) + 1)[ids]
    eligible = ids[areas >= min_area_px]
    count = min(int(max_instances), len(eligible))
    chosen = np.sort(rng.choice(eligible, size=count, replace=False)) if count else eligible[:0]
    slices = ndi.find_objects(lab64)
    points = np.zeros((count, 1 + k, 2), np.float32)
    point_labels = np.full((count, 1 + k), -1, np.int64)
    for n, inst in enumerate(chosen):
        sl = slices[inst - 1]
        rows, cols = np.nonzero(lab64[sl] == inst)
        pick = int(rng.integers(len(rows)))
        x = cols[pick] + sl[1].start + 0.5
        y = rows[pick] + sl[0].start + 0.5
        points[n, 0] = (x, y)
        point_labels[n, 0] = 1
        others = ids != inst
        if k and others.any():
            d2 = ((centres[others] - (x, y)) ** 2).sum(axis=1)
            nearest = centres[others][np.argsort(d2, kind="stable")[:k]]
            points[n, 1 : 1 + len(nearest)] = nearest
            point_labels[n, 1 : 1 + len(nearest)] = 0
    return InstancePrompts(points, point_labels, chosen.astype(np.int64))
