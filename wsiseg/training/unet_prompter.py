"""`wsiseg train unet-prompter`: Segment Any Cell's auto-prompt generator, a UNet nuclear-probability map.

Each step: `batch_size` augmented crops of `crop_px` (a multiple of 2 ** (levels - 1)); the
loss is binary cross-entropy of the UNet's logits against the nuclear mask `labels > 0`
(Segment Any Cell trains its 4-level UNet with BCE).  AdamW with a constant learning rate
(1e-3 by default: our choice; the paper gives none).

The bundle is an "unet_prompter" (`wsiseg.models.prompters.ProbabilityPrompter`) whose
points are picked from the map by `selection` ("centroid" of connected components or
"probability" sampling) with the PointSelection fields given here; `wsiseg run --model
SEGMENTOR --prompter BUNDLE` runs it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from wsiseg.training.bundle_task import BundleTask, fit_task, model_of_bundle
from wsiseg.training.loop import FitResult, TrainingError
from wsiseg.training.settings import TrainSettings, autocast, pipeline_device
from wsiseg.training.validation import ValidationRun, prompter_validation_run

if TYPE_CHECKING:
    from wsiseg.datasets.item import NucleusItem
    from wsiseg.models.prompters.probability import PointSelection


@dataclass(frozen=True)
class UNetPrompterRecipe(TrainSettings):
    """TrainSettings plus the UNet (levels, base_channels), init (an unet_prompter bundle to
    start from; its architecture wins), the point selection the bundle runs with (selection,
    threshold, min_area_px, min_spacing_px, context_px) and val_segmentor, the segmentor
    validation runs with."""

    lr: float = 1e-3
    levels: int = 4
    base_channels: int = 32
    init: str | None = None
    selection: str = "centroid"
    threshold: float = 0.5
    min_area_px: int = 16
    min_spacing_px: float = 8.0
    context_px: int = 48
    val_segmentor: str = "classical"

    def __post_init__(self) -> None:
        super().__post_init__()
        from wsiseg.models.prompters.unet import UNetConfig

        multiple = UNetConfig(self.levels, self.base_channels).multiple
        if self.crop_px % multiple:
            raise ValueError(f"crop_px must be a multiple of {multiple} for a {self.levels}-level UNet, "
                             f"got {self.crop_px}")
        self.point_selection()  # validates it
        if self.context_px < 0:
            raise ValueError(f"context_px must be >= 0, got {self.context_px}")

    def point_selection(self) -> PointSelection:
        """The PointSelection the bundle's prompter runs with."""
        from wsiseg.models.prompters.probability import PointSelection

        return PointSelection(method=self.selection, threshold=self.threshold, min_area_px=self.min_area_px,
                              min_spacing_px=self.min_spacing_px)


class UNetPrompterTask(BundleTask[UNetPrompterRecipe]):
    """The TrainingTask of `wsiseg train unet-prompter` (see `wsiseg.training.loop`)."""

    MODE = "unet-prompter"
    COMPONENT = "prompter"

    def __init__(self, recipe: UNetPrompterRecipe, train: list[NucleusItem], val: list[NucleusItem]) -> None:
        import torch

        from wsiseg.models.prompters.point import IMAGENET_MEAN, IMAGENET_STD

        super().__init__(recipe, train, val if recipe.validate_every else [])
        self.mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1)

    def initial_model(self) -> tuple[Any, str]:
        from wsiseg.models.prompters.probability import ProbabilityPrompter
        from wsiseg.models.prompters.unet import UNet, UNetConfig

        recipe = self.recipe
        if recipe.init:
            model, source = model_of_bundle(ProbabilityPrompter.from_bundle, recipe.init)
        else:
            model, source = UNet(UNetConfig(recipe.levels, recipe.base_channels)), "random"
        if recipe.crop_px % model.config.multiple:
            raise TrainingError(f"crop_px {recipe.crop_px} is not a multiple of {model.config.multiple}, "
                                "which the UNet needs; choose another --crop-px")
        return model, source

    def batches(self, epoch: int, rng: np.random.Generator, steps: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for _ in range(steps):
            crops = self.sampler.batch(rng, self.recipe.batch_size)
            yield np.stack([c.image for c in crops]), np.stack([(c.labels > 0).astype(np.float32) for c in crops])

    def step(self, batch: tuple[np.ndarray, np.ndarray]) -> dict[str, float]:
        import torch
        import torch.nn.functional as F

        images, foreground = batch
        x = (torch.from_numpy(images).to(self.device).permute(0, 3, 1, 2).float() - self.mean) / self.std
        with autocast(self.device):
            logits = self.model(x)
        loss = F.binary_cross_entropy_with_logits(logits[:, 0].float(), torch.from_numpy(foreground).to(self.device))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return {"loss": float(loss.detach())}

    def manifest(self) -> dict[str, Any]:
        from wsiseg.models.prompters.point import IMAGENET_MEAN, IMAGENET_STD

        r = self.recipe
        c = self.model.config
        config = {
            "levels": c.levels, "base_channels": c.base_channels, "context_px": r.context_px,
            "selection": r.selection, "threshold": r.threshold, "min_area_px": r.min_area_px,
            "min_spacing_px": r.min_spacing_px,
        }
        return self.bundle_manifest(
            "unet-prompter", f"UNet probability prompter trained by `wsiseg train unet-prompter` (from {self.source})",
            "unet_prompter", config, input_size=None, normalisation=(IMAGENET_MEAN, IMAGENET_STD),
            nms_radius_px=r.min_spacing_px,
        )

    def validation_run(self) -> ValidationRun:
        return prompter_validation_run(self.recipe.val_segmentor, pipeline_device(self.device))


def train_unet_prompter(
    recipe: UNetPrompterRecipe, out_dir: Path, *, resume: bool = False, progress: bool = True,
    stop_after_epochs: int | None = None,
) -> FitResult:
    """Train a UNet probability prompter; the bundle lands in out_dir/bundle (see `wsiseg.training.loop.fit`)."""
    return fit_task(UNetPrompterTask, recipe, out_dir, resume=resume, progress=progress,
                    stop_after_epochs=stop_after_epochs)
