"""`wsiseg score`: PQ, AJI, Dice and detection F1 of predicted nuclei against truth labels.

Thin over `wsiseg.instances_io` (reading and painting) and `wsiseg.metrics` (the scores);
both are imported inside the command so `wsiseg --help` stays fast.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import click

_ROWS = (
    ("pq", "PQ"), ("dq", "DQ"), ("sq", "SQ"), ("aji", "AJI"), ("aji_plus", "AJI+"), ("dice", "Dice"),
    ("f1_detection", "F1 (detection)"), ("precision", "precision"), ("recall", "recall"),
    ("n_true", "true nuclei"), ("n_pred", "predicted nuclei"), ("tp", "TP (IoU > 0.5)"), ("fp", "FP"), ("fn", "FN"),
    ("tp_detection", "TP (detection)"), ("fp_detection", "FP (detection)"), ("fn_detection", "FN (detection)"),
    ("radius_px", "radius (px)"),
)  # fmt: skip


def _format(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _table(data: dict[str, Any], pred: Path, truth: Path) -> str:
    rows = [("pred", str(pred)), ("truth", str(truth))]
    rows += [(label, _format(data.get(key))) for key, label in _ROWS]
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label:<{width}}  {value}" for label, value in rows)


@click.command("score")
@click.option("--pred", "pred_path", required=True, type=click.Path(path_type=Path),
              help="Predicted nuclei: label image (.tif/.png/.npy), GeoJSON (.geojson[.gz]/.zip) or .zarr.")
@click.option("--truth", "truth_path", required=True, type=click.Path(path_type=Path),
              help="True nuclei, in the same formats; its grid is the one scored on.")
@click.option("--json", "as_json", is_flag=True, help="Print the scores as JSON.")
@click.option("--radius-um", type=float, default=3.0, show_default=True,
              help="Detection match radius between centroids, µm.")
@click.option("--mpp", type=float, default=None,
              help="µm per pixel of the grid (default: from a Zarr store's metadata).")
def score(pred_path: Path, truth_path: Path, as_json: bool, radius_um: float, mpp: float | None) -> None:
    """Score predicted nuclei (--pred) against true nuclei (--truth) on one image."""
    from wsiseg.instances_io import instances_mpp, load_instance_pair
    from wsiseg.metrics import score_instances

    try:
        pred, truth = load_instance_pair(pred_path, truth_path)
        if mpp is None:
            mpp = instances_mpp(truth_path) or instances_mpp(pred_path)
        if mpp is None:
            raise ValueError(
                f"{truth_path}: its resolution is unknown; pass --mpp (µm per pixel) for the detection radius"
            )
        result = score_instances(pred, truth, mpp=mpp, radius_um=radius_um)
    except (ValueError, OSError) as exc:
        click.echo(f"error: {' '.join(str(exc).split())}", err=True)
        sys.exit(2)
    data = result.to_dict()
    if as_json:
        click.echo(json.dumps(data, indent=2))
    else:
        click.echo(_table(data, pred_path, truth_path))
