"""TinyPrompter: one point per peak of wsiseg-tiny's centre heatmap (or per distance-map core).

source "centre" (the default): a pixel is a peak when it is the maximum of the centre map within a (2r+1)^2 window
(r = min_distance_px), its value exceeds `threshold` and the foreground probability there
exceeds `foreground_threshold`.  Ties (plateaus) keep one point per connected group, at its
first pixel in raster order.  Points are pixel centres (j + 0.5, i + 0.5) in the tile's
pixel-edge frame; the score is the heatmap value.

source "distance" (the distance-map watershed baseline's markers, e.g. Naylor et al. 2019):
one point per 8-connected component of (distance > core_threshold (0.5) and foreground), at the component's
pixel of largest distance; the score is the component's mean foreground probability
(score "foreground") or the centre heatmap's largest value in the component (score "centre":
how sure the network is that one nucleus centre lies there).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage as ndi

from wsiseg.models.protocols import NUCLEUS, NucleusClass, PointSet
from wsiseg.models.tiny.maps import CENTRE, DISTANCE, FOREGROUND, N_MAPS, DenseMapNet

if TYPE_CHECKING:
    from wsiseg.models.bundles import Bundle

ARCHITECTURE = "tiny_prompter"


@dataclass(frozen=True)
class PeakSettings:
    """threshold: minimum centre-heatmap value of a point (the model's default score
    threshold, `--min-score` overrides it); min_distance_px: peaks closer than this merge;
    foreground_threshold: the foreground probability a point needs; source: "centre" or
    "distance" (see module docstring); core_threshold: the distance level of a core."""

    threshold: float = 0.3
    min_distance_px: int = 4
    foreground_threshold: float = 0.5
    source: str = "centre"
    core_threshold: float = 0.5
    score: str = "foreground"

    def __post_init__(self) -> None:
        if not 0 <= self.threshold < 1 or not 0 <= self.foreground_threshold < 1:
            raise ValueError(f"thresholds must be in [0, 1), got {self.threshold}, {self.foreground_threshold}")
        if self.min_distance_px < 1:
            raise ValueError(f"min_distance_px must be >= 1, got {self.min_distance_px}")
        if not 0 < self.core_threshold < 1:
            raise ValueError(f"core_threshold must be in (0, 1), got {self.core_threshold}")
        if self.source not in ("centre", "distance"):
            raise ValueError(f"source must be 'centre' or 'distance', got {self.source!r}")
        if self.score not in ("foreground", "centre"):
            raise ValueError(f"score must be 'foreground' or 'centre', got {self.score!r}")


def peak_points(maps: np.ndarray, settings: PeakSettings) -> PointSet:
    """maps: (3, H, W) float32 (foreground, centre, distance) -> one point per centre peak."""
    if settings.source == "distance":
        return core_points(maps, settings)
    centre = maps[CENTRE]
    size = 2 * settings.min_distance_px + 1
    is_peak = (centre >= ndi.maximum_filter(centre, size=size, mode="nearest")) & (centre > settings.threshold)
    is_peak &= maps[FOREGROUND] > settings.foreground_threshold
    groups, n = ndi.label(is_peak, structure=np.ones((3, 3), bool))
    if n == 0:
        return PointSet.empty()
    flat = groups.ravel()
    order = np.flatnonzero(flat)
    _, first = np.unique(flat[order], return_index=True)
    index = order[first]
    rows, cols = np.divmod(index, centre.shape[1])
    xy = np.stack([cols + 0.5, rows + 0.5], axis=1)
    return PointSet(xy, centre[rows, cols], np.zeros(len(rows), np.int16))


def core_points(maps: np.ndarray, settings: PeakSettings) -> PointSet:
    """One point per connected core (distance > 0.5 on foreground) of (3, H, W) maps.

    The point is the pixel centre of the core's distance maximum; among equal maxima the first
    in raster order (so a point does not depend on where its core lies in the tile).  Works on
    the core pixels only: one sort of them, not of the whole tile.
    """
    core = (maps[DISTANCE] > settings.core_threshold) & (maps[FOREGROUND] > settings.foreground_threshold)
    groups, n = ndi.label(core, structure=np.ones((3, 3), bool))
    if n == 0:
        return PointSet.empty()
    flat = groups.ravel()
    where = np.flatnonzero(flat)  # raster order
    label = flat[where]
    by_label = np.lexsort((-maps[DISTANCE].ravel()[where], label))  # stable: ties stay in raster order
    firsts = np.flatnonzero(np.r_[True, np.diff(label[by_label]) != 0])
    rows, cols = np.divmod(where[by_label[firsts]], maps.shape[2])
    if settings.score == "centre":
        score = np.full(n, -np.inf, np.float32)
        np.maximum.at(score, label - 1, maps[CENTRE].ravel()[where])
    else:
        score = np.asarray(ndi.mean(maps[FOREGROUND], groups, np.arange(1, n + 1)), np.float32)
    keep = score > settings.threshold
    xy = np.stack([cols[keep], rows[keep]], axis=1).astype(np.float64) + 0.5
    return PointSet(xy, score[keep], np.zeros(int(keep.sum()), np.int16))


class TinyPrompter:
    """Prompter protocol over a DenseMapNet: (B, H, W, 3) uint8 -> PointSet per tile."""

    def __init__(
        self,
        net: DenseMapNet,
        *,
        name: str = "wsiseg-tiny",
        mpp: float = 0.25,
        peaks: PeakSettings = PeakSettings(),
        nms_radius_px: float = 4.0,
        context_px: int = 48,
        classes: tuple[NucleusClass, ...] = (NUCLEUS,),
        preferred_tile_px: int = 512,
    ) -> None:
        self.net = net
        #: the tile side (px) a run uses when neither --tile-size nor the segmentor decides it
        self.preferred_tile_px = int(preferred_tile_px)
        self.name = name
        self.mpp = float(mpp)
        self.peaks = peaks
        self.nms_radius_px = float(nms_radius_px)
        self.context_px = int(context_px)
        self.classes = classes

    def __repr__(self) -> str:
        return f"TinyPrompter(name={self.name!r}, mpp={self.mpp}, peaks={self.peaks})"

    def predict_points(self, tiles: np.ndarray) -> list[PointSet]:
        """tiles: (B, H, W, 3) uint8 -> one PointSet per tile (tile px, pixel-edge frame)."""
        return self.predict_points_and_maps(tiles)[0]

    def predict_points_and_maps(self, tiles: np.ndarray) -> tuple[list[PointSet], np.ndarray]:
        """The points and the (B, 3, H, W) float32 maps they came from (`wsiseg.map_store`)."""
        maps = self.net.predict_maps(tiles)
        return [peak_points(m, self.peaks) for m in maps], maps

    #: channels of the maps `predict_points_and_maps` returns
    map_channels = N_MAPS

    @property
    def min_score(self) -> float:
        """The score a point needs to be kept (the manifest's threshold, or --min-score's)."""
        return float(self.peaks.threshold)

    @property
    def map_key(self) -> str | None:
        """Identifies the maps (network weights, precision, tta); None when unknown."""
        return self.net.map_key

    @property
    def precision(self) -> str:
        """The arithmetic the network runs at: "fp32" or "bf16" ("auto" resolved for this device)."""
        return self.net.precision

    @classmethod
    def from_bundle(
        cls, bundle: Bundle | str | Path, *, device: str = "cpu", min_score: float | None = None,
        precision: str | None = None, tta: bool = False,
    ) -> TinyPrompter:
        """Build from a bundle's "prompter" component (architecture "tiny_prompter").

        Component config: levels, base_channels, threshold, min_distance_px,
        foreground_threshold, context_px, precision; min_score overrides the threshold;
        tta: average the maps over the tile's flips (`MapSettings.tta`).
        """
        net, bundle, component = DenseMapNet.from_bundle(
            bundle, "prompter", ARCHITECTURE, device=device, precision=precision, tta=tta
        )
        config = component.config
        try:
            peaks = PeakSettings(
                threshold=float(min_score if min_score is not None else config.get("threshold", 0.3)),
                min_distance_px=int(config.get("min_distance_px", 4)),
                foreground_threshold=float(config.get("foreground_threshold", 0.5)),
                source=str(config.get("source", "centre")),
                core_threshold=float(config.get("core_threshold", 0.5)),
                score=str(config.get("score", "foreground")),
            )
        except ValueError as exc:
            raise ValueError(f"bundle {bundle.path}: {exc}") from exc
        # the network's tile size: the prompter's own, else the bundle's segmentor's (one network)
        tile_px = config.get("tile_px")
        if tile_px is None and "segmentor" in bundle.manifest.components:
            tile_px = bundle.manifest.components["segmentor"].config.get("tile_px")
        return cls(
            net,
            name=bundle.manifest.name,
            mpp=bundle.manifest.mpp,
            peaks=peaks,
            nms_radius_px=bundle.manifest.nms_radius_px,
            context_px=int(config.get("context_px", 48)),
            classes=tuple(bundle.manifest.classes),
            preferred_tile_px=int(tile_px or 512),
        )
