"""`wsiseg train prompter`: train PromptNucSeg's DPA-P2PNet point prompter (one point per nucleus).

Each step: `batch_size` crops of `crop_px` (a multiple of the anchor spacing and of 32),
augmented; the truths are the centroids of the nuclei whose centroid lies in the crop,
computed on the crop plus a margin so a nucleus cut by the crop keeps its own centroid
(PromptNucSeg's points are whole-instance centroids).  Proposals are matched one-to-one to
the truths and trained with cross-entropy, point regression and the auxiliary mask's focal
loss (`wsiseg.training.point_matching`).  AdamW (lr 1e-4, weight decay 1e-4), gradient
norm clipped to 0.1 (PromptNucSeg `prompter/main.py`).  PromptNucSeg's ImageNet-pretrained
backbone and weight EMA are not used: start from a bundle with `init` for pretrained weights.

Defaults follow PromptNucSeg's Kumar (MoNuSeg) configuration: one class, anchors every
16 px, 4 FPN levels, background weight 0.2, NMS radius 11 px, mask-aided filtering on.
The bundle is a "dpa_p2pnet" prompter that `wsiseg run --model SEGMENTOR --prompter BUNDLE`
runs.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from wsiseg.training.bundle_task import BundleTask, fit_task, model_of_bundle
from wsiseg.training.crops import Crop
from wsiseg.training.loop import FitResult, TrainingError
from wsiseg.training.point_matching import MatchWeights, point_losses
from wsiseg.training.settings import TrainSettings, autocast, pipeline_device
from wsiseg.training.targets import centroids_px
from wsiseg.training.validation import ValidationRun, prompter_validation_run

if TYPE_CHECKING:
    from wsiseg.datasets.item import NucleusItem

#: crop margin (px) whose labels give the centroids of nuclei cut by the crop
MARGIN_PX = 32


@dataclass(frozen=True)
class PrompterRecipe(TrainSettings):
    """TrainSettings plus the DPA-P2PNet architecture (backbone: a ConvNeXt size of
    `wsiseg.models.prompters.convnext.CONVNEXT_SIZES`; space, num_levels, hidden_dim, dropout),
    init (a dpa_p2pnet bundle to start from; its architecture wins), the matching and loss
    weights, clip_grad_norm (0: off), and what the bundle runs with: nms_radius_px,
    filtering, context_px.  val_segmentor: the segmentor validation runs with."""

    lr: float = 1e-4
    backbone: str = "convnext_small"
    space: int = 16
    num_levels: int = 4
    hidden_dim: int = 256
    dropout: float = 0.1
    init: str | None = None
    point_cost: float = 0.1
    class_cost: float = 1.0
    eos_coef: float = 0.2
    reg_weight: float = 5e-3
    mask_weight: float = 1.0
    clip_grad_norm: float = 0.1
    nms_radius_px: float = 11.0
    filtering: bool = True
    context_px: int = 64
    val_segmentor: str = "classical"

    def __post_init__(self) -> None:
        super().__post_init__()
        multiple = int(np.lcm(self.space, 32)) if self.space >= 1 else 32
        if self.space < 1 or self.crop_px % multiple:
            raise ValueError(f"crop_px must be a multiple of {multiple} (the anchor spacing and 32), "
                             f"got {self.crop_px}")
        if self.clip_grad_norm < 0 or self.nms_radius_px <= 0 or self.context_px < 0:
            raise ValueError("need clip_grad_norm >= 0, nms_radius_px > 0, context_px >= 0")
        self.weights()  # validates them

    def weights(self) -> MatchWeights:
        return MatchWeights(self.point_cost, self.class_cost, self.eos_coef, self.reg_weight, self.mask_weight)


def crop_points(crop: Crop) -> np.ndarray:
    """(G, 2) float32 centroids (pixel-index frame of the crop) of the nuclei whose centroid
    lies inside the crop, computed over the crop and its margin."""
    _, xy = centroids_px(crop.window_labels)
    xy = xy - crop.margin_px
    size = crop.image.shape[0]
    inside = (xy >= 0).all(axis=1) & (xy < size).all(axis=1)
    return (xy[inside] - 0.5).astype(np.float32)


@dataclass(frozen=True)
class PointBatch:
    """images (B, S, S, 3) uint8; points[b] (G_b, 2) float32 pixel-index; foreground (B, S, S) float32."""

    images: np.ndarray
    points: list[np.ndarray]
    foreground: np.ndarray


class PrompterTask(BundleTask[PrompterRecipe]):
    """The TrainingTask of `wsiseg train prompter` (see `wsiseg.training.loop`)."""

    MODE = "prompter"
    COMPONENT = "prompter"
    CROP_MARGIN_PX = MARGIN_PX

    def __init__(self, recipe: PrompterRecipe, train: list[NucleusItem], val: list[NucleusItem]) -> None:
        import torch

        from wsiseg.models.prompters.point import IMAGENET_MEAN, IMAGENET_STD

        super().__init__(recipe, train, val if recipe.validate_every else [])
        self.mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1)

    def initial_model(self) -> tuple[Any, str]:
        from wsiseg.models.prompters.dpa_p2pnet import DPAP2PNet, DPAP2PNetConfig
        from wsiseg.models.prompters.point import PointPrompter

        recipe = self.recipe
        if recipe.init:
            model, source = model_of_bundle(PointPrompter.from_bundle, recipe.init)
            if model.config.num_classes != 1:
                raise TrainingError(f"{recipe.init}: the prompter has {model.config.num_classes} classes; "
                                    "wsiseg train prompter trains one-class (nucleus) prompters")
        else:
            config = DPAP2PNetConfig.with_backbone(recipe.backbone, num_classes=1, num_levels=recipe.num_levels,
                                                   space=recipe.space, hidden_dim=recipe.hidden_dim,
                                                   dropout=recipe.dropout)
            model, source = DPAP2PNet(config), f"random {recipe.backbone}"
        if recipe.crop_px % model.config.space:
            raise TrainingError(f"crop_px {recipe.crop_px} is not a multiple of the prompter's anchor spacing "
                                f"{model.config.space}; choose another --crop-px")
        return model, source

    def batches(self, epoch: int, rng: np.random.Generator, steps: int) -> Iterator[PointBatch]:
        for _ in range(steps):
            crops = self.sampler.batch(rng, self.recipe.batch_size)
            yield PointBatch(
                np.stack([c.image for c in crops]),
                [crop_points(c) for c in crops],
                np.stack([(c.labels > 0).astype(np.float32) for c in crops]),
            )

    def step(self, batch: PointBatch) -> dict[str, float]:
        import torch

        x = (torch.from_numpy(batch.images).to(self.device).permute(0, 3, 1, 2).float() - self.mean) / self.std
        with autocast(self.device):
            out = self.model(x, with_mask=self.recipe.mask_weight > 0)
        classes = [np.zeros(len(p), np.int64) for p in batch.points]
        foreground = torch.from_numpy(batch.foreground).to(self.device)
        terms = point_losses(out.coords, out.logits, out.mask_logits, batch.points, classes, foreground,
                             self.recipe.weights())
        self.optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        if self.recipe.clip_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.recipe.clip_grad_norm)
        self.optimizer.step()
        return {k: float(v.detach()) for k, v in terms.items()}

    def manifest(self) -> dict[str, Any]:
        from wsiseg.models.prompters.point import IMAGENET_MEAN, IMAGENET_STD

        r = self.recipe
        c = self.model.config
        config = {
            "depths": list(c.depths), "dims": list(c.dims), "num_classes": c.num_classes,
            "num_levels": c.num_levels, "space": c.space, "hidden_dim": c.hidden_dim,
            "filtering": r.filtering, "context_px": r.context_px,
        }
        return self.bundle_manifest(
            "dpa-p2pnet", f"DPA-P2PNet point prompter trained by `wsiseg train prompter` (from {self.source})",
            "dpa_p2pnet", config, input_size=None, normalisation=(IMAGENET_MEAN, IMAGENET_STD),
            nms_radius_px=r.nms_radius_px,
        )

    def validation_run(self) -> ValidationRun:
        return prompter_validation_run(self.recipe.val_segmentor, pipeline_device(self.device))


def train_prompter(
    recipe: PrompterRecipe, out_dir: Path, *, resume: bool = False, progress: bool = True,
    stop_after_epochs: int | None = None,
) -> FitResult:
    """Train a DPA-P2PNet prompter; the bundle lands in out_dir/bundle (see `wsiseg.training.loop.fit`)."""
    return fit_task(PrompterTask, recipe, out_dir, resume=resume, progress=progress,
                    stop_after_epochs=stop_after_epochs)
