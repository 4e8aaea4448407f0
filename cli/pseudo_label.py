"""`wsiseg pseudo-label`: weak labels (points or boxes) + SAM -> a labelled pairs dataset (All-in-SAM)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click


@click.command("pseudo-label")
@click.argument("images", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--model", required=True, help="SAM bundle (folder, zip, cached name) or SAM .pth checkpoint.")
@click.option("--weak", type=click.Path(exists=True, path_type=Path), default=None,
              help="CSV (image,x,y or image,x0,y0,x1,y1), a GeoJSON (one image) or a folder of "
                   "NAME.geojson / NAME.labels.* [beside each image].")
@click.option("--label-prompts", type=click.Choice(["points", "boxes"]), default="boxes", show_default=True,
              help="What an instance label image gives: centroids or bounding boxes.")
@click.option("-o", "--out", "out_dir", type=click.Path(path_type=Path), required=True,
              help="New dataset folder: NAME.png + NAME.labels.tif + manifest.json.")
@click.option("--mpp", type=float, default=None, help="µm/px of images that state none.")
@click.option("--input-size", type=int, default=256, show_default=True, help="SAM input size for a .pth.")
@click.option("--max-diameter-px", type=int, default=None,
              help="Largest nucleus in model px (masks are limited to it) [the bundle's; 64 for a .pth].")
@click.option("--k-negatives", type=int, default=0, show_default=True,
              help="Nearest other points sent as negatives with each point.")
@click.option("--device", type=click.Choice(["cpu", "cuda", "auto"]), default="auto", show_default=True)
@click.option("-q", "--quiet", is_flag=True, help="Errors only.")
def pseudo_label_command(
    images: tuple[Path, ...], model: str, weak: Path | None, label_prompts: str, out_dir: Path, mpp: float | None,
    input_size: int, max_diameter_px: int | None, k_negatives: int, device: str, quiet: bool,
) -> None:
    """Turn weak labels of IMAGES (files or a folder) into SAM instance masks, as a dataset
    that `wsiseg train segmentor --data OUT` trains on."""
    from wsiseg.models.bundles import BundleError
    from wsiseg.training.loop import TrainingError
    from wsiseg.training.pseudo_label import PseudoLabelConfig, pseudo_label

    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(message)s")
    source: Path | list[Path] = images[0] if len(images) == 1 and images[0].is_dir() else list(images)
    try:
        config = PseudoLabelConfig(model=model, label_prompts=label_prompts, mpp=mpp, input_size=input_size,
                                   max_nucleus_diameter_px=max_diameter_px, k_negatives=k_negatives, device=device)
        items = pseudo_label(source, out_dir, config, weak=weak)
    except (ValueError, BundleError, TrainingError, OSError) as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    nuclei = sum(int(it["nuclei"]) for it in items)
    click.echo(f"dataset: {out_dir}  ({len(items)} images, {nuclei} nuclei)")
