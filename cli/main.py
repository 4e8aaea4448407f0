"""The `wsiseg` command: thin over the library, which is imported inside each command."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any

import click

from wsiseg._version import __version__

log = logging.getLogger("wsiseg")

SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide",
                  ".png", ".jpg", ".jpeg")


def _setup_logging(out_dir: Path | None, verbose: bool, quiet: bool) -> Path | None:
    root = logging.getLogger()
    root.setLevel(logging.DEBUG)
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(logging.DEBUG if verbose else logging.ERROR if quiet else logging.WARNING)
    console.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    root.addHandler(console)
    for noisy in ("distributed", "tornado", "asyncio", "PIL", "numcodecs", "zarr", "fsspec"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if out_dir is None:
        return None
    out_dir.mkdir(parents=True, exist_ok=True)
    log_path = out_dir / "wsiseg.log"
    handler = logging.FileHandler(log_path)
    handler.setLevel(logging.DEBUG)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    return log_path


class Progress:
    """One line per slide on stderr: stage, tiles done / total, nuclei found, ETA."""

    def __init__(self, name: str, enabled: bool) -> None:
        self.name = name
        self.enabled = enabled and sys.stderr.isatty()
        self.start = time.monotonic()
        self.stage_start: dict[str, float] = {}
        self.last = 0.0

    def __call__(self, stage: str, done: int, total: int, nuclei: int) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        t0 = self.stage_start.setdefault(stage, now)
        if now - self.last < 0.1 and done < total:
            return
        self.last = now
        frac = done / total if total else 1.0
        eta = (now - t0) / frac * (1 - frac) if frac > 0 else 0.0
        bar = "#" * int(24 * frac)
        sys.stderr.write(
            f"\r{self.name[:28]:28s} {stage:9s} [{bar:24s}] {done}/{total} tiles  {nuclei} nuclei  ETA {eta:5.0f}s"
        )
        if done >= total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def _fail(message: str, log_path: Path | None) -> None:
    where = f" (details in {log_path})" if log_path else ""
    click.echo(f"error: {message}{where}", err=True)


def _expand_slides(inputs: tuple[str, ...]) -> list[Path]:
    slides: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            slides.extend(sorted(q for q in p.iterdir() if q.suffix.lower() in SLIDE_SUFFIXES))
        else:
            slides.append(p)
    return slides


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="wsiseg")
def main() -> None:
    """Find every cell nucleus in whole-slide images; write QuPath GeoJSON and Zarr."""


def _run_options(f: Any) -> Any:
    options = [
        click.option("-o", "--out", "out_dir", type=click.Path(path_type=Path), default=Path("results"),
                     show_default=True, help="Output folder (one set of files per slide)."),
        click.option("--model", default="wsiseg-tiny", show_default=True,
                     help="Model name (see `wsiseg models list`: wsiseg-tiny, classical, ...) or bundle path."),
        click.option("--prompter", default=None, help="Prompter model to use instead of the bundle's own."),
        click.option("--prompts", "prompts_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                     default=None, help="Points to segment (CSV x,y[,label] or GeoJSON, level-0 px)."),
        click.option("--tile-size", "tile_size", type=int, default=None,
                     help="Tile size in model px (default: the model's; 512 for wsiseg-tiny, 256 for classical and SAM)."),
        click.option("--overlap", type=int, default=64, show_default=True, help="Tile overlap in model px."),
        click.option("--mpp", type=float, default=None, help="Slide resolution in µm/px when the file lacks it."),
        click.option("--roi", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
                     help="GeoJSON polygons (level-0 px) restricting the run."),
        click.option("--no-tissue-detection", is_flag=True, help="Process the whole slide, not only tissue."),
        click.option("--geojson-format", type=click.Choice(["gz", "geojson", "zip"]), default="gz",
                     show_default=True, help="gz: .geojson.gz; zip: region shards QuPath imports one by one."),
        click.option("--no-labels", is_flag=True, help="Skip the label raster in the Zarr store."),
        click.option("--workers", type=int, default=None, help="Local Dask workers (default: CPU cores)."),
        click.option("--scheduler", default=None,
                     help="'synchronous' (no Dask, for debugging) or a Dask scheduler address tcp://host:8786."),
        click.option("--device", type=click.Choice(["cpu", "cuda", "auto"]), default="cpu", show_default=True),
        click.option("--gpus", type=int, default=0, show_default=True, help="One Dask worker per GPU."),
        click.option("--k-negatives", type=int, default=None, help="Negative prompts per nucleus (model default)."),
        click.option("--prompt-selection", type=click.Choice(["centroid", "probability"]), default=None,
                     help="Probability prompters: points at component centroids or sampled from the map."),
        click.option("--points-per-tile", type=int, default=None, help="Probability prompters: points per tile."),
        click.option("--min-score", type=float, default=None,
                     help="Drop prompts scoring below this (0-1; default: the model's own threshold)."),
        click.option("--overwrite", is_flag=True, help="Redo slides whose complete outputs already exist."),
        click.option("--batch-tiles", type=int, default=8, show_default=True, help="Tiles per task."),
        click.option("-q", "--quiet", is_flag=True, help="No progress bar; errors only."),
        click.option("-v", "--verbose", is_flag=True, help="Log details to the terminal too."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _config(**kw: Any) -> Any:
    from wsiseg.pipeline import RunConfig
    from wsiseg.scheduling import SchedulerConfig

    return RunConfig(
        model=kw["model"],
        prompter=kw["prompter"],
        prompts_file=kw["prompts_file"],
        tile_size_px=kw["tile_size"],
        overlap_px=kw["overlap"],
        mpp=kw["mpp"],
        tissue_detection=not kw["no_tissue_detection"],
        roi=kw["roi"],
        geojson_format=kw["geojson_format"],
        write_labels=not kw["no_labels"],
        device=kw["device"],
        k_negatives=kw["k_negatives"],
        prompt_selection=kw["prompt_selection"],
        points_per_tile=kw["points_per_tile"],
        min_score=kw["min_score"],
        batch_tiles=kw["batch_tiles"],
        scheduler=SchedulerConfig(scheduler=kw["scheduler"], workers=kw["workers"], gpus=kw["gpus"]),
    )


def _run_slides(slides: list[Path], out_dir: Path, kw: dict[str, Any], log_path: Path | None) -> int:
    from wsiseg.pipeline import run_slide
    from wsiseg.scheduling import Runner

    try:
        config = _config(**kw)
    except ValueError as exc:
        _fail(str(exc), None)
        return 2
    from wsiseg.cohort import Ledger, output_names, slide_stem
    from wsiseg.pipeline import completed_outputs

    try:
        names = output_names(slides, out_dir)
    except ValueError as exc:
        _fail(str(exc), None)
        return 2
    failed = 0
    ledger = Ledger(out_dir, slides)
    with Runner(config.scheduler) as runner:
        for slide in slides:
            name = names[slide]
            if name != slide_stem(slide) and not kw["quiet"]:
                click.echo(f"{slide.name}: outputs named {name} ({slide_stem(slide)} is another slide's name)")
            done = None if kw["overwrite"] else completed_outputs(slide, out_dir, config, name)
            if done is not None:
                ledger.mark(slide, "skipped", report=str(done))
                if not kw["quiet"]:
                    click.echo(f"{slide.name}: already done ({done.name}); --overwrite to redo")
                continue
            progress = Progress(slide.name, not kw["quiet"])
            ledger.mark(slide, "running")
            try:
                result = run_slide(slide, out_dir, config, runner=runner, progress=progress, output_name=name)
            except Exception as exc:  # one bad slide never stops the others
                failed += 1
                log.debug("%s failed", slide, exc_info=True)
                ledger.mark(slide, "failed", reason=" ".join(str(exc).split()))
                _fail(f"{slide}: {exc}", log_path)
                continue
            ledger.mark(slide, "done", nuclei=result.n_nuclei, report=str(result.report))
            if not kw["quiet"]:
                click.echo(f"{slide.name}: {result.n_nuclei} nuclei -> {result.geojson}, {result.zarr}")
    if len(slides) > 1 and not kw["quiet"]:
        counts = ledger.counts()
        click.echo(f"{counts['done']} done, {counts['skipped']} skipped, {counts['failed']} failed ({ledger.path})")
    return 1 if failed else 0


@main.command()
@click.argument("slides", nargs=-1, required=True)
@_run_options
def run(slides: tuple[str, ...], **kw: Any) -> None:
    """Segment the nuclei of one or more SLIDES (files or folders of slides)."""
    out_dir: Path = kw.pop("out_dir")
    log_path = _setup_logging(out_dir, kw["verbose"], kw["quiet"])
    paths = _expand_slides(slides)
    if not paths:
        _fail(f"no slides found in {', '.join(slides)}", None)
        sys.exit(2)
    sys.exit(_run_slides(paths, out_dir, kw, log_path))


@main.command()
@click.option("--size", type=int, default=2048, show_default=True, help="Side of the synthetic slide in px.")
@click.option("--seed", type=int, default=0, show_default=True)
@_run_options
def demo(size: int, seed: int, **kw: Any) -> None:
    """Make a small synthetic H&E slide and run the whole pipeline on it (no downloads)."""
    from wsiseg.synthetic import SyntheticSpec, make_nuclei, write_svs_like

    out_dir: Path = kw.pop("out_dir")
    if out_dir == Path("results"):
        out_dir = Path("demo-out")
    log_path = _setup_logging(out_dir, kw["verbose"], kw["quiet"])
    slide = out_dir / "demo-slide.svs"
    spec = SyntheticSpec(width=size, height=size, seed=seed)
    truth = write_svs_like(slide, spec, make_nuclei(spec))
    if not kw["quiet"]:
        click.echo(f"wrote synthetic slide {slide} ({size}x{size} px, {len(truth)} nuclei)")
    sys.exit(_run_slides([slide], out_dir, kw, log_path))


@main.command()
@click.argument("slide", type=click.Path(path_type=Path))
@click.option("--mpp", type=float, default=None, help="Resolution to assume when the file lacks it.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def info(slide: Path, mpp: float | None, as_json: bool) -> None:
    """Vendor, size, levels, mpp, objective, bounds, and which reader opened SLIDE."""
    import json

    from wsiseg.readers import open_slide
    from wsiseg.readers.base import SlideError

    try:
        reader = open_slide(slide, mpp=mpp)
    except SlideError as exc:
        _fail(str(exc), None)
        sys.exit(2)
    p = reader.properties
    levels = [{"width": w, "height": h, "downsample": d} for (w, h), d in zip(p.level_dimensions, p.level_downsamples)]
    data: dict[str, Any] = {
        "path": str(slide),
        "reader": p.reader,
        "vendor": p.vendor,
        "width": p.size_l0[0],
        "height": p.size_l0[1],
        "levels": levels,
        "mpp": list(p.mpp) if p.mpp else None,
        "objective_power": p.objective_power,
        "bounds": list(p.bounds_l0) if p.bounds_l0 else None,
    }
    reader.close()
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    click.echo(f"{slide}")
    click.echo(f"  reader     {data['reader']}  (vendor: {data['vendor']})")
    click.echo(f"  size       {data['width']} x {data['height']} px")
    mpp_text = f"{p.mpp[0]:.4f} x {p.mpp[1]:.4f} µm/px" if p.mpp else "unknown (pass --mpp to wsiseg run)"
    click.echo(f"  mpp        {mpp_text}")
    click.echo(f"  objective  {p.objective_power if p.objective_power else 'unknown'}")
    click.echo(f"  bounds     {data['bounds'] if data['bounds'] else 'none'}")
    for i, lvl in enumerate(levels):
        click.echo(f"  level {i}    {lvl['width']} x {lvl['height']}  downsample {lvl['downsample']:.3f}")


def _register_train() -> None:
    from wsiseg.cli.train import train

    main.add_command(train)


def _register_pseudo_label() -> None:
    from wsiseg.cli.pseudo_label import pseudo_label_command

    main.add_command(pseudo_label_command)


def _register_models() -> None:
    from wsiseg.cli.models import models

    main.add_command(models)


def _register_eval() -> None:
    from wsiseg.cli.evaluate import eval_command

    main.add_command(eval_command)


def _register_score() -> None:
    from wsiseg.cli.score import score

    main.add_command(score)


_register_models()
_register_eval()
_register_score()
_register_train()
_register_pseudo_label()

if __name__ == "__main__":
    main()
