"""What every learned `wsiseg train` mode (segmentor, prompter, unet-prompter) is told.

`TrainSettings` holds the options the modes share; each mode's recipe is a frozen subclass
that adds its own.  A recipe comes from command-line options, optionally on top of a TOML
file (`--recipe`) whose tables are flattened (`[train] lr = 1e-4` is the key `lr`); unknown
keys are an error, a relative `data` path is relative to the TOML file.

Device: "cpu", "cuda" or "auto" (CUDA when torch sees a GPU).  On CUDA the forward passes
run under bfloat16 autocast; losses are computed in float32.
"""

from __future__ import annotations

import contextlib
import logging
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from wsiseg.training.loop import LoopConfig, TrainingError

if TYPE_CHECKING:
    import torch

    from wsiseg.datasets.item import NucleusItem

log = logging.getLogger(__name__)

DEVICES = ("cpu", "cuda", "auto")
R = TypeVar("R", bound="TrainSettings")


@dataclass(frozen=True)
class TrainSettings:
    """Options shared by the learned training modes.

    data: a dataset `wsiseg.datasets.open_dataset` reads (folder, CSV or manifest.json).
    data_mpp: µm/px of images whose files state none (None: they must state it).
    val_fraction, seed: the seeded split by whole image (the same images as
        `wsiseg eval --split val --val-fraction F --seed S`); seed also seeds the model and
        every epoch's batches.
    epochs, steps_per_epoch, batch_size: images (crops) per optimiser step = batch_size.
    lr, weight_decay: AdamW's.
    mpp: µm/px the model works at (images are resampled to it).
    crop_px: side of the square training crop in model px.
    scale_jitter: crops are drawn at a scale in [1 - s, 1 + s] (0: none).
    augment: flips, 90° rotations, HED stain jitter, blur, JPEG (`wsiseg.training.augment`).
    validate_every: epochs between validations (0: never); needs validation images.
    device: "cpu", "cuda" or "auto".
    name, version: of the bundle written.
    """

    data: str
    data_mpp: float | None = None
    val_fraction: float = 0.2
    seed: int = 0
    epochs: int = 20
    steps_per_epoch: int = 100
    batch_size: int = 4
    lr: float = 1e-4
    weight_decay: float = 1e-4
    mpp: float = 0.25
    crop_px: int = 256
    scale_jitter: float = 0.1
    augment: bool = True
    validate_every: int = 1
    device: str = "auto"
    name: str = ""
    version: str = "1.0"

    def __post_init__(self) -> None:
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.batch_size < 1 or not self.lr > 0 or self.weight_decay < 0:
            raise ValueError(f"need batch_size >= 1, lr > 0, weight_decay >= 0; got {self.batch_size}, "
                             f"{self.lr}, {self.weight_decay}")
        if not 0.01 < self.mpp < 100:
            raise ValueError(f"mpp must be µm per pixel (e.g. 0.25), got {self.mpp}")
        if self.crop_px < 32:
            raise ValueError(f"crop_px must be >= 32, got {self.crop_px}")
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}, got {self.device!r}")
        LoopConfig(self.epochs, self.steps_per_epoch, self.seed, self.validate_every)  # validates those

    def loop_config(self, has_validation: bool) -> LoopConfig:
        """The epoch loop's configuration (validation only when there are validation images)."""
        return LoopConfig(
            epochs=self.epochs, steps_per_epoch=self.steps_per_epoch, seed=self.seed,
            validate_every=self.validate_every if has_validation else 0, monitor="pq", keep="last",
        )

    def recorded(self) -> dict[str, Any]:
        """JSON-ready settings for the bundle's "training" record (the data path left out)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            if f.name == "data":
                continue
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def build(cls: type[R], recipe: Path | None = None, **options: Any) -> R:
        """A recipe from a TOML file (optional) with `options` on top (None values ignored).

        Raises ValueError naming the file for an unreadable TOML, unknown keys or bad values.
        """
        flat: dict[str, Any] = {}
        where = "options"
        if recipe is not None:
            where = str(recipe)
            flat = read_toml(Path(recipe))
            known = {f.name for f in fields(cls)}
            unknown = sorted(set(flat) - known)
            if unknown:
                raise ValueError(f"{recipe}: {unknown_keys_message(unknown, known)}")
            if "data" in flat and not Path(str(flat["data"])).is_absolute():
                flat["data"] = str((Path(recipe).parent / str(flat["data"])).resolve())
        flat.update({k: v for k, v in options.items() if v is not None})
        if not flat.get("data"):
            raise ValueError(f"{where}: no dataset given; pass --data or set data in the recipe")
        try:
            return cls(**flat)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{where}: {exc}") from exc


def read_toml(path: Path) -> dict[str, Any]:
    """A TOML file's keys with one level of tables flattened."""
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"{path}: cannot read the recipe: {exc}") from exc
    flat: dict[str, Any] = {}
    for key, value in raw.items():
        if isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    return flat


def split_dataset(settings: TrainSettings) -> tuple[list[NucleusItem], list[NucleusItem]]:
    """(train, val) items of the settings' dataset, split by whole image (seeded)."""
    from wsiseg.datasets import open_dataset

    kw = {"mpp": settings.data_mpp, "val_fraction": settings.val_fraction, "seed": settings.seed}
    train = open_dataset(settings.data, split="train", **kw)
    val = open_dataset(settings.data, split="val", **kw) if settings.val_fraction > 0 else []
    train_items = [train[i] for i in range(len(train))]
    val_items = [val[i] for i in range(len(val))]
    if not train_items:
        raise TrainingError(f"{settings.data}: no training images left after the validation split; "
                            "lower --val-fraction or add images")
    return train_items, val_items


def torch_device(name: str) -> torch.device:
    """The torch.device of "cpu", "cuda" or "auto"; an error when CUDA is asked for but absent."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise TrainingError("--device cuda given, but torch sees no CUDA GPU; use --device cpu or auto")
    return torch.device(name)


def autocast(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """bfloat16 autocast on CUDA, nothing elsewhere."""
    import torch

    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def pipeline_device(device: torch.device) -> str:
    """The `RunConfig.device` string for validation runs on `device`."""
    return "cuda" if device.type == "cuda" else "cpu"


def unknown_keys_message(unknown: list[str], known: set[str]) -> str:
    """"unknown recipe keys [...]" with the closest known key for each (difflib's ratio >= 0.6),
    then every known key."""
    import difflib

    hints = [f"{key!r}: did you mean {close[0]!r}?" for key in unknown
             if (close := difflib.get_close_matches(key, sorted(known), n=1))]
    hint = f" ({'; '.join(hints)})" if hints else ""
    return f"unknown recipe keys {unknown}{hint} (known: {sorted(known)})"
