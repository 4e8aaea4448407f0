"""ProbabilityPrompter: Segment Any Cell's auto-prompting, a UNet probability map turned into points.

Segment Any Cell picks prompts from a nuclear probability map either as centroids of connected
regions (better with many points) or by thresholded sampling; it publishes no thresholds or
counts, so every number in `PointSelection` is our own choice:

- "centroid": connected components (4-connected) of p > threshold with at least
  `min_area_px` pixels give one positive each, at the component centroid (moved to the
  nearest component pixel when the centroid falls outside a non-convex component), scored
  by the component's mean probability; the `points_per_tile` best are kept.
- "probability": pixels with p > threshold are drawn without replacement with weight p
  (seeded, so repeatable) and accepted when farther than `min_spacing_px` from every
  accepted point, until `points_per_tile` are accepted; scored by p.

Negatives (for users; the pipeline takes negatives from the global point set) are the
background pixels (p < negative_threshold) farthest from any foreground, greedily spread
`min_spacing_px` apart.  All points are tile px in the pixel-edge frame.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
from scipy import ndimage

from wsiseg.models.prompters.point import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    load_state,
    manifest_normalisation,
    open_component,
    resolve_device,
    tiles_to_tensor,
)
from wsiseg.models.protocols import NUCLEUS, NucleusClass, PointSet

if TYPE_CHECKING:
    from torch import nn

    from wsiseg.models.bundles import Bundle

#: UNet receptive range that matters, our estimate: 4 levels of two 3x3 convs reach about
#: +-44 px; 48 leaves a margin.
DEFAULT_CONTEXT_PX = 48


@dataclass(frozen=True)
class PointSelection:
    """How points are picked from a probability map (see module docstring; our own defaults)."""

    method: str = "centroid"
    threshold: float = 0.5
    min_area_px: int = 16
    points_per_tile: int = 256
    min_spacing_px: float = 8.0
    negative_threshold: float = 0.1
    negatives_per_tile: int = 32
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in ("centroid", "probability"):
            raise ValueError(f"selection must be 'centroid' or 'probability', got {self.method!r}")
        if not 0.0 < self.threshold < 1.0 or not 0.0 < self.negative_threshold <= self.threshold:
            raise ValueError(
                "need 0 < negative_threshold <= threshold < 1, "
                f"got {self.negative_threshold}, {self.threshold}"
            )
        if self.min_area_px < 1 or self.points_per_tile < 0 or self.negatives_per_tile < 0:
            raise ValueError("min_area_px must be >= 1 and points_per_tile, negatives_per_tile >= 0")
        if self.min_spacing_px < 0:
            raise ValueError(f"min_spacing_px must be >= 0, got {self.min_spacing_px}")


@dataclass
class ProbabilityPrompts:
    """Prompts of one tile: positives (class 0) and negative points (N, 2) float32, tile px."""

    positive: PointSet
    negative_xy: np.ndarray


def centroid_points(prob: np.ndarray, selection: PointSelection) -> PointSet:
    """One point per connected component of prob (H, W) > threshold (see module docstring)."""
    labels, count = ndimage.label(prob > selection.threshold)
    if count == 0:
        return PointSet.empty()
    index = np.arange(1, count + 1)
    area = ndimage.sum_labels(np.ones_like(prob), labels, index)
    mean_p = ndimage.mean(prob, labels, index)
    centres = np.asarray(ndimage.center_of_mass(np.ones_like(prob), labels, index), dtype=np.float64)
    keep = np.flatnonzero(area >= selection.min_area_px)
    keep = keep[np.argsort(-mean_p[keep], kind="stable")][: selection.points_per_tile]
    yx = centres[keep].reshape(-1, 2)
    for n, comp in enumerate(keep):
        row, col = np.rint(yx[n]).astype(int)
        if labels[row, col] != comp + 1:  # centroid outside a non-convex component
            rows, cols = np.nonzero(labels == comp + 1)
            nearest = np.argmin((rows - yx[n, 0]) ** 2 + (cols - yx[n, 1]) ** 2)
            yx[n] = rows[nearest], cols[nearest]
    return PointSet(yx[:, ::-1] + 0.5, mean_p[keep], np.zeros(len(keep), np.int16))


def _spread(candidates_yx: np.ndarray, shape: tuple[int, int], spacing: float, limit: int) -> np.ndarray:
    """Indices of candidates (in order) accepted greedily when > spacing from every accepted one."""
    blocked = np.zeros(shape, dtype=bool)
    r = int(np.floor(spacing))
    dy, dx = np.mgrid[-r : r + 1, -r : r + 1]
    disk = dy**2 + dx**2 <= spacing**2
    accepted: list[int] = []
    for i, (row, col) in enumerate(candidates_yx):
        if len(accepted) >= limit:
            break
        if blocked[row, col]:
            continue
        accepted.append(i)
        if spacing > 0:
            y0, x0 = max(row - r, 0), max(col - r, 0)
            y1, x1 = min(row + r + 1, shape[0]), min(col + r + 1, shape[1])
            blocked[y0:y1, x0:x1] |= disk[y0 - row + r : y1 - row + r, x0 - col + r : x1 - col + r]
    return np.asarray(accepted, dtype=np.int64)


def sampled_points(prob: np.ndarray, selection: PointSelection) -> PointSet:
    """Up to points_per_tile pixels with p > threshold, drawn with weight p, spread apart."""
    rows, cols = np.nonzero(prob > selection.threshold)
    if len(rows) == 0:
        return PointSet.empty()
    p = prob[rows, cols].astype(np.float64)
    rng = np.random.default_rng(selection.seed)
    keys = np.log(rng.random(len(p))) / p  # weighted sampling without replacement (Efraimidis-Spirakis)
    order = np.argsort(-keys, kind="stable")
    yx = np.stack([rows[order], cols[order]], axis=1)
    chosen = _spread(yx, prob.shape, selection.min_spacing_px, selection.points_per_tile)
    yx = yx[chosen]
    return PointSet(yx[:, ::-1] + 0.5, prob[yx[:, 0], yx[:, 1]], np.zeros(len(yx), np.int16))


def negative_points(prob: np.ndarray, selection: PointSelection) -> np.ndarray:
    """(N, 2) float32 background points (p < negative_threshold) farthest from foreground."""
    background = prob < selection.negative_threshold
    if selection.negatives_per_tile == 0 or not background.any():
        return np.zeros((0, 2), np.float32)
    depth = ndimage.distance_transform_edt(background) if not background.all() else np.ones(prob.shape)
    rows, cols = np.nonzero(background)
    order = np.lexsort((cols, rows, -depth[rows, cols]))
    yx = np.stack([rows[order], cols[order]], axis=1)
    chosen = _spread(yx, prob.shape, selection.min_spacing_px, selection.negatives_per_tile)
    return (yx[chosen][:, ::-1] + 0.5).astype(np.float32).reshape(-1, 2)


class ProbabilityPrompter:
    """A probability-map model (UNet) as a Prompter: (B, H, W, 3) uint8 tiles -> positive points.

    model: maps (B, 3, H, W) normalised float32 to (B, 1, H, W) logits; pad_multiple: input
    sides are padded (reflect) to a multiple of this (default: the UNet's own requirement).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        name: str = "unet_prompter",
        mpp: float = 0.25,
        selection: PointSelection = PointSelection(),
        classes: Sequence[NucleusClass] | None = None,
        context_px: int = DEFAULT_CONTEXT_PX,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        pad_multiple: int | None = None,
        device: str = "cpu",
    ) -> None:
        if mpp <= 0:
            raise ValueError(f"mpp must be > 0, got {mpp}")
        self.classes = tuple(classes) if classes else (NUCLEUS,)
        if len(self.classes) != 1:
            raise ValueError(f"a probability prompter has one class, got {len(self.classes)}")
        self.name = name
        self.mpp = float(mpp)
        self.selection = selection
        self.context_px = int(context_px)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        multiple: Any = pad_multiple or getattr(getattr(model, "config", None), "multiple", 1)
        self.pad_multiple = int(multiple)
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()

    @property
    def nms_radius_px(self) -> float:
        """Points closer than this are duplicates: the selection's spacing."""
        return float(self.selection.min_spacing_px)

    def __repr__(self) -> str:
        return f"ProbabilityPrompter(name={self.name!r}, mpp={self.mpp}, selection={self.selection})"

    def predict_probability(self, tiles: np.ndarray) -> np.ndarray:
        """tiles: (B, H, W, 3) uint8 -> (B, H, W) float32 nuclear probability in [0, 1]."""
        import torch

        x = tiles_to_tensor(tiles, self.mean, self.std, self.pad_multiple, self.device)
        height, width = np.asarray(tiles).shape[1:3]
        if len(x) == 0:
            return np.zeros((0, height, width), np.float32)
        with torch.inference_mode():
            logits = self.model(x)
        return torch.sigmoid(logits[:, 0, :height, :width].float()).cpu().numpy()

    def select(self, prob: np.ndarray) -> ProbabilityPrompts:
        """Positive and negative points of one (H, W) probability map."""
        prob = np.asarray(prob, dtype=np.float32)
        if prob.ndim != 2:
            raise ValueError(f"prob must be (H, W), got {prob.shape}")
        if self.selection.method == "centroid":
            positive = centroid_points(prob, self.selection)
        else:
            positive = sampled_points(prob, self.selection)
        return ProbabilityPrompts(positive, negative_points(prob, self.selection))

    def predict_prompts(self, tiles: np.ndarray) -> list[ProbabilityPrompts]:
        """Positives and negatives per tile."""
        return [self.select(p) for p in self.predict_probability(tiles)]

    def predict_points(self, tiles: np.ndarray) -> list[PointSet]:
        """tiles: (B, H, W, 3) uint8 -> positive points per tile (tile px, pixel-edge frame)."""
        return [p.positive for p in self.predict_prompts(tiles)]

    @classmethod
    def from_bundle(
        cls,
        bundle: Bundle | str | Path,
        *,
        device: str = "cpu",
        selection: str | PointSelection | None = None,
        **selection_overrides: Any,
    ) -> ProbabilityPrompter:
        """Build from a bundle's "prompter" component (architecture "unet_prompter").

        Component config: levels, base_channels, context_px and any PointSelection field
        (`method` or `selection` for the method).  `selection` (a method name or a
        PointSelection) and keyword overrides of PointSelection fields take precedence.
        """
        from wsiseg.models.prompters.unet import UNet, UNetConfig

        bundle, component = open_component(bundle, "prompter", "unet_prompter")
        config = dict(component.config)
        where = f"bundle {bundle.path}"
        fields = set(PointSelection.__dataclass_fields__)
        try:
            model = UNet(UNetConfig(int(config.get("levels", 4)), int(config.get("base_channels", 32))))
            stored = {k: v for k, v in config.items() if k in fields}
            if "selection" in config:
                stored["method"] = config["selection"]
            chosen = PointSelection(**stored)
            if isinstance(selection, PointSelection):
                chosen = selection
            elif selection is not None:
                chosen = replace(chosen, method=selection)
            unknown = set(selection_overrides) - fields
            if unknown:
                raise TypeError(f"unexpected options {sorted(unknown)}")
            chosen = replace(chosen, **selection_overrides)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{where}: invalid unet_prompter settings: {exc}") from exc
        load_state(model, bundle.load_weights("prompter"), where=where)
        mean, std = manifest_normalisation(bundle.manifest)
        return cls(
            model,
            name=bundle.manifest.name,
            mpp=bundle.manifest.mpp,
            selection=chosen,
            classes=tuple(bundle.manifest.classes) or None,
            context_px=int(config.get("context_px", DEFAULT_CONTEXT_PX)),
            mean=mean,
            std=std,
            device=device,
        )
