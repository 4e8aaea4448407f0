"""What the learned `wsiseg train` modes (segmentor, prompter, unet-prompter) do alike.

`BundleTask` is the shared part of their `wsiseg.training.loop.TrainingTask`: a seeded start
on the recipe's device, AdamW over the trainable parameters, the recipe's crop sampler
(`wsiseg.training.crops`), the model written as a bundle (for validation, and for export
with the run's "training" record) and validation of that bundle
(`wsiseg.training.validation`).  A mode subclasses it with its starting model, batches, step,
manifest and validation run; `fit_task` splits the dataset and runs the task through `fit`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

from wsiseg.training.augment import AugmentConfig
from wsiseg.training.crops import CropSampler
from wsiseg.training.loop import FitResult, TrainingError, fit
from wsiseg.training.settings import TrainSettings, split_dataset, torch_device
from wsiseg.training.validation import ValidationRun, validate_bundle

if TYPE_CHECKING:
    import numpy as np

    from wsiseg.datasets.item import NucleusItem

log = logging.getLogger(__name__)

R = TypeVar("R", bound=TrainSettings)


class BundleTask(Generic[R]):
    """The TrainingTask parts every learned mode shares (see the module docstring).

    A subclass sets MODE (its `wsiseg train` mode), COMPONENT (the bundle component the
    model is: "segmentor" or "prompter") and CROP_MARGIN_PX (label margin of the training crops),
    and defines initial_model, manifest, validation_run, batches and step; lr_scheduler when
    the learning rate changes.  After __init__: recipe, val (the validation items), device
    (torch.device), model (on device), source (where the weights started), optimizer,
    scheduler, sampler (CropSampler) and n_train (number of training images).
    """

    MODE: ClassVar[str]
    COMPONENT: ClassVar[str]
    CROP_MARGIN_PX: ClassVar[int] = 0

    def __init__(self, recipe: R, train: list[NucleusItem], val: list[NucleusItem]) -> None:
        import torch

        self.recipe = recipe
        self.val = val
        self.device = torch_device(recipe.device)
        torch.manual_seed(recipe.seed)  # random architectures and fresh adapters
        model, self.source = self.initial_model()
        self.model = model.to(self.device)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
        self.scheduler = self.lr_scheduler(self.optimizer)
        augment = AugmentConfig(scale_jitter=recipe.scale_jitter) if recipe.augment else None
        self.sampler = CropSampler(train, mpp=recipe.mpp, crop_px=recipe.crop_px, margin_px=self.CROP_MARGIN_PX,
                                   augment=augment)
        self.n_train = len(train)

    def initial_model(self) -> tuple[Any, str]:
        """(the torch.nn.Module to train, a description of where its weights start); called by
        __init__ after seeding torch, the model is moved to `device` after.  Raises
        TrainingError for a source that cannot be used."""
        raise NotImplementedError

    def batches(self, epoch: int, rng: np.random.Generator, steps: int) -> Iterator[Any]:
        """`steps` training batches of one epoch, drawn from rng."""
        raise NotImplementedError

    def step(self, batch: Any) -> dict[str, float]:
        """One forward/backward/optimiser step; returns the losses (floats, key "loss" first)."""
        raise NotImplementedError

    def lr_scheduler(self, optimizer: Any) -> Any:
        """A torch LR scheduler stepped once per step, or None for a constant learning rate."""
        return None

    def manifest(self) -> dict[str, Any]:
        """The bundle manifest of the model (without the "training" record)."""
        raise NotImplementedError

    def validation_run(self) -> ValidationRun:
        """How validation combines the bundle with another model."""
        raise NotImplementedError

    def bundle_manifest(
        self,
        default_name: str,
        description: str,
        architecture: str,
        config: dict[str, Any],
        *,
        input_size: int | None,
        normalisation: tuple[Any, Any],
        **fields: Any,
    ) -> dict[str, Any]:
        """A manifest of the recipe's name (else `default_name`), version and mpp with the
        given description, input size (px, None: any), normalisation ((mean, std), RGB in
        0..255), other top-level `fields`, and the model as COMPONENT of `architecture`."""
        r = self.recipe
        mean, std = normalisation
        return {
            "name": r.name or default_name,
            "version": r.version,
            "description": description,
            "mpp": r.mpp,
            "input_size": input_size,
            "normalisation": {"mean": list(mean), "std": list(std)},
            **fields,
            "components": {self.COMPONENT: {"architecture": architecture, "config": config}},
        }

    def write_bundle(self, out_dir: Path, state: dict[str, Any], extra: dict[str, Any] | None = None) -> Path:
        """Write the manifest (plus `extra` top-level keys) and `state` as a bundle; its path."""
        from wsiseg.models.bundles import write_bundle

        manifest = {**self.manifest(), **(extra or {})}
        return Path(write_bundle(out_dir, manifest, {self.COMPONENT: state}).path)

    def current_state(self) -> dict[str, Any]:
        """The model's state dict, detached, on the CPU."""
        return {k: v.detach().cpu() for k, v in self.model.state_dict().items()}

    def validate(self, epoch: int, work_dir: Path) -> dict[str, float]:
        run = self.validation_run()
        state = self.current_state()
        return validate_bundle(lambda folder: self.write_bundle(folder, state), self.val, work_dir, epoch, run)

    def export(self, out_dir: Path, state: dict[str, Any], history: list[dict[str, Any]]) -> Path:
        training = {
            "mode": self.MODE,
            "settings": self.recipe.recorded(),
            "start": self.source,
            "train_images": self.n_train,
            "validation_images": [it.name for it in self.val],
            "last_epoch": history[-1] if history else None,
        }
        return self.write_bundle(out_dir, state, {"training": training})


def model_of_bundle(load: Callable[[str], Any], path: str) -> tuple[Any, str]:
    """(the `.model` of `load(path)`, "bundle NAME"): a bundle's model to start from.

    Raises TrainingError with the loader's message when the bundle cannot be read (OSError,
    ValueError)."""
    try:
        model = load(path).model
    except (OSError, ValueError) as exc:
        raise TrainingError(str(exc)) from exc
    return model, f"bundle {Path(path).name}"


def fit_task(
    task_type: type[BundleTask[R]], recipe: R, out_dir: Path, *, resume: bool = False, progress: bool = True,
    stop_after_epochs: int | None = None,
) -> FitResult:
    """Split the recipe's dataset, build `task_type` on it and train it with
    `wsiseg.training.loop.fit` in out_dir (validating only when there are validation items)."""
    train, val = split_dataset(recipe)
    log.info("%s: %d training images, %d validation images", task_type.MODE, len(train), len(val))
    task = task_type(recipe, train, val)
    return fit(task, out_dir, recipe.loop_config(bool(task.val)), resume=resume, progress=progress,
               stop_after_epochs=stop_after_epochs, settings=_run_settings(recipe))


def _run_settings(recipe: Any) -> dict[str, Any] | None:
    """The recipe fields a resumed run must keep (not where the data lies, the device, or naming)."""
    import dataclasses

    if not dataclasses.is_dataclass(recipe):
        return None
    free = {"data", "device", "name", "version", "validate_every"}
    return {k: v for k, v in dataclasses.asdict(recipe).items() if k not in free}
