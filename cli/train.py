"""`wsiseg train ...`: train models from labelled datasets (thin over wsiseg.training)."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

log = logging.getLogger("wsiseg")


@click.group()
def train() -> None:
    """Train a model from labelled images; each mode writes a bundle: `wsiseg run --model BUNDLE` for
    segmentors and whole models, `--prompter BUNDLE` for prompters."""
    from wsiseg.allocator import keep_freed_memory

    keep_freed_memory()  # each step allocates the same large tensors again (wsiseg.allocator)


@train.command("tiny")
@click.option("--recipe", "recipe_path", type=click.Path(path_type=Path), required=True,
              help="Recipe TOML (see recipes/wsiseg-tiny.toml).")
@click.option("-o", "--out", "out_dir", type=click.Path(path_type=Path), required=True,
              help="Work folder: checkpoint, metrics.csv/json, and the bundle in OUT/bundle.")
@click.option("--data", default=None, help="Dataset (folder, CSV manifest); overrides the recipe's.")
@click.option("--epochs", type=int, default=None, help="Override the recipe's epochs.")
@click.option("--steps-per-epoch", type=int, default=None, help="Override the recipe's steps per epoch.")
@click.option("--batch-size", type=int, default=None, help="Override the recipe's crops per step.")
@click.option("--lr", type=float, default=None, help="Override the recipe's learning rate.")
@click.option("--val-fraction", type=float, default=None, help="Override the recipe's validation fraction.")
@click.option("--seed", type=int, default=None, help="Override the recipe's seed (split, weights, crops).")
@click.option("--data-mpp", type=float, default=None,
              help="µm/px of dataset images that state none (the recipe's data_mpp).")
@click.option("--resume", is_flag=True, help="Continue the run in OUT from its last checkpoint (same recipe); "
              "on a finished run, writes its bundle again.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def tiny(recipe_path: Path, out_dir: Path, data: str | None, epochs: int | None, steps_per_epoch: int | None,
         batch_size: int | None, lr: float | None, val_fraction: float | None, seed: int | None,
         data_mpp: float | None, resume: bool, quiet: bool) -> None:
    """Train wsiseg-tiny (UNet maps, core prompter, watershed segmentor) from a recipe TOML."""
    from wsiseg.datasets.item import DatasetError
    from wsiseg.training.loop import TrainingError
    from wsiseg.training.tiny import TinyRecipe, train_tiny

    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(message)s")
    try:
        recipe = TinyRecipe.from_toml(recipe_path, data=data, epochs=epochs, steps_per_epoch=steps_per_epoch,
                                      batch_size=batch_size, lr=lr, val_fraction=val_fraction, seed=seed,
                                      data_mpp=data_mpp)
        result = train_tiny(recipe, out_dir, resume=resume, progress=not quiet)
    except (ValueError, DatasetError, TrainingError, OSError) as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    click.echo(f"bundle: {result.bundle}  (metrics: {out_dir / 'metrics.csv'})")


# ----------------------------------------------------------------------------- learned modes

_COMMON = (
    click.option("--recipe", "recipe_path", type=click.Path(path_type=Path, dir_okay=False), default=None,
                 help="TOML with any of the mode's settings (tables are flattened); options given here win."),
    click.option("--data", default=None, help="Labelled dataset (folder, CSV or manifest.json).", metavar="DATASET"),
    click.option("-o", "--out", "out_dir", type=click.Path(path_type=Path), required=True,
                 help="Work folder: checkpoint.pt, metrics.csv/json, and the bundle in OUT/bundle."),
    click.option("--epochs", type=int, default=None, help="Epochs [20]."),
    click.option("--steps-per-epoch", type=int, default=None, help="Optimiser steps per epoch [100]."),
    click.option("--batch-size", type=int, default=None, help="Crops per step [4]."),
    click.option("--lr", type=float, default=None, help="AdamW learning rate [mode's default]."),
    click.option("--seed", type=int, default=None, help="Seed of the split, the weights and the batches [0]."),
    click.option("--val-fraction", type=float, default=None, help="Share of images held out for validation [0.2]."),
    click.option("--validate-every", type=int, default=None, help="Epochs between validations, 0: never [1]."),
    click.option("--model-mpp", "mpp", type=float, default=None, help="µm/px the model works at [0.25]."),
    click.option("--data-mpp", type=float, default=None, help="µm/px of dataset images that state none."),
    click.option("--device", type=click.Choice(["cpu", "cuda", "auto"]), default=None,
                 help="Where to train; bfloat16 autocast on CUDA [auto]."),
    click.option("--name", default=None, help="Name of the bundle."),
    click.option("--resume", is_flag=True, help="Continue the run in OUT from its last checkpoint."),
    click.option("-q", "--quiet", is_flag=True, help="No progress bar; warnings and errors only."),
)

#: the options of both prompter modes, after their own
_PROMPTER = (
    click.option("--crop-px", type=int, default=None, help="Training crop side, px [256]."),
    click.option("--val-segmentor", default=None, help="Segmentor validation runs with [classical]."),
)


def _adding(options: tuple[Any, ...]) -> Callable[[Any], Any]:
    """A decorator that adds the click `options` to a command, listed in the given order."""

    def add(function: Any) -> Any:
        for option in reversed(options):
            function = option(function)
        return function

    return add


_common = _adding(_COMMON)
_prompter_options = _adding(_PROMPTER)


def _run_mode(build: Callable[..., Any], train_fn: Callable[..., Any], kw: dict[str, Any]) -> None:
    """Build the recipe from --recipe plus options, train, report the bundle; exit 2 on bad input."""
    from wsiseg.datasets.item import DatasetError
    from wsiseg.models.bundles import BundleError
    from wsiseg.training.loop import TrainingError

    out_dir: Path = kw.pop("out_dir")
    resume: bool = kw.pop("resume")
    quiet: bool = kw.pop("quiet")
    recipe_path: Path | None = kw.pop("recipe_path")
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(message)s")
    for noisy in ("distributed", "tornado", "asyncio", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        recipe = build(recipe_path, **kw)
        result = train_fn(recipe, out_dir, resume=resume, progress=not quiet)
    except (ValueError, DatasetError, BundleError, TrainingError, OSError) as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    click.echo(f"bundle: {result.bundle}  (metrics: {out_dir / 'metrics.csv'})")


@train.command("segmentor")
@_common
@click.option("--checkpoint", default=None, help="Start from an official SAM (or PromptNucSeg) .pth.")
@click.option("--init", default=None, help="Start from a SAM bundle.")
@click.option("--arch", type=click.Choice(["vit_b", "vit_l", "vit_h", "vit_tiny", "vit_test"]), default=None,
              help="Start from random weights of this SAM size.")
@click.option("--mode", type=click.Choice(["full", "decoder", "lora"]), default=None,
              help="What trains: encoder + decoder, decoder only, or LoRA on q/v + decoder [full].")
@click.option("--lora-rank", type=int, default=None, help="Rank of new LoRA adapters [4].")
@click.option("--input-size", "crop_px", type=int, default=None, help="SAM input size = crop side, px [256].")
@click.option("--k-negatives", type=int, default=None, help="Nearest other centroids as negative points [1].")
@click.option("--val-prompter", default=None, help="Prompter validation runs with [classical].")
def segmentor_command(**kw: Any) -> None:
    """Fine-tune SAM as a point-prompted nucleus segmentor (PromptNucSeg / Segment Any Cell)."""
    from wsiseg.training.segmentor import SegmentorRecipe, train_segmentor

    _run_mode(SegmentorRecipe.build, train_segmentor, kw)


@train.command("prompter")
@_common
@click.option("--init", default=None, help="Start from a dpa_p2pnet prompter bundle.")
@click.option("--backbone", default=None, help="ConvNeXt size of a new prompter [convnext_small].")
@click.option("--space", type=int, default=None, help="Anchor spacing, px [16].")
@_prompter_options
def prompter_command(**kw: Any) -> None:
    """Train a DPA-P2PNet point prompter (PromptNucSeg) with Hungarian-matched point targets."""
    from wsiseg.training.prompter import PrompterRecipe, train_prompter

    _run_mode(PrompterRecipe.build, train_prompter, kw)


@train.command("unet-prompter")
@_common
@click.option("--init", default=None, help="Start from an unet_prompter bundle.")
@click.option("--levels", type=int, default=None, help="UNet levels [4].")
@click.option("--base-channels", type=int, default=None, help="UNet width at full resolution [32].")
@_prompter_options
def unet_prompter_command(**kw: Any) -> None:
    """Train a UNet nuclear-probability prompter (Segment Any Cell's auto-prompter)."""
    from wsiseg.training.unet_prompter import UNetPrompterRecipe, train_unet_prompter

    _run_mode(UNetPrompterRecipe.build, train_unet_prompter, kw)
