"""`wsiseg check`: what a run of each slide will meet, before the run (see wsiseg.preflight)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

_COLUMNS = ("slide", "reader", "vendor", "size", "levels", "mpp (source)", "obj", "tissue mm²", "tiles (p+s)", "nuclei",
            "time", "peak mem", "verdict")


@click.command("check")
@click.argument("paths", nargs=-1, required=True)
@click.option("--model", default="wsiseg-tiny", show_default=True,
              help="The model the run will use (see `wsiseg models list`); times and memory are measured with it.")
@click.option("--prompter", default=None,
              help="The prompter the run will use instead of the model's own (wsiseg run --prompter).")
@click.option("--device", type=click.Choice(["cpu", "cuda", "auto"]), default="auto", show_default=True,
              help="auto: CUDA when a GPU is present, else the CPU (as `wsiseg run`).")
@click.option("--mpp", type=float, default=None, help="Slide resolution in µm/px, for slides that lack it or state a wrong one (replaces the file's, as in run).")
@click.option("--tta", is_flag=True, help="Estimate a run with test-time augmentation (wsiseg run --tta).")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]), default=None,
              help="Estimate a run at this network arithmetic (wsiseg run --precision; default: the model's own).")
@click.option("--json", "as_json", is_flag=True, help="A JSON list (one object per slide) instead of the table.")
@click.option("-v", "--verbose", is_flag=True, help="Log details to the terminal.")
def check_command(paths: tuple[str, ...], model: str, prompter: str | None, device: str, mpp: float | None, tta: bool,
                  precision: str | None, as_json: bool, verbose: bool) -> None:
    """Open every slide of PATHS (files, folders, manifest .csv files), sample the pipeline on
    its tissue and estimate tiles, nuclei, time and memory.  Exit code 1 when any slide is
    unusable, 2 for bad arguments."""
    from wsiseg.cli.main import _check_inputs, _expand_slides, _fail, _setup_logging
    from wsiseg.preflight import CheckConfig, check_slide, load_model
    from wsiseg.readers.base import MPP_RANGE
    from wsiseg.scheduling import Runner, SchedulerConfig
    from wsiseg.slide_manifest import ManifestError, expand_inputs

    _setup_logging(None, verbose, quiet=not verbose)
    if mpp is not None and not MPP_RANGE[0] <= mpp <= MPP_RANGE[1]:
        lo, hi = MPP_RANGE
        _fail(f"--mpp {mpp} is outside {lo}-{hi} µm per pixel; give the scan resolution, e.g. 0.25", None)
        sys.exit(2)
    _check_inputs(paths)  # a missing input is a usage error, as for `run`, before the model loads
    try:
        entries = expand_inputs(paths, _expand_slides)
    except ManifestError as exc:
        _fail(str(exc), None)
        sys.exit(2)
    if not entries:
        _fail(f"no slides found in {', '.join(paths)}", None)
        sys.exit(2)
    try:
        loaded = load_model(CheckConfig(model=model, prompter=prompter, device=device, mpp=mpp, tta=tta,
                                        precision=precision))
    except Exception as exc:  # noqa: BLE001 - whatever stops the model loading, the fix is an option (as run)
        _fail(str(exc) or f"--model {model}: {type(exc).__name__}", None)
        sys.exit(2)
    checks = []
    with Runner(SchedulerConfig(scheduler="synchronous")) as runner:
        for entry in entries:
            checks.append(check_slide(entry, loaded, runner))
            if not as_json and sys.stderr.isatty():
                click.echo(f"checked {len(checks)}/{len(entries)}: {entry.path.name}", err=True)
    from wsiseg.workers import network_precision

    precision = network_precision(loaded.prompter, loaded.segmentor)  # what the estimates ran at
    if as_json:
        click.echo(json.dumps([{**c.to_json(), "network_precision": precision} for c in checks], indent=2))
    else:
        _print_table(checks, model, prompter, device, loaded.load_s, precision)
    sys.exit(1 if any(c.verdict == "unusable" for c in checks) else 0)


def _print_table(checks: list[Any], model: str, prompter: str | None, device: str, load_s: float,
                 precision: str | None) -> None:
    names = _short_names([Path(c.path) for c in checks])
    rows = [[names[i], *_cells(c)[1:]] for i, c in enumerate(checks)]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(_COLUMNS)]
    click.echo("  ".join(h.ljust(w) for h, w in zip(_COLUMNS, widths)).rstrip())
    for row in rows:
        click.echo("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip())
    notes = [(name, c, reason) for name, c in zip(names, checks) for reason in c.reasons]
    if notes:
        click.echo("")
    for name, c, reason in notes:
        click.echo(f"{name}: {c.verdict}: {reason}")
    click.echo("")
    unusable = sum(c.verdict == "unusable" for c in checks)
    warned = sum(c.verdict == "warning" for c in checks)
    timed = [c.time_s for c in checks if c.time_s is not None]
    slides = f"{len(checks)} slide{'s' if len(checks) != 1 else ''}"
    counts = f"{slides}: {len(checks) - unusable - warned} ok, {warned} warning, {unusable} unusable"
    if not timed:  # nothing could be sampled: no estimates to give
        click.echo(counts)
        return
    arithmetic = f" --precision {precision}" if precision else ""
    points = f" --prompter {prompter}" if prompter else ""
    click.echo(f"estimates for --model {model}{points} --device {device}{arithmetic}, one process (model load {load_s:.1f} s); "
               "Dask workers share the time and each needs the memory shown")
    total = sum(timed) - load_s * max(len(timed) - 1, 0)  # a run loads the model once, not per slide
    click.echo(f"{counts}; about {_duration(total)} in all as one run (each row's time includes the model load, "
               "which a run pays once)")


def _short_names(paths: list[Path]) -> list[str]:
    """Each path relative to the folder all share (a cohort's subfolders stay visible)."""
    import os

    if not paths:
        return []
    resolved = [p.resolve() for p in paths]
    common = Path(os.path.commonpath([str(r.parent) for r in resolved]))
    return [str(r.relative_to(common)) for r in resolved]


def _cells(c: Any) -> list[str]:
    dash = "-"
    size = f"{c.width}x{c.height}" if c.width is not None else dash
    if c.mpp is not None:
        mpp = f"{c.mpp:.4g} ({c.mpp_source})"
    else:
        mpp = "missing" if c.reader is not None else dash
    # the two stages' tiles, prompter + segmentor (one stage when the segmentor has none of its own)
    tiles = dash if c.tiles_prompter is None else (
        f"{c.tiles_prompter}+{c.tiles_segmentor}" if c.tiles_segmentor else str(c.tiles_prompter))
    return [
        Path(c.path).name, c.reader or dash, c.vendor or dash, size, dash if c.levels is None else str(c.levels), mpp,
        f"{c.objective_power:g}x" if c.objective_power else dash,
        dash if c.tissue_area_mm2 is None else f"{c.tissue_area_mm2:.2f}", tiles,
        dash if c.nuclei is None else str(c.nuclei), dash if c.time_s is None else _duration(c.time_s),
        dash if c.peak_rss_mib is None else f"{c.peak_rss_mib:.0f} MiB", c.verdict,
    ]


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
