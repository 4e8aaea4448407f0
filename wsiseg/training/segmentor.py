"""`wsiseg train segmentor`: fine-tune (or train) SAM as a point-prompted nucleus segmentor.

Start: an official SAM `.pth` (or a PromptNucSeg segmentor checkpoint), an existing SAM
bundle, or a registered architecture with random weights (`vit_b`, `vit_tiny`, `vit_test`).
What trains (`mode`):
- "full": image encoder and mask decoder (PromptNucSeg);
- "decoder": the mask decoder only;
- "lora": LoRA adapters (rank r) on q and v of every encoder attention block plus the mask
  decoder; every other encoder weight stays as loaded (Segment Any Cell).
The prompt encoder is frozen in every mode (both papers).

Each step: `batch_size` crops of `crop_px` (= SAM's input size, 256 by default as in
PromptNucSeg), up to `instances_per_crop` prompts per crop (`wsiseg.training.sam_prompts`:
a random pixel of the instance, the K nearest other centroids as negatives).  Loss
(PromptNucSeg `segmentor/criterion.py`): 20 focal + 1 Dice on the mask logits upsampled to
the crop, + 1 MSE between the predicted IoU and the soft IoU of the predicted mask with the
truth.  AdamW (lr 1e-4, weight decay 1e-4 as PromptNucSeg), learning rate x 0.1 after
`lr_drop_fraction` of the steps (PromptNucSeg drops at epoch 100 of 200 for PanNuke).

The bundle is a "sam" segmentor (LoRA adapters kept unmerged, with their rank and alpha in
its config) that `wsiseg run --model BUNDLE --prompter NAME` runs; k_negatives is the K it
was trained with ("best_of_both" decoding when K > 0, as PromptNucSeg's CPM-17 ViT-H).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from wsiseg.training.bundle_task import BundleTask, fit_task
from wsiseg.training.loop import FitResult, TrainingError
from wsiseg.training.sam_prompts import sample_instance_prompts
from wsiseg.training.settings import TrainSettings, autocast, pipeline_device
from wsiseg.training.validation import ValidationRun, overlap_for

if TYPE_CHECKING:
    import torch

    from wsiseg.models.sam.build import SamModel
    from wsiseg.models.sam.lora import LoraConfig

log = logging.getLogger(__name__)

MODES = ("full", "decoder", "lora")
#: redraws of a crop without any instance before it is used empty
_EMPTY_CROP_RETRIES = 10


@dataclass(frozen=True)
class SegmentorRecipe(TrainSettings):
    """TrainSettings plus (see the module docstring):

    mode: "full", "decoder" or "lora".  checkpoint / init / arch: where the weights start
    (exactly one).  crop_px: SAM's input size (a multiple of 16).
    instances_per_crop: Z prompts per crop; k_negatives: K; min_instance_px: smallest
    instance (px in the crop) that gets a prompt.
    focal_weight, dice_weight, iou_weight: loss weights.  lr_drop_fraction: share of the
    steps after which the learning rate drops x 0.1 (1: never).
    lora_rank, lora_alpha: of new adapters (and alpha of adapters in a .pth).
    max_nucleus_diameter_px: written to the bundle (sets the pipeline's tile halo).
    val_prompter: the prompter validation runs with.
    """

    lr: float = 1e-4
    mode: str = "full"
    checkpoint: str | None = None
    init: str | None = None
    arch: str | None = None
    instances_per_crop: int = 16
    k_negatives: int = 1
    min_instance_px: int = 4
    focal_weight: float = 20.0
    dice_weight: float = 1.0
    iou_weight: float = 1.0
    lr_drop_fraction: float = 0.5
    lora_rank: int = 4
    lora_alpha: float = 4.0
    max_nucleus_diameter_px: int = 64
    val_prompter: str = "classical"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        sources = [s for s in (self.checkpoint, self.init, self.arch) if s]
        if len(sources) != 1:
            raise ValueError("give exactly one of --checkpoint (SAM .pth), --init (SAM bundle) or --arch "
                             f"(vit_b, vit_tiny, vit_test); got {len(sources)}")
        if self.crop_px % 16:
            raise ValueError(f"SAM's input size (crop_px) must be a multiple of 16, got {self.crop_px}")
        if self.instances_per_crop < 1 or self.k_negatives < 0 or self.min_instance_px < 1:
            raise ValueError("need instances_per_crop >= 1, k_negatives >= 0, min_instance_px >= 1")
        if not 0 < self.lr_drop_fraction <= 1:
            raise ValueError(f"lr_drop_fraction must be in (0, 1], got {self.lr_drop_fraction}")
        if self.max_nucleus_diameter_px < 1:
            raise ValueError(f"max_nucleus_diameter_px must be >= 1, got {self.max_nucleus_diameter_px}")


@dataclass
class InitialSam:
    """A SAM to start from: the model, its variant, normalisation and a description of the source."""

    model: SamModel
    variant: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    source: str


def initial_sam(recipe: SegmentorRecipe) -> InitialSam:
    """The SAM of the recipe's checkpoint, bundle or architecture, at input size crop_px.

    LoRA adapters in the source are kept (mode "lora") or merged into the weights (other
    modes).  Raises TrainingError for an unreadable or non-SAM source.
    """
    from wsiseg.models.bundles import BundleError, open_bundle
    from wsiseg.models.sam.build import SAM_ARCHITECTURES, SAM_PIXEL_MEAN, SAM_PIXEL_STD, build_sam, load_sam_weights
    from wsiseg.models.sam.convert import read_sam_checkpoint, resolve_variant
    from wsiseg.models.sam.lora import LoraConfig, apply_lora, lora_rank_of

    size = recipe.crop_px
    mean, std = SAM_PIXEL_MEAN, SAM_PIXEL_STD
    try:
        if recipe.arch:
            if recipe.arch not in SAM_ARCHITECTURES:
                raise ValueError(f"--arch {recipe.arch!r} is not one of {sorted(SAM_ARCHITECTURES)}")
            return InitialSam(build_sam(recipe.arch, input_size=size), recipe.arch, mean, std,
                              f"random {recipe.arch}")
        if recipe.checkpoint:
            path = Path(recipe.checkpoint)
            where = f"SAM checkpoint {path}"
            state = read_sam_checkpoint(path)
            variant = resolve_variant(state, None, source=where)
            model = build_sam(variant, input_size=size)
            rank = lora_rank_of(state)
            if rank is not None:
                apply_lora(model, rank, recipe.lora_alpha)
            load_sam_weights(model, state, source=where)
            return InitialSam(_merged_unless_lora(model, recipe.mode), variant, mean, std, f"checkpoint {path.name}")
        bundle = open_bundle(str(recipe.init))
        where = f"bundle {bundle.path}"
        comp = bundle.component("segmentor")
        if comp.architecture != "sam":
            raise ValueError(f"{where}: its segmentor is {comp.architecture!r}; --init needs a SAM bundle")
        variant = str(comp.config.get("variant"))
        if variant not in SAM_ARCHITECTURES:
            raise ValueError(f"{where}: segmentor variant {variant!r} is not one of {sorted(SAM_ARCHITECTURES)}")
        bmean, bstd = bundle.manifest.normalisation
        model = build_sam(variant, input_size=size, pixel_mean=bmean, pixel_std=bstd)
        if comp.config.get("lora"):
            lora = LoraConfig.from_dict(comp.config["lora"])
            apply_lora(model, lora.rank, lora.alpha)
        load_sam_weights(model, bundle.load_weights("segmentor"), source=where)
        return InitialSam(_merged_unless_lora(model, recipe.mode), variant, bmean, bstd,
                          f"bundle {bundle.manifest.name}")
    except (OSError, ValueError, BundleError) as exc:
        raise TrainingError(str(exc)) from exc


def _merged_unless_lora(model: SamModel, mode: str) -> SamModel:
    from wsiseg.models.sam.lora import merge_lora

    if mode != "lora":
        merge_lora(model)  # in place
    return model


def set_trainable(model: SamModel, mode: str, lora: LoraConfig) -> None:
    """Freeze and unfreeze for `mode` (adds fresh LoRA adapters in "lora" mode when absent)."""
    from wsiseg.models.sam.lora import apply_lora, has_lora, lora_parameters

    if mode == "lora" and not has_lora(model):
        apply_lora(model, lora.rank, lora.alpha)
    model.requires_grad_(False)
    model.mask_decoder.requires_grad_(True)
    if mode == "full":
        model.image_encoder.requires_grad_(True)
    elif mode == "lora":
        for p in lora_parameters(model):
            p.requires_grad_(True)


def lora_config_of(model: SamModel) -> LoraConfig | None:
    """The adapters' LoraConfig, or None without adapters."""
    from wsiseg.models.sam.lora import LoraQkvLinear

    for block in model.image_encoder.blocks:
        if isinstance(block.attn.qkv, LoraQkvLinear):
            return block.attn.qkv.config  # type: ignore[no-any-return]
    return None


@dataclass(frozen=True)
class SamBatch:
    """images (B, S, S, 3) uint8; points (P, 1 + K, 2) float32; labels (P, 1 + K) int64;
    tile_index (P,) int64 (the crop of each prompt); masks (P, S, S) bool."""

    images: np.ndarray
    points: np.ndarray
    labels: np.ndarray
    tile_index: np.ndarray
    masks: np.ndarray


class SegmentorTask(BundleTask[SegmentorRecipe]):
    """The TrainingTask of `wsiseg train segmentor` (see `wsiseg.training.loop`)."""

    MODE = "segmentor"
    COMPONENT = "segmentor"

    def initial_model(self) -> tuple[SamModel, str]:
        """The recipe's SAM (`initial_sam`) made trainable for its mode; keeps it as `start`
        and its adapters' LoraConfig (None without adapters) as `lora`."""
        from wsiseg.models.sam.lora import LoraConfig

        recipe = self.recipe
        self.start = initial_sam(recipe)
        set_trainable(self.start.model, recipe.mode, LoraConfig(recipe.lora_rank, recipe.lora_alpha))
        self.lora = lora_config_of(self.start.model)
        return self.start.model, self.start.source

    def lr_scheduler(self, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        """x 0.1 from step ceil(lr_drop_fraction * all steps) on."""
        import torch

        r = self.recipe
        drop_at = math.ceil(r.lr_drop_fraction * r.epochs * r.steps_per_epoch)
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.1 if s >= drop_at else 1.0)

    def batches(self, epoch: int, rng: np.random.Generator, steps: int) -> Iterator[SamBatch]:
        r = self.recipe
        for _ in range(steps):
            images, points, labels, tiles, masks = [], [], [], [], []
            for b in range(r.batch_size):
                for _attempt in range(_EMPTY_CROP_RETRIES):
                    crop = self.sampler.sample(rng)
                    prompts = sample_instance_prompts(crop.labels, rng, max_instances=r.instances_per_crop,
                                                      k_negatives=r.k_negatives, min_area_px=r.min_instance_px)
                    if len(prompts):
                        break
                images.append(crop.image)
                points.append(prompts.points)
                labels.append(prompts.labels)
                tiles.append(np.full(len(prompts), b, np.int64))
                masks.append(prompts.masks(crop.labels))
            yield SamBatch(np.stack(images), np.concatenate(points), np.concatenate(labels),
                           np.concatenate(tiles), np.concatenate(masks))

    def losses(self, logits: torch.Tensor, iou: torch.Tensor, masks: torch.Tensor) -> dict[str, torch.Tensor]:
        """Loss terms of (P, S, S) mask logits and (P,) predicted IoU against (P, S, S) masks."""
        import torch.nn.functional as F

        from wsiseg.training.losses import sigmoid_focal_loss, soft_dice_loss, soft_iou

        r = self.recipe
        focal = sigmoid_focal_loss(logits, masks)
        dice = soft_dice_loss(logits, masks)
        iou_target = soft_iou(logits.detach().float().sigmoid(), masks)
        iou_mse = F.mse_loss(iou.float(), iou_target)
        loss = r.focal_weight * focal + r.dice_weight * dice + r.iou_weight * iou_mse
        return {"loss": loss, "focal": focal, "dice": dice, "iou_mse": iou_mse}

    def step(self, batch: SamBatch) -> dict[str, float]:
        import torch

        if len(batch.points) == 0:  # no instance in any crop: nothing to learn from
            log.warning("a batch without instances was skipped; check the dataset's labels")
            self.scheduler.step()
            return {"loss": 0.0, "focal": 0.0, "dice": 0.0, "iou_mse": 0.0}
        dev = self.device
        size = self.recipe.crop_px
        images = self.model.preprocess(torch.from_numpy(batch.images).to(dev))
        points = torch.from_numpy(batch.points).to(dev)
        labels = torch.from_numpy(batch.labels).to(dev)
        tiles = torch.from_numpy(batch.tile_index).to(dev)
        masks = torch.from_numpy(batch.masks).to(dev)
        with autocast(dev):
            if self.recipe.mode == "decoder":
                with torch.no_grad():
                    embeddings = self.model.encode(images)
            else:
                embeddings = self.model.encode(images)
            low, iou = self.model.decode(embeddings, tiles, points, labels)
        logits = self.model.upsample_logits(low, size, size)
        terms = self.losses(logits, iou, masks)
        self.optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        self.optimizer.step()
        self.scheduler.step()
        return {k: float(v.detach()) for k, v in terms.items()}

    def manifest(self) -> dict[str, Any]:
        r = self.recipe
        variant = self.start.variant
        config: dict[str, Any] = {"variant": variant, "negatives_mode": "best_of_both" if r.k_negatives else "with"}
        if self.lora is not None:
            config["lora"] = self.lora.to_dict()
        return self.bundle_manifest(
            f"sam-{variant}-{r.mode}",
            f"SAM {variant} segmentor trained by `wsiseg train segmentor` ({r.mode}, from {self.start.source})",
            "sam", config, input_size=r.crop_px, normalisation=(self.start.mean, self.start.std),
            k_negatives=r.k_negatives, max_nucleus_diameter_px=r.max_nucleus_diameter_px,
        )

    def validation_run(self) -> ValidationRun:
        return ValidationRun("segmentor", self.recipe.val_prompter, tile_size_px=self.recipe.crop_px,
                             overlap_px=overlap_for(self.recipe.crop_px), device=pipeline_device(self.device))


def train_segmentor(
    recipe: SegmentorRecipe, out_dir: Path, *, resume: bool = False, progress: bool = True,
    stop_after_epochs: int | None = None,
) -> FitResult:
    """Train a SAM segmentor; the bundle lands in out_dir/bundle (see `wsiseg.training.loop.fit`)."""
    return fit_task(SegmentorTask, recipe, out_dir, resume=resume, progress=progress,
                    stop_after_epochs=stop_after_epochs)
