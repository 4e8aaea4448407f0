"""`wsiseg train tiny`: train wsiseg-tiny (one UNet, three maps) from labelled images.

Recipe (a TOML file, see `recipes/wsiseg-tiny.toml`): every image is resampled to the model's
mpp; each step draws `batch_size` images (probability proportional to their area at the model's
mpp, or equal for every image with `sample_by = "image"`), a random
window of each (scale jitter around the model mpp, flips, 90° rotations, HED stain jitter,
blur, JPEG; `wsiseg.training.augment`), computes the dense targets of `wsiseg.training.targets`
on the window with a margin (so nuclei cut by the crop keep their own centroid and distance)
and crops the centre `crop_px` square.

Loss (our own weighting): foreground BCE + soft Dice; centre heatmap BCE on soft targets,
weighted 1 + 4 x target so the rare peak pixels count; distance MSE on the sigmoid output;
with `contact_weight` > 0, the foreground BCE and distance MSE weigh pixels near two different
nuclei (`wsiseg.training.targets.contact_map`) 1 + contact_weight times, so touching nuclei are
separated (the U-Net paper's border weights, Ronneberger et al. 2015);
with `hv_weight` > 0, two more outputs learn HoVer-Net's horizontal and vertical maps
(`wsiseg.training.targets.hv_maps`; h = 2 sigmoid - 1): hv_weight x their MSE plus
`hv_gradient_weight` x the MSE of their derivatives along their own axis over the nuclei
(HoVer-Net's loss, Graham et al. 2019, with 5x5 Sobel kernels scaled to slope per
pixel), and inference cuts the distance map where they fall (`wsiseg.models.tiny.maps.fold_hv`);
with a teacher, `distill_weight` x the MSE between the teacher's and the student's three maps.
A run can start from a trained bundle (`init_bundle`), slimmed when it is wider and widened
when it is narrower (`wsiseg.training.slim`).  AdamW with a cosine learning-rate schedule over all steps (Loshchilov & Hutter 2019).
"""

from __future__ import annotations

import logging
import math
import tomllib
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from wsiseg.datasets.item import NucleusItem
from wsiseg.models.tiny.maps import N_MAPS, PRECISIONS, check_hv
from wsiseg.training.augment import AugmentConfig, augment_pair, rescale
from wsiseg.training.loop import FitResult, LoopConfig, TrainingError, fit
from wsiseg.training.settings import unknown_keys_message
from wsiseg.training.targets import contact_map, dense_targets, hv_maps

log = logging.getLogger(__name__)

MARGIN_PX = 32


@dataclass(frozen=True)
class TinyRecipe:
    """Everything that decides a wsiseg-tiny training run (the TOML file's keys, flattened)."""

    data: str
    #: µm/px of dataset images whose files and manifests state none (0: every image must state it)
    data_mpp: float = 0.0
    val_fraction: float = 0.25
    exclude: tuple[str, ...] = ()
    mpp_overrides: dict[str, float] = field(default_factory=dict)
    #: the model card's facts (data, licence, citations, intended use), copied into the manifest
    card: dict[str, Any] = field(default_factory=dict)
    name: str = "wsiseg-tiny"
    version: str = "1.0"
    mpp: float = 0.25
    levels: int = 5
    base_channels: int = 16
    epochs: int = 20
    steps_per_epoch: int = 100
    batch_size: int = 8
    crop_px: int = 256
    lr: float = 2e-3
    weight_decay: float = 1e-4
    seed: int = 0
    precision: str = "fp32"
    threads: int = 0
    centre_sigma_px: float = 2.5
    centre_weight: float = 1.0
    distance_weight: float = 2.0
    scale_jitter: float = 0.1
    validate_every: int = 1
    threshold: float = 0.3
    prompt_source: str = "centre"
    core_threshold: float = 0.5
    #: the prompter's point score: "foreground" (core's mean foreground probability) or "centre"
    #: (the centre heatmap's peak in the core; see wsiseg.models.tiny.prompter)
    score: str = "foreground"
    min_distance_px: int = 4
    foreground_threshold: float = 0.5
    max_nucleus_diameter_px: int = 64
    nms_radius_px: float = 4.0
    k_negatives: int = 8
    context_px: int = 48
    tile_px: int = 512
    #: the exported bundle's precision: "auto" (bf16 where the hardware has it), "fp32" or "bf16"
    inference_precision: str = "fp32"
    #: start from this bundle's prompter weights (a folder; relative paths are relative to the
    #: TOML file) instead of random ones; `init_sha256` must name those weights' sha256
    init_bundle: str = ""
    init_sha256: str = ""
    #: seeds the training crops when >= 0 (default: `seed`, which also draws the validation
    #: split); a continued run sets it so it sees other crops than its starting run
    crop_seed: int = -1
    #: distillation (Hinton et al. 2015, "Distilling the Knowledge in a Neural Network"): this
    #: bundle's network (a wsiseg-tiny prompter; `teacher_sha256` pins its weights) runs on every
    #: training crop, and `distill_weight` x the mean squared difference between its three maps
    #: and the student's is added to the loss; 0 turns it off
    teacher_bundle: str = ""
    teacher_sha256: str = ""
    distill_weight: float = 0.0
    #: extra loss weight of the pixels within `contact_px` of two different nuclei (see the
    #: module docstring); 0 turns it off
    contact_weight: float = 0.0
    contact_px: int = 3
    #: HoVer-Net's horizontal and vertical maps as two more outputs (see the module docstring): the
    #: weight of their MSE (0: none) and of their derivatives' MSE, and the exported bundle's
    #: `HvSettings` (step_px, saturation) that fold them into the distance map
    hv_weight: float = 0.0
    hv_gradient_weight: float = 2.0
    hv_step_px: int = 1
    hv_saturation: float = 0.5
    #: how training crops are drawn: "area" (each image in proportion to its area at the model's
    #: mpp, so an image resampled 2x up is drawn 4x as often) or "image" (every image alike)
    sample_by: str = "area"

    def __post_init__(self) -> None:
        if bool(self.init_bundle) != bool(self.init_sha256):
            raise ValueError("init_bundle and init_sha256 go together (the sha256 pins the starting weights; it is in "
                             "the bundle's manifest.json: components.prompter.weights.sha256)")
        if bool(self.teacher_bundle) != bool(self.teacher_sha256):
            raise ValueError("teacher_bundle and teacher_sha256 go together (the sha256 pins the teacher's weights; it is "
                             "in the bundle's manifest.json: components.prompter.weights.sha256)")
        if self.distill_weight < 0:
            raise ValueError(f"distill_weight must be >= 0, got {self.distill_weight}")
        if self.distill_weight > 0 and not self.teacher_bundle:
            raise ValueError("distill_weight > 0 needs a teacher: set teacher_bundle and teacher_sha256, or distill_weight = 0")
        if self.teacher_bundle and self.distill_weight == 0:
            raise ValueError("a teacher_bundle needs distill_weight > 0 (e.g. 1.0), or remove teacher_bundle")
        for key, example in (("contact_weight", "e.g. 4.0; 0: off"), ("hv_weight", "e.g. 1.0; 0: off"),
                             ("hv_gradient_weight", "e.g. 2.0")):
            value = getattr(self, key)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{key} must be a finite number >= 0 ({example}), got {value!r}")
        if not isinstance(self.contact_px, int) or isinstance(self.contact_px, bool) or self.contact_px < 1:
            raise ValueError(f"contact_px must be a whole number of pixels >= 1 (e.g. 3), got {self.contact_px!r}")
        if self.hv_weight > 0:  # checked here, not at export
            check_hv(self.hv_step_px, self.hv_saturation, names=("hv_step_px", "hv_saturation"))
        if self.sample_by not in ("area", "image"):
            raise ValueError(f"sample_by must be 'area' or 'image', got {self.sample_by!r}")
        if self.data_mpp < 0:
            raise ValueError(f"data_mpp must be > 0 (or 0: none), got {self.data_mpp}")
        if self.crop_px % (2 ** (self.levels - 1)):
            raise ValueError(f"crop_px {self.crop_px} must be a multiple of {2 ** (self.levels - 1)}")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be 'fp32' or 'bf16', got {self.precision!r}")
        if self.inference_precision not in PRECISIONS:
            raise ValueError(f"inference_precision must be one of {', '.join(PRECISIONS)}, got {self.inference_precision!r}")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.batch_size < 1 or self.lr <= 0:
            raise ValueError("batch_size must be >= 1 and lr > 0")

    @classmethod
    def from_toml(cls, path: Path, **overrides: Any) -> TinyRecipe:
        """Read a recipe; relative data paths are relative to the TOML file.  Unknown keys are an error."""
        path = Path(path)
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ValueError(f"{path}: cannot read the recipe: {exc}") from exc
        flat: dict[str, Any] = {}
        for key, value in raw.items():
            if isinstance(value, dict) and key not in ("mpp_overrides", "card"):
                flat.update(value)
            else:
                flat[key] = value
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(flat) - known)
        if unknown:
            raise ValueError(f"{path}: {unknown_keys_message(unknown, known)}")
        flat.update({k: v for k, v in overrides.items() if v is not None})
        data = Path(str(flat.get("data", "")))
        if not data.is_absolute():
            flat["data"] = str((path.parent / data).resolve())
        for key in ("init_bundle", "teacher_bundle"):
            given = Path(str(flat.get(key, "")))
            if flat.get(key) and not given.is_absolute():
                flat[key] = str((path.parent / given).resolve())
        flat["exclude"] = tuple(flat.get("exclude", ()))
        try:
            return cls(**flat)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{path}: {exc}") from exc


def to_model_mpp(item: NucleusItem, mpp: float, override: float | None) -> tuple[np.ndarray, np.ndarray]:
    """The item's image and labels resampled from its mpp (or `override`) to `mpp`."""
    factor = (override or item.mpp) / mpp
    return rescale(item.image, item.labels, factor)


def sample_window(
    image: np.ndarray, labels: np.ndarray, rng: np.random.Generator, crop_px: int, augment: AugmentConfig,
    centre_sigma_px: float = 2.5, contact_px: int = 0, hv: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """One augmented (crop_px, crop_px, 3) uint8 crop and its (3, crop_px, crop_px) float32
    targets (foreground, centre, distance); with hv, two more channels: `hv_maps(labels)`; with
    contact_px > 0, one more after those: 1 on `contact_map(labels, contact_px)`, else 0."""
    scale = float(rng.uniform(1 - augment.scale_jitter, 1 + augment.scale_jitter))
    window = int(math.ceil((crop_px + 2 * MARGIN_PX) / scale)) + 2
    h, w = labels.shape
    if h < window or w < window:
        pad = ((0, max(0, window - h)), (0, max(0, window - w)))
        image = np.pad(image, (*pad, (0, 0)), mode="reflect")
        labels = np.pad(labels, pad, mode="constant")
        h, w = labels.shape
    y0 = int(rng.integers(0, h - window + 1))
    x0 = int(rng.integers(0, w - window + 1))
    img, lab = rescale(image[y0 : y0 + window, x0 : x0 + window], labels[y0 : y0 + window, x0 : x0 + window], scale)
    img, lab = augment_pair(img, lab, rng, augment)
    targets = dense_targets(lab, centre_sigma_px=centre_sigma_px).stack()
    if hv:
        targets = np.concatenate([targets, hv_maps(lab)])
    if contact_px > 0:
        targets = np.concatenate([targets, contact_map(lab, contact_px)[None].astype(np.float32)])
    cy, cx = (lab.shape[0] - crop_px) // 2, (lab.shape[1] - crop_px) // 2
    return (
        np.ascontiguousarray(img[cy : cy + crop_px, cx : cx + crop_px]),
        np.ascontiguousarray(targets[:, cy : cy + crop_px, cx : cx + crop_px]),
    )


def sobel_along_axis(hv: Any) -> Any:
    """(B, 2, H, W) h and v maps -> their derivatives (per pixel) along x (h) and y (v), by 5x5
    Sobel kernels (the smoothing [1, 4, 6, 4, 1] / 16 across, the derivative [-1, -2, 0, 2, 1] / 8
    along, so a map rising by 1 a pixel gives 1), the edges repeated."""
    import torch
    import torch.nn.functional as F

    smooth = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0]) / 16
    slope = torch.tensor([-1.0, -2.0, 0.0, 2.0, 1.0]) / 8
    along_x = (smooth[:, None] * slope[None, :]).to(hv.dtype)
    kernels = torch.stack([along_x, along_x.T]).unsqueeze(1)  # (2, 1, 5, 5): h along x, v along y
    return F.conv2d(F.pad(hv, (2, 2, 2, 2), mode="replicate"), kernels, groups=2)


class TinyTask:
    """The TrainingTask of wsiseg-tiny (see `wsiseg.training.loop`)."""

    def __init__(self, recipe: TinyRecipe, train: list[NucleusItem], val: list[NucleusItem]) -> None:
        import torch

        from wsiseg.models.tiny.maps import build_network
        from wsiseg.models.prompters.point import IMAGENET_MEAN, IMAGENET_STD

        if not train:
            raise TrainingError(f"{recipe.data}: no training images left after the validation split and exclusions")
        self.recipe = recipe
        self.val = val
        self.images = [to_model_mpp(it, recipe.mpp, recipe.mpp_overrides.get(it.name)) for it in train]
        areas = np.array([lab.size for _, lab in self.images], np.float64)
        if recipe.sample_by == "image":
            areas = np.ones_like(areas)
        self.weights = areas / areas.sum()
        self.augment = AugmentConfig(scale_jitter=recipe.scale_jitter)
        self.teacher = load_teacher(recipe) if recipe.distill_weight > 0 else None  # checked first
        torch.manual_seed(recipe.seed)  # the initial weights are part of the recipe
        self.model = build_network(self.network_config())
        if recipe.init_bundle:
            load_initial_weights(self.model, recipe)
        self.model = self.model.to(memory_format=torch.channels_last)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
        total = recipe.epochs * recipe.steps_per_epoch
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total))
        )
        self.mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)

    def batches(self, epoch: int, rng: np.random.Generator, steps: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        r = self.recipe
        contact = r.contact_px if r.contact_weight > 0 else 0
        for _ in range(steps):
            picks = rng.choice(len(self.images), size=r.batch_size, p=self.weights)
            crops = [sample_window(*self.images[i], rng, r.crop_px, self.augment, r.centre_sigma_px, contact,
                                   hv=r.hv_weight > 0) for i in picks]
            yield np.stack([c[0] for c in crops]), np.stack([c[1] for c in crops])

    def network_config(self) -> dict[str, Any]:
        """The UNet's component config: levels, base_channels and, with HoVer maps, "hv"."""
        r = self.recipe
        config: dict[str, Any] = {"levels": r.levels, "base_channels": r.base_channels}
        if r.hv_weight > 0:
            config["hv"] = {"step_px": r.hv_step_px, "saturation": r.hv_saturation}
        return config

    def losses(self, logits: Any, targets: Any, teacher_maps: Any = None) -> dict[str, Any]:
        """Loss terms of (B, 3, H, W) logits (5 with `hv_weight`) against the targets of
        `sample_window` (see the module docstring): foreground, centre, distance, then h and v
        with `hv_weight`, then the contact channel with `contact_weight`, which weighs the
        foreground BCE and the distance MSE; with (B, 3, H, W) teacher probabilities, the
        distillation term (`distill_weight`) on the first three maps."""
        import torch
        import torch.nn.functional as F

        logits = logits.float()
        fg_t, centre_t, dist_t = targets[:, 0], targets[:, 1], targets[:, 2]
        r = self.recipe
        hv = r.hv_weight > 0
        contact_at = N_MAPS + 2 if hv else N_MAPS
        weight = 1 + r.contact_weight * targets[:, contact_at] if targets.shape[1] > contact_at else None
        fg_bce = F.binary_cross_entropy_with_logits(logits[:, 0], fg_t, weight=weight)
        p = torch.sigmoid(logits[:, 0])
        inter = (p * fg_t).sum(dim=(1, 2))
        dice = 1 - (2 * inter + 1) / (p.sum(dim=(1, 2)) + fg_t.sum(dim=(1, 2)) + 1)
        centre = F.binary_cross_entropy_with_logits(logits[:, 1], centre_t, weight=1 + 4 * centre_t)
        if weight is None:
            dist = F.mse_loss(torch.sigmoid(logits[:, 2]), dist_t)
        else:
            dist = (weight * (torch.sigmoid(logits[:, 2]) - dist_t) ** 2).mean()
        loss = fg_bce + dice.mean() + r.centre_weight * centre + r.distance_weight * dist
        terms = {"fg_bce": fg_bce, "fg_dice": dice.mean(), "centre": centre, "distance": dist}
        if hv:
            hv_p = 2 * torch.sigmoid(logits[:, N_MAPS : N_MAPS + 2]) - 1
            hv_t = targets[:, N_MAPS : N_MAPS + 2]
            terms["hv"] = F.mse_loss(hv_p, hv_t)
            inside = fg_t.unsqueeze(1).expand_as(hv_p)
            squared = (sobel_along_axis(hv_p) - sobel_along_axis(hv_t)) ** 2
            terms["hv_gradient"] = (squared * inside).sum() / inside.sum().clamp(min=1)
            loss = loss + r.hv_weight * terms["hv"] + r.hv_gradient_weight * terms["hv_gradient"]
        if teacher_maps is not None:
            terms["distill"] = F.mse_loss(torch.sigmoid(logits[:, :N_MAPS]), teacher_maps[:, :N_MAPS])
            loss = loss + r.distill_weight * terms["distill"]
        return {"loss": loss, **terms}

    def step(self, batch: tuple[np.ndarray, np.ndarray]) -> dict[str, float]:
        import torch

        images, targets = batch
        x = (torch.from_numpy(images).permute(0, 3, 1, 2).float() - self.mean) / self.std
        x = x.contiguous(memory_format=torch.channels_last)
        t = torch.from_numpy(targets)
        teacher_maps = None
        if self.teacher is not None:
            with torch.no_grad():
                teacher_maps = torch.sigmoid(self.teacher(x))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.recipe.precision == "bf16"):
            logits = self.model(x)
        terms = self.losses(logits, t, teacher_maps)
        self.optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        self.optimizer.step()
        self.scheduler.step()
        return {k: float(v.detach()) for k, v in terms.items()}

    def manifest(self) -> dict[str, Any]:
        r = self.recipe
        common = {**self.network_config(), "precision": r.inference_precision}
        weights = {"file": "network.safetensors"}
        return {
            "name": r.name,
            "version": r.version,
            "description": "one UNet's foreground, centre and distance maps"
            f"{' (cut where its horizontal and vertical maps fall)' if r.hv_weight > 0 else ''} at "
            f"{r.mpp} µm/px; {'distance-core' if r.prompt_source == 'distance' else 'centre-peak'} prompter, "
            "seeded-watershed segmentor",
            "mpp": r.mpp,
            "input_size": None,
            "k_negatives": r.k_negatives,
            "nms_radius_px": r.nms_radius_px,
            "max_nucleus_diameter_px": r.max_nucleus_diameter_px,
            "components": {
                "prompter": {
                    "architecture": "tiny_prompter",
                    "config": {**common, "threshold": r.threshold, "source": r.prompt_source,
                               "core_threshold": r.core_threshold, "score": r.score,
                               "min_distance_px": r.min_distance_px,
                               "foreground_threshold": r.foreground_threshold, "context_px": r.context_px},
                    "weights": dict(weights),
                },
                "segmentor": {
                    "architecture": "tiny_segmentor",
                    "config": {**common, "foreground_threshold": r.foreground_threshold, "tile_px": r.tile_px},
                    "weights": dict(weights),
                },
            },
        }

    def write_bundle(self, out_dir: Path, state: dict[str, Any], extra: dict[str, Any] | None = None) -> Path:
        from wsiseg.models.bundles import write_bundle

        manifest = self.manifest()
        manifest.update(extra or {})
        bundle = write_bundle(out_dir, manifest, {"prompter": state, "segmentor": state})
        return Path(bundle.path)

    def validate(self, epoch: int, work_dir: Path) -> dict[str, float]:
        from wsiseg.training.validation import validate_bundle

        state = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        return validate_bundle(lambda folder: self.write_bundle(folder, state), self.val, work_dir, epoch, None)

    def export(self, out_dir: Path, state: dict[str, Any], history: list[dict[str, Any]]) -> Path:
        r = self.recipe
        training = {
            # paths on the training machine stay out (init_sha256 names the starting weights)
            "recipe": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(r).items()
                       if k not in ("data", "card", "init_bundle", "teacher_bundle")},
            "train_images": len(self.images),
            "validation_images": [it.name for it in self.val],
            "last_epoch": history[-1] if history else None,
        }
        return self.write_bundle(out_dir, state, {"model_card": dict(r.card), "training": training})


def load_initial_weights(model: Any, recipe: TinyRecipe) -> None:
    """Load the prompter weights of `recipe.init_bundle` into `model`.  A bundle whose UNet has
    the recipe's levels but more channels is slimmed to the recipe's `base_channels` first
    (`wsiseg.training.slim`: each layer keeps its channels of largest BatchNorm scale); one with
    fewer channels is widened to them (`widen_unet_state`: nothing reads the added channels at
    first, so the run starts from the bundle's own maps).  A three-output bundle starts a recipe
    with HoVer maps (`hv_weight`) with its three maps as they were and fresh h and v outputs
    (`add_unet_outputs`).

    Raises TrainingError when the bundle cannot be opened, its weights' sha256 is not
    `recipe.init_sha256` (another model than the recipe names), or the weights do not fit.
    """
    from wsiseg.models.prompters.point import load_state
    from wsiseg.models.prompters.unet import UNetConfig
    from wsiseg.models.tiny.maps import network_config
    from wsiseg.training.slim import add_unet_outputs, slim_unet_state, widen_unet_state

    where = f"init_bundle {recipe.init_bundle}"
    state, config, mpp = _pinned_weights(recipe.init_bundle, recipe.init_sha256, where, "init_sha256")
    if abs(mpp - recipe.mpp) > 1e-6:
        log.warning("%s works at %g µm/px and the recipe at %g µm/px: training adapts it to the recipe's resolution",
                    where, mpp, recipe.mpp)
    own = network_config(config)  # the bundle's UNet, wider or narrower than the recipe's
    if own.levels != recipe.levels:
        raise TrainingError(
            f"{where}: its UNet has {own.levels} levels; a run started from it needs levels = {own.levels} "
            f"in the recipe (the recipe has levels = {recipe.levels})"
        )
    fresh = model.state_dict()
    outputs = int(fresh["head.weight"].shape[0])
    if own.out_channels > outputs:
        raise TrainingError(
            f"{where}: its UNet has {own.out_channels} outputs (horizontal and vertical maps); a run started from it "
            f"needs them too: set hv_weight > 0 in the recipe"
        )
    try:
        target = UNetConfig(recipe.levels, recipe.base_channels, out_channels=own.out_channels)
        if own.base_channels > recipe.base_channels:
            state = slim_unet_state(state, own, target)
            log.info("%s: slimmed from %d to %d base channels", where, own.base_channels, target.base_channels)
        elif own.base_channels < recipe.base_channels:
            own_head = {k: (v[: own.out_channels] if k.startswith("head.") else v) for k, v in fresh.items()}
            state = widen_unet_state(state, own, target, own_head)
            log.info("%s: widened from %d to %d base channels", where, own.base_channels, target.base_channels)
        if own.out_channels < outputs:
            state = add_unet_outputs(state, fresh)
            log.info("%s: %d outputs extended to %d (fresh h and v maps)", where, own.out_channels, outputs)
        load_state(model, state, where=where)
    except (OSError, ValueError) as exc:
        raise TrainingError(f"{where}: cannot start from it: {exc}") from exc


def load_teacher(recipe: TinyRecipe) -> Any:
    """The network of `recipe.teacher_bundle` in its inference form (eval mode, BatchNorm
    folded, channels-last); raises TrainingError as `load_initial_weights` does."""
    import torch

    from wsiseg.models.prompters.point import load_state
    from wsiseg.models.tiny.maps import build_network

    where = f"teacher_bundle {recipe.teacher_bundle}"
    state, config, mpp = _pinned_weights(recipe.teacher_bundle, recipe.teacher_sha256, where, "teacher_sha256")
    if abs(mpp - recipe.mpp) > 1e-6:
        raise TrainingError(
            f"{where}: it works at {mpp} µm/px and the recipe at {recipe.mpp}; a teacher must see the crops at its "
            "own resolution: choose a teacher trained at the recipe's mpp, or set the recipe's mpp to the teacher's"
        )
    try:
        network: Any = build_network(config)
        load_state(network, state, where=where)
    except (OSError, ValueError, TypeError) as exc:
        raise TrainingError(f"{where}: cannot use it as the teacher: {exc}") from exc
    teacher = network.fused_for_inference().to(memory_format=torch.channels_last)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def _pinned_weights(folder: str, sha256: str, where: str, sha_key: str) -> tuple[dict[str, Any], dict[str, Any], float]:
    """(prompter state, prompter config, the bundle's mpp) of a bundle whose prompter weights
    have `sha256`; errors start with `where` and name the recipe key `sha_key` to correct."""
    from wsiseg.models.bundles import BundleError, open_bundle

    try:
        bundle = open_bundle(folder)
        component = bundle.component("prompter")
        if component.sha256 != sha256:
            raise TrainingError(
                f"{where}: its prompter weights have sha256 {component.sha256}, the recipe asks for {sha256}; "
                f"if this is the bundle you mean, copy its sha256 (manifest.json: components.prompter.weights.sha256) "
                f"into {sha_key}; if the recipe names a model you have not trained yet, train it first (see the recipe's comments)"
            )
        return bundle.load_weights("prompter"), dict(component.config), float(bundle.manifest.mpp)
    except (BundleError, OSError, ValueError) as exc:
        raise TrainingError(f"{where}: cannot open it: {exc}") from exc


def split_items(recipe: TinyRecipe) -> tuple[list[NucleusItem], list[NucleusItem]]:
    """(train, val) items: the dataset's seeded split by whole image (`val_fraction`, `seed`, the
    same split as `wsiseg eval --split val --val-fraction F --seed S`), exclusions dropped."""
    from wsiseg.datasets import open_dataset

    mpp = recipe.data_mpp or None
    train = open_dataset(recipe.data, split="train", val_fraction=recipe.val_fraction, seed=recipe.seed, mpp=mpp)
    val = open_dataset(recipe.data, split="val", val_fraction=recipe.val_fraction, seed=recipe.seed, mpp=mpp)
    keep = [i for i, name in enumerate(train.names) if name not in recipe.exclude]
    return [train[i] for i in keep], [val[i] for i in range(len(val))]


def train_tiny(
    recipe: TinyRecipe, out_dir: Path, *, resume: bool = False, progress: bool = True,
    stop_after_epochs: int | None = None,
) -> FitResult:
    """Train wsiseg-tiny; the bundle lands in out_dir/bundle (see `wsiseg.training.loop.fit`)."""
    import torch

    if recipe.threads:
        torch.set_num_threads(recipe.threads)
    train, val = split_items(recipe)
    log.info("wsiseg-tiny: %d training images, %d validation images", len(train), len(val))
    task = TinyTask(recipe, train, val)
    loop = LoopConfig(
        epochs=recipe.epochs, steps_per_epoch=recipe.steps_per_epoch,
        seed=recipe.crop_seed if recipe.crop_seed >= 0 else recipe.seed,
        validate_every=recipe.validate_every if val else 0, monitor="pq", patience=None, keep="last",
    )
    return fit(task, out_dir, loop, resume=resume, progress=progress, stop_after_epochs=stop_after_epochs,
               settings=_run_settings(recipe))


def _run_settings(recipe: TinyRecipe) -> dict[str, Any]:
    """What must not change when a run is resumed: the training recipe (inference settings and
    the model card only shape the exported bundle, so they may)."""
    inference = {"threshold", "prompt_source", "core_threshold", "score", "min_distance_px", "foreground_threshold",
                 "max_nucleus_diameter_px", "nms_radius_px", "k_negatives", "context_px", "inference_precision",
                 "tile_px", "card", "name", "version", "validate_every", "data", "data_mpp", "hv_step_px", "hv_saturation"}
    return {k: v for k, v in asdict(recipe).items() if k not in inference}
