"""`wsiseg train ...`: train models from labelled datasets (thin over wsiseg.training)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

log = logging.getLogger("wsiseg")


@click.group()
def train() -> None:
    """Train a model from labelled images; each mode writes a bundle that `wsiseg run --model` loads."""


@train.command("tiny")
@click.option("--recipe", "recipe_path", type=click.Path(path_type=Path), required=True,
              help="Recipe TOML (see recipes/wsiseg-tiny.toml).")
@click.option("-o", "--out", "out_dir", type=click.Path(path_type=Path), required=True,
              help="Work folder: checkpoint, metrics.csv/json, and the bundle in OUT/bundle.")
@click.option("--data", default=None, help="Dataset (folder, CSV manifest); overrides the recipe's.")
@click.option("--epochs", type=int, default=None, help="Override the recipe's epochs.")
@click.option("--resume", is_flag=True, help="Continue the run in OUT from its last checkpoint.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def tiny(recipe_path: Path, out_dir: Path, data: str | None, epochs: int | None, resume: bool, quiet: bool) -> None:
    """Train wsiseg-tiny (UNet maps + centre-peak prompter + watershed segmentor)."""
    from wsiseg.datasets.item import DatasetError
    from wsiseg.training.loop import TrainingError
    from wsiseg.training.tiny import TinyRecipe, train_tiny

    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(message)s")
    try:
        recipe = TinyRecipe.from_toml(recipe_path, data=data, epochs=epochs)
        result = train_tiny(recipe, out_dir, resume=resume, progress=not quiet)
    except (ValueError, DatasetError, TrainingError, OSError) as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    click.echo(f"bundle: {result.bundle}  (metrics: {out_dir / 'metrics.csv'})")
