"""`wsiseg eval`: run a model on a labelled dataset (as `wsiseg run` would) and score it.

Thin over `wsiseg.evaluation`; the library is imported inside the command, so `wsiseg --help`
stays fast.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Sequence

import click

SPLITS = ("all", "train", "val", "test")
_INTEGER_COLUMNS = ("n_true", "n_pred", "n_images")
_HEADERS = {"f1_detection": "f1"}


@click.command("eval")
@click.option("--model", default="wsiseg-tiny", show_default=True, help="Model name or bundle path to evaluate.")
@click.option("--data", "data", required=True, help="Labelled dataset: a folder (or file) `wsiseg.datasets` reads.")
@click.option("--format", "data_format", default=None, help="Dataset format (default: detected).")
@click.option("--split", type=click.Choice(SPLITS), default="all", show_default=True,
              help="Which images: all, the train/val part of the seeded split training uses, "
                   "or a manifest's test split.")
@click.option("--val-fraction", type=float, default=0.2, show_default=True, help="Share of images in the val split.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the train/val split.")
@click.option("--mpp", type=float, default=None, help="Dataset resolution in µm/px when its files lack it.")
@click.option("-o", "--out", "out_dir", type=click.Path(path_type=Path), default=Path("eval"), show_default=True,
              help="Output folder: eval.csv, eval.json, overlays/.")
@click.option("--compare", "compare", multiple=True, help="Another model to evaluate on the same images (repeatable).")
@click.option("--prompter", default=None, help="Prompter model to use instead of the bundle's own.")
@click.option("--tile-size", "tile_size", type=int, default=None, help="Tile size in model px (default: the model's).")
@click.option("--overlap", type=int, default=64, show_default=True, help="Tile overlap in model px.")
@click.option("--tta", is_flag=True,
              help="Test-time augmentation for MODEL (not the --compare models): maps averaged over flips "
                   "(4 network passes a tile, about 3x the time).")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]), default=None,
              help="Arithmetic of MODEL's network (not the --compare models'), as `wsiseg run --precision` "
                   "(default: the model's own).")
@click.option("--min-score", type=float, default=None,
              help="Drop prompts scoring below this, for every model (0 <= S < 1; default: each model's own).")
@click.option("--tissue-detection", is_flag=True, help="Detect tissue first (off: dataset images are tissue crops).")
@click.option("--device", type=click.Choice(["cpu", "cuda", "auto"]), default="cpu", show_default=True)
@click.option("--workers", type=int, default=None, help="Local Dask workers (default: CPU cores).")
@click.option("--scheduler", default=None,
              help="'synchronous' (no Dask) or a Dask scheduler address tcp://host:8786.")
@click.option("--radius-um", type=float, default=3.0, show_default=True,
              help="Detection matching radius for f1/precision/recall, in µm.")
@click.option("--no-overlays", is_flag=True, help="Skip the overlay PNGs.")
@click.option("--keep-runs", is_flag=True, help="Keep each image's run outputs (runs-* folders in the output folder).")
@click.option("--json", "as_json", is_flag=True, help="Print eval.json instead of the table.")
@click.option("-q", "--quiet", is_flag=True, help="No progress lines; errors only.")
@click.option("-v", "--verbose", is_flag=True, help="Log details to the terminal too.")
def eval_command(model: str, compare: tuple[str, ...], **kw: Any) -> None:
    """Score MODEL (and --compare models) on every image of a labelled dataset.

    Each image runs through the same pipeline as `wsiseg run IMAGE --mpp X --no-tissue-detection`;
    its nuclei are scored against the truth (PQ, AJI, Dice, detection F1).  Writes eval.csv,
    eval.json and overlays/ (true outlines green, predicted magenta, both white).
    """
    from wsiseg.cli.main import _fail, _setup_logging

    from wsiseg.models import check_network_options

    out_dir: Path = kw["out_dir"]
    try:  # options first: a usage error leaves no output folder behind
        config = _config(model, kw)
        models = _check_models([model, *compare])
        check_network_options(model, kw["prompter"], tta=kw["tta"], precision=kw["precision"])
    except (ValueError, OSError) as exc:
        _fail(" ".join(str(exc).split()), None)
        sys.exit(2)
    log_path = _setup_logging(out_dir, kw["verbose"], kw["quiet"])
    try:
        dataset = _open_dataset(kw)
    except (ValueError, OSError) as exc:
        _fail(" ".join(str(exc).split()), None)
        sys.exit(2)
    sys.exit(_evaluate(models, dataset, config, kw, log_path))


def _config(model: str, kw: dict[str, Any]) -> Any:
    from wsiseg.pipeline import RunConfig
    from wsiseg.scheduling import SchedulerConfig

    return RunConfig(
        model=model,
        prompter=kw["prompter"],
        tile_size_px=kw["tile_size"],
        overlap_px=kw["overlap"],
        tissue_detection=kw["tissue_detection"],
        tta=kw["tta"],
        precision=kw["precision"],
        min_score=kw["min_score"],
        device=kw["device"],
        scheduler=SchedulerConfig(scheduler=kw["scheduler"], workers=kw["workers"]),
    )


def _open_dataset(kw: dict[str, Any]) -> Any:
    from wsiseg.datasets import open_dataset

    split = None if kw["split"] == "all" else kw["split"]
    return open_dataset(kw["data"], format=kw["data_format"], mpp=kw["mpp"], split=split,
                        val_fraction=kw["val_fraction"], seed=kw["seed"])


def _check_models(models: Sequence[str]) -> list[str]:
    """The models, each checked to resolve (one clear line before any work when one does not)."""
    from wsiseg.evaluation import model_label
    from wsiseg.models.cache import resolve_model

    for m in models:
        resolve_model(m)
    labels = [model_label(m) for m in models]
    if len(set(labels)) != len(labels):
        raise ValueError(f"--model and --compare must name different models, got {', '.join(models)}")
    return list(models)


def _evaluate(models: list[str], dataset: Any, config: Any, kw: dict[str, Any], log_path: Path | None) -> int:
    from dataclasses import replace

    from wsiseg.cli.main import _fail, log
    from wsiseg.evaluation import Comparison, evaluate, model_label

    out_dir: Path = kw["out_dir"]
    quiet = kw["quiet"] or kw["as_json"]
    name = str(kw["data"])
    split = kw["split"]
    reports = []
    for i, model in enumerate(models):
        label = model_label(model) if len(models) > 1 else None
        # --tta and --precision are MODEL's, not --compare's
        model_config = config if i == 0 else replace(config, tta=False, precision=None)

        def progress(image: str, done: int, total: int, label: str = model_label(model)) -> None:
            if not quiet:
                click.echo(f"[{label}] {done}/{total} {image}", err=True)

        try:
            reports.append(evaluate(
                model, dataset, out_dir=out_dir, config=model_config, overlays=not kw["no_overlays"], progress=progress,
                scheduler=config.scheduler, keep_runs=kw["keep_runs"], label=label, dataset_name=name,
                split=split, radius_um=kw["radius_um"],
            ))
        except Exception as exc:  # one line for the user; the traceback goes to the log file
            log.debug("evaluation of %s failed", model, exc_info=True)
            _fail(f"{model}: {' '.join(str(exc).split()) or type(exc).__name__}", log_path)
            return 1
    comparison = Comparison(reports) if len(reports) > 1 else None
    result: Any = comparison or reports[0]
    csv_path, json_path = result.write(out_dir)
    if kw["as_json"]:
        click.echo(json.dumps(result.to_dict(), indent=2))
        return 0
    if not kw["quiet"]:
        click.echo(f"{name} (split {split}, {len(dataset)} images)")
        click.echo(format_table(result.columns(), result.rows()))
        for lbl, delta in (comparison.delta() if comparison else {}).items():
            diffs = "  ".join(f"{_HEADERS.get(k, k)} {_number(v, signed=True)}" for k, v in delta.items())
            click.echo(f"mean {lbl} - {reports[0].label}: {diffs}")
        click.echo(f"wrote {csv_path}, {json_path}" + ("" if kw["no_overlays"] else f", {out_dir / 'overlays'}/"))
    return 0


def format_table(columns: list[str], rows: list[dict[str, Any]]) -> str:
    """A fixed-width text table of the printed columns (TABLE_COLUMNS, per model when compared)."""
    from wsiseg.evaluation import TABLE_COLUMNS

    shown = [c for c in columns if c.split("[")[0] in TABLE_COLUMNS]
    headers = [_header(c) for c in shown]
    cells = [[_cell(c, row.get(c)) for c in shown] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(headers, widths)))]
    for r in cells:
        lines.append("  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths))))
    return "\n".join(lines)


def _header(column: str) -> str:
    base, _, rest = column.partition("[")
    return _HEADERS.get(base, base) + (f"[{rest}" if rest else "")


def _cell(column: str, value: Any) -> str:
    base = column.split("[")[0]
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    if base in _INTEGER_COLUMNS and float(value).is_integer():
        return str(int(value))
    if base == "time_s":
        return f"{float(value):.2f}"
    return _number(value)


def _number(value: Any, signed: bool = False) -> str:
    if value is None:
        return "-"
    return f"{float(value):+.4f}" if signed else f"{float(value):.4f}"
