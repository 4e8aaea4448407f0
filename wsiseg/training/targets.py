"""Dense training targets from an instance label map: foreground, centre heatmap, distance map.

All maps are (H, W) float32 in the label map's own pixel grid.

- foreground: 1 inside any nucleus.
- centre: max over nuclei of exp(-d^2 / (2 sigma^2)), d the distance (px) to the nucleus'
  centroid (the point target of centre-heatmap detectors such as CenterNet, Zhou et al. 2019).
- distance: inside each nucleus, its Euclidean distance to the nearest pixel outside that
  nucleus divided by the nucleus' maximum of it, so 1 at the nucleus' core and near 0 at its
  boundary; 0 outside (the per-instance normalised distance map of distance-map watershed
  methods, e.g. Naylor et al., IEEE TMI 2019).
- horizontal / vertical (`hv_maps`, optional): inside each nucleus, each pixel's horizontal
  (vertical) offset from the nucleus' centroid, its negative and positive offsets divided by
  their largest magnitude on that side, so -1 at the left (top) edge and +1 at the right
  (bottom) edge; 0 outside.  The HoVer-Net maps (Graham et al., "HoVer-Net: Simultaneous
  segmentation and classification of nuclei in multi-tissue histology images", Medical Image
  Analysis 58, 2019): between two touching nuclei they jump from +1 to -1.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi


@dataclass(frozen=True)
class DenseTargets:
    """foreground, centre, distance: (H, W) float32 each (see module docstring)."""

    foreground: np.ndarray
    centre: np.ndarray
    distance: np.ndarray

    def stack(self) -> np.ndarray:
        """(3, H, W) float32: foreground, centre, distance."""
        return np.stack([self.foreground, self.centre, self.distance]).astype(np.float32)


def centroids_px(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Instance ids (N,) int64 and their centroids (N, 2) float64 as (x, y), pixel-edge frame."""
    ids = np.unique(labels)
    ids = ids[ids > 0]
    if len(ids) == 0:
        return ids.astype(np.int64), np.zeros((0, 2))
    yx = np.asarray(ndi.center_of_mass(np.ones(labels.shape), labels, ids), dtype=np.float64).reshape(-1, 2)
    return ids.astype(np.int64), yx[:, ::-1] + 0.5


def dense_targets(labels: np.ndarray, *, centre_sigma_px: float = 2.5) -> DenseTargets:
    """Targets of an (H, W) integer instance map (0 background)."""
    labels = np.asarray(labels)
    foreground = (labels > 0).astype(np.float32)
    distance = np.zeros(labels.shape, np.float32)
    centre = np.zeros(labels.shape, np.float32)
    ids, xy = centroids_px(labels)
    if len(ids) == 0:
        return DenseTargets(foreground, centre, distance)
    slices = ndi.find_objects(labels.astype(np.int64, copy=False))
    for inst in ids:
        sl = slices[inst - 1]
        if sl is None:
            continue
        # one pixel of margin so the distance counts the nucleus' own border
        y0, y1 = max(sl[0].start - 1, 0), min(sl[0].stop + 1, labels.shape[0])
        x0, x1 = max(sl[1].start - 1, 0), min(sl[1].stop + 1, labels.shape[1])
        mask = labels[y0:y1, x0:x1] == inst
        d = ndi.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
        peak = d.max()
        if peak > 0:
            view = distance[y0:y1, x0:x1]
            view[mask] = (d[mask] / peak).astype(np.float32)
    # centre heatmap: Gaussians stamped in a window of 4 sigma around each centroid
    r = int(np.ceil(4 * centre_sigma_px))
    for x, y in xy:
        cx, cy = int(np.floor(x)), int(np.floor(y))
        ya, yb = max(cy - r, 0), min(cy + r + 1, labels.shape[0])
        xa, xb = max(cx - r, 0), min(cx + r + 1, labels.shape[1])
        if ya >= yb or xa >= xb:
            continue
        gy = (np.arange(ya, yb) + 0.5 - y) ** 2
        gx = (np.arange(xa, xb) + 0.5 - x) ** 2
        g = np.exp(-(gy[:, None] + gx[None, :]) / (2 * centre_sigma_px**2)).astype(np.float32)
        np.maximum(centre[ya:yb, xa:xb], g, out=centre[ya:yb, xa:xb])
    return DenseTargets(foreground, centre, distance)


def contact_map(labels: np.ndarray, radius_px: int) -> np.ndarray:
    """(H, W) bool: pixels within `radius_px` (Chebyshev distance, px) of two different nuclei
    of an (H, W) integer instance map (0 background): the contacts of touching nuclei and the
    narrow gaps between close ones, where a segmentation merges or splits them.

    The idea of weighting these pixels in the loss is the U-Net paper's border weight map
    (Ronneberger et al., MICCAI 2015, eq. 2), here a flat weight over a fixed radius.
    """
    if radius_px < 1:
        raise ValueError(f"radius_px must be >= 1, got {radius_px}")
    labels = np.asarray(labels).astype(np.int32, copy=False)
    size = 2 * radius_px + 1
    highest = ndi.maximum_filter(labels, size=size, mode="constant", cval=0)
    empty = np.iinfo(np.int32).max  # scipy passes cval as a float64: int32's maximum is exact there
    lowest = ndi.minimum_filter(np.where(labels > 0, labels, empty), size=size, mode="constant", cval=empty)
    return (highest > 0) & (lowest != empty) & (highest != lowest)


def hv_maps(labels: np.ndarray) -> np.ndarray:
    """(2, H, W) float32 horizontal and vertical maps of an (H, W) integer instance map (0
    background), in [-1, 1] (see the module docstring).  Offsets are taken between pixel centres
    and the nucleus' centroid; a nucleus one pixel wide on a side gets 0 on that side."""
    labels = np.asarray(labels)
    out = np.zeros((2, *labels.shape), np.float32)
    if not labels.any():
        return out
    slices = ndi.find_objects(labels.astype(np.int64, copy=False))
    for index, sl in enumerate(slices):
        if sl is None:
            continue
        mask = labels[sl] == index + 1
        rows, cols = np.nonzero(mask)
        for channel, offset in ((0, cols - cols.mean()), (1, rows - rows.mean())):
            scaled = np.zeros(len(offset), np.float64)
            negative, positive = offset < 0, offset > 0
            if negative.any():
                scaled[negative] = offset[negative] / -offset[negative].min()
            if positive.any():
                scaled[positive] = offset[positive] / offset[positive].max()
            view = out[channel][sl]
            view[mask] = scaled.astype(np.float32)
    return out
