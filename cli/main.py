"""The `wsiseg` command: thin over the library, which is imported inside each command."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Iterator, NoReturn, Sequence

import click

from wsiseg._version import __version__
from wsiseg.cli.progress import Progress

log = logging.getLogger("wsiseg")

#: smallest `wsiseg demo --size` (one model tile)
DEMO_MIN_SIZE_PX = 64
SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide",
                  ".png", ".jpg", ".jpeg")


#: the run's log file in the output folder; Dask workers write there too
LOG_NAME = "wsiseg.log"
#: loggers whose records reach the terminal only with --verbose (always the log file)
_DASK_LOGGERS = ("distributed", "tornado", "asyncio", "bokeh")


def _usage_error(message: str) -> NoReturn:
    """One line on stderr, exit 2 (a usage error: nothing was run)."""
    _fail(message, None)
    sys.exit(2)


def _check_out_dir(out_dir: Path) -> None:
    """-o must be a folder or not exist yet; anything else is a usage error (exit 2)."""
    if out_dir.exists() and not out_dir.is_dir():
        _usage_error(f"-o {out_dir}: is a file, not a folder; give a folder for the outputs (created when missing)")


def _setup_logging(out_dir: Path | None, verbose: bool, quiet: bool) -> Path | None:
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "wsiseg_cli", False)]:  # an earlier command's
        root.removeHandler(old)
        old.close()
    root.setLevel(logging.DEBUG)
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(logging.DEBUG if verbose else logging.ERROR if quiet else logging.WARNING)
    console.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    if not verbose:  # Dask's own warnings (nannies, the scheduler) go to the log file only
        console.addFilter(lambda record: not record.name.startswith(_DASK_LOGGERS) and not _dask_warning(record))
    logging.captureWarnings(True)  # Python warnings become "py.warnings" records: Dask's go to the log file
    handlers: list[logging.Handler] = [console]
    # numba: compiling the kernels on a first run logs ~80k DEBUG lines, "captured error" tracebacks included
    for noisy in ("distributed", "tornado", "asyncio", "PIL", "numcodecs", "zarr", "fsspec", "numba"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    log_path = None
    if out_dir is not None:
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            _usage_error(f"-o {out_dir}: cannot create the output folder ({exc.strerror or exc}); give another -o")
        log_path = out_dir / LOG_NAME
        handler = logging.FileHandler(log_path)
        handler.setLevel(logging.DEBUG)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handlers.append(handler)
    for h in handlers:
        h.wsiseg_cli = True  # type: ignore[attr-defined]
        root.addHandler(h)
    return log_path


def _dask_warning(record: logging.LogRecord) -> bool:
    """A Python warning (captured as a log record) raised inside Dask."""
    text = record.getMessage()  # "path/to/file.py:line: Category: message"
    return record.name == "py.warnings" and any(f"{os.sep}{name}{os.sep}" in text for name in _DASK_LOGGERS)


def _fail(message: str, log_path: Path | None) -> None:
    where = f" (details in {log_path})" if log_path else ""
    click.echo(f"error: {' '.join(message.split())}{where}", err=True)


def _slide_failure(slide: Path, exc: BaseException) -> str:
    """One line for a failed slide that names it once (wsiseg's messages already do)."""
    text = " ".join(str(exc).split())
    if not isinstance(exc, (ValueError, OSError, LookupError)) and type(exc).__module__.split(".")[0] != "wsiseg":
        text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__  # a library's bare message
    return text if str(slide) in text else f"{slide}: {text}"


def _check_inputs(inputs: tuple[str, ...]) -> None:
    """Every SLIDES argument must exist; a missing one is a usage error (exit 2) before any work."""
    missing = [item for item in inputs if not Path(item).exists()]
    if missing:
        _usage_error(f"{', '.join(missing)}: no such file or folder; check the path{'s' if len(missing) > 1 else ''}")


def _expand_slides(inputs: tuple[str, ...]) -> list[Path]:
    slides: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            from wsiseg.readers import find_slides

            slides.extend(find_slides(p))  # subfolders too; a DICOM folder is one slide
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
                     default=None, help="Points to segment: CSV x,y[,label] in level-0 px, or GeoJSON in "
                     "QuPath's frame (as --roi)."),
        click.option("--tile-size", "tile_size", type=int, default=None,
                     help="Tile size in model px (default: the model's; 1024 for wsiseg-tiny, 256 for classical and SAM)."),
        click.option("--overlap", type=int, default=64, show_default=True, help="Tile overlap in model px."),
        click.option("--mpp", type=float, default=None, help="Slide resolution in µm/px, for files that lack it or state a wrong one (replaces the file's)."),
        click.option("--roi", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
                     help="GeoJSON polygons restricting the run, in QuPath's frame: level-0 px minus the slide's "
                     "openslide.bounds-x/y, as QuPath exports and wsiseg writes every GeoJSON."),
        click.option("--no-tissue-detection", is_flag=True, help="Process the whole slide, not only tissue."),
        click.option("--geojson-format", type=click.Choice(["gz", "geojson", "zip"]), default="gz",
                     show_default=True, help="gz: .geojson.gz; zip: region shards QuPath imports one by one."),
        click.option("--no-labels", is_flag=True, help="Skip the label raster in the Zarr store."),
        click.option("--workers", type=int, default=None, help="Local Dask workers (default: CPU cores)."),
        click.option("--scheduler", default=None,
                     help="'synchronous' (no Dask: one process, the network on every core; faster on small machines, and for debugging) or a Dask scheduler address tcp://host:8786."),
        click.option("--cluster", type=click.Choice(["slurm"]), default=None,
                     help="Run the Dask workers as SLURM jobs (needs --cluster-config; docs/cluster.md)."),
        click.option("--cluster-config", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
                     help="YAML or TOML file: queue, account, cores, memory, gpus, walltime, jobs per SLURM job."),
        click.option("--device", type=click.Choice(["cpu", "cuda", "auto"]), default="auto", show_default=True,
                     help="auto: CUDA when a GPU is present, else the CPU."),
        click.option("--gpus", type=int, default=0, show_default=True, help="One Dask worker per GPU."),
        click.option("--k-negatives", type=int, default=None, help="Negative prompts per nucleus (model default)."),
        click.option("--prompt-selection", type=click.Choice(["centroid", "probability"]), default=None,
                     help="Probability prompters: points at component centroids or sampled from the map."),
        click.option("--points-per-tile", type=int, default=None, help="Probability prompters: points per tile."),
        click.option("--min-score", type=float, default=None,
                     help="Drop prompts scoring below this (0 <= S < 1; default: the model's own threshold, "
                     "0.3 for wsiseg-tiny; `wsiseg models info MODEL` shows it)."),
        click.option("--tta", is_flag=True,
                     help="Test-time augmentation (wsiseg-tiny-type models): average the network's maps over "
                     "each tile's flips (4 network passes a tile, about 3x the run's time); held-out PQ +0.006, "
                     "AJI, Dice and F1 unchanged or slightly lower (docs/models.md)."),
        click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]), default=None,
                     help="Arithmetic of a wsiseg-tiny-type network (default: the model's own; wsiseg-tiny: auto, "
                     "bf16 where the CPU or GPU computes it in hardware, else fp32; resolved where the run starts). "
                     "fp32 does not depend on the hardware's bf16 support."),
        click.option("--on-bad-tile", "on_bad_tile", type=click.Choice(["fail", "skip"]), default="fail",
                     show_default=True, help="A tile the slide file cannot decode: fail (that slide fails, naming "
                     "the tile) or skip (paint it as background and list it in the report)."),
        click.option("--overwrite", is_flag=True, help="Redo slides whose complete outputs already exist."),
        click.option("--batch-tiles", type=int, default=8, show_default=True, help="Tiles per task."),
        click.option("--log", "log_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
                     help="Append the run's events to FILE as JSON lines, for machines: start, each slide's "
                     "start, progress, result or failure, end."),
        click.option("-q", "--quiet", is_flag=True, help="No progress bar; errors only."),
        click.option("-v", "--verbose", is_flag=True, help="Log details to the terminal too."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _config(**kw: Any) -> Any:
    from wsiseg.cluster import cluster_from_options
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
        tta=kw["tta"],
        precision=kw["precision"],
        batch_tiles=kw["batch_tiles"],
        on_bad_tile=kw["on_bad_tile"],
        scheduler=SchedulerConfig(scheduler=kw["scheduler"], workers=kw["workers"], gpus=kw["gpus"],
                                  cluster=cluster_from_options(kw["cluster"], kw["cluster_config"])),
    )


def _prepare(out_dir: Path, kw: dict[str, Any]) -> Any:
    """The run's RunConfig with its models loaded once; a bad option, an unknown --model or a
    --device without CUDA is a usage error (one line, exit 2) before any slide or Dask starts."""
    from dataclasses import replace

    from wsiseg.pipeline import load_run_models

    try:
        config = _config(**kw)
    except ValueError as exc:
        _usage_error(str(exc))
    try:
        spec, _, _ = load_run_models(config)
    except Exception as exc:  # noqa: BLE001 - whatever stops the model loading, the fix is an option
        _usage_error(str(exc) or f"--model {kw['model']}: {type(exc).__name__}")
    # the arithmetic that will run ("auto" or the model's own, resolved), so a rerun that asks for it
    # by another name finds the slide done
    config = replace(config, precision=spec.precision)
    return replace(config, scheduler=replace(config.scheduler, worker_log=out_dir / LOG_NAME))


def _run_slides(slides: list[Path], out_dir: Path, config: Any, kw: dict[str, Any], log_path: Path | None,
                entries: Sequence[Any] = ()) -> int:
    """Run every slide (one failure never stops the others), write the summary, return the exit
    code.  The terminal shows `Progress`; `--log FILE` receives the events of wsiseg.cli.event_log
    (a file that cannot be opened is a usage error, before any slide)."""
    from wsiseg.cli.event_log import EventLog

    log_file: Path | None = kw.get("log_file")
    try:
        events = EventLog(log_file)
    except OSError as exc:
        _usage_error(f"--log {log_file}: cannot open it for writing ({exc.strerror or exc}); give a file in a "
                     "writable folder")
    with events:
        return _run_cohort(slides, out_dir, config, kw, log_path, entries, events)


def _run_cohort(slides: list[Path], out_dir: Path, config: Any, kw: dict[str, Any], log_path: Path | None,
                entries: Sequence[Any], events: Any) -> int:
    from wsiseg.pipeline import run_slide
    from wsiseg.slide_manifest import entry_config, requested_output_names
    from wsiseg.summary import write_summary
    from wsiseg.disk_space import disk_full_error, is_disk_full
    from wsiseg.scheduling import Runner, SchedulerConfig, SchedulerError
    from wsiseg.cohort import Ledger, output_names, slide_stem
    from wsiseg.pipeline import completed_outputs

    quiet = kw["quiet"]
    t_run = time.monotonic()
    tally = {"done": 0, "skipped": 0, "failed": 0}  # this run's slides
    events.emit("run_start", argv=sys.argv, version=__version__, out=out_dir, slides=len(slides),
                parameters=config.parameters(), overwrite=kw["overwrite"],
                scheduler=kw["scheduler"] or ("slurm" if kw["cluster"] else "local"))

    def finish(code: int) -> int:
        events.emit("run_end", **tally, pending=len(slides) - sum(tally.values()), exit_code=code,
                    seconds=round(time.monotonic() - t_run, 3))
        return code

    try:
        names = requested_output_names(output_names(slides, out_dir), entries, out_dir)
    except ValueError as exc:
        _fail(str(exc), None)
        return finish(2)
    ledger = Ledger(out_dir, slides)
    progress = Progress(enabled=not quiet, slides_total=len(slides))
    with ExitStack() as stack:
        slide_entries = {s: next((e for e in entries if e.path == s), None) for s in slides}  # a manifest row's
        slide_configs = {s: entry_config(config, slide_entries[s]) for s in slides}  # mpp, roi, output_name
        finished = {s: None if kw["overwrite"] else completed_outputs(s, out_dir, slide_configs[s], names[s])
                    for s in slides}
        # a rerun of a finished cohort starts no Dask cluster: there is nothing to compute
        synchronous = all(done is not None for done in finished.values())
        try:
            runner = stack.enter_context(Runner(SchedulerConfig(scheduler="synchronous") if synchronous
                                                else config.scheduler))
        except SchedulerError as exc:  # an unreachable scheduler, no sbatch: nothing ran
            _fail(str(exc), log_path)
            return finish(1)
        if runner.distributed:
            events.emit("cluster_start", dashboard=runner.dashboard, workers=runner.n_workers)
            if runner.dashboard and not quiet:
                click.echo(f"Dask dashboard: {runner.dashboard}")
        stack.callback(progress.clear)
        _clear_progress_before_log_records(stack, progress)
        stack.enter_context(_signals_interrupt())
        current: Path | None = None
        interrupted: int | None = None  # the exit code of an interrupted run
        try:
            for index, slide in enumerate(slides, 1):
                name = names[slide]
                entry, slide_config = slide_entries[slide], slide_configs[slide]
                if name not in (slide_stem(slide), entry and entry.output_name) and not quiet:
                    click.echo(f"{slide.name}: outputs named {name} ({slide_stem(slide)} is another slide's name)")
                done = finished[slide]
                if done is not None:
                    # still done: the ledger and summary keep its result (this run's tally says skipped)
                    ledger.mark(slide, "done", report=str(done), nuclei=_report_nuclei(done), already_done=True)
                    tally["skipped"] += 1
                    progress.end_slide("skipped")
                    events.emit("slide_skipped", slide, reason="already done", report=done)
                    if not quiet:
                        click.echo(f"{slide.name}: already done ({done.name}); --overwrite to redo")
                    continue
                current = slide  # before the ledger says running: an interrupt then puts it back
                ledger.mark(slide, "running")
                progress.start_slide(slide.name)
                events.emit("slide_start", slide, index=index, total=len(slides), output_name=name)

                def report(stage: str, done: int, total: int, count: int, slide: Path = slide) -> None:
                    progress(stage, done, total, count)
                    events.progress(slide, stage, done, total, count)

                t_slide = time.monotonic()
                try:
                    result = run_slide(slide, out_dir, slide_config, runner=runner, progress=report, output_name=name)
                except Exception as exc:  # one bad slide never stops the others
                    tally["failed"] += 1
                    log.debug("%s failed", slide, exc_info=True)
                    if is_disk_full(exc):  # wherever it struck: name the disk and its free space
                        exc = disk_full_error(exc, out_dir)
                    message = _slide_failure(slide, exc)
                    ledger.mark(slide, "failed", reason=message)
                    progress.end_slide("failed")
                    events.emit("slide_failed", slide, reason=message, seconds=round(time.monotonic() - t_slide, 3))
                    _fail(message, log_path)
                    if isinstance(exc, SchedulerError):  # no further slide can run: stop, the rest stay pending
                        break
                    continue
                counts = result.report_data.get("counts", {})
                n_nuclei = int(counts.get("nuclei", result.n_nuclei))  # the report's count
                bad = int(counts.get("unreadable_tiles", 0))
                ledger.mark(slide, "done", nuclei=n_nuclei, report=str(result.report))
                tally["done"] += 1
                progress.end_slide("done")
                events.emit("slide_done", slide, nuclei=n_nuclei, seconds=round(time.monotonic() - t_slide, 3),
                            unreadable_tiles=bad, outputs={"geojson": result.geojson, "zarr": result.zarr,
                                                           "report": result.report, "report_html": result.report_html})
                if not quiet:
                    note = f" ({bad} unreadable tiles painted as background, listed in {result.report.name})" if bad else ""
                    if result.report_data.get("resumed"):
                        note += " (resumed: the interrupted run's finished tiles were reused)"
                    click.echo(f"{slide.name}: {n_nuclei:,} nuclei{note} -> {result.geojson}, {result.zarr}, "
                               f"{result.report_html}")
        except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (a SLURM walltime, `kill`): stop cleanly
            signal_name = getattr(exc, "signal_name", "SIGINT")
            if current is not None and ledger.entries.get(str(current), {}).get("state") == "running":
                ledger.mark(current, "pending", reason=f"interrupted by {signal_name}")
            progress.clear()
            events.emit("run_interrupted", current, signal=signal_name)
            _fail(f"interrupted by {signal_name}: rerun the same command to go on (finished slides are kept, "
                  "the interrupted one resumes from its checkpoints)", log_path)
            interrupted = getattr(exc, "exit_code", 130)
    if len(slides) > 1 and not quiet:  # this run's slides
        click.echo(f"{tally['done']} done, {tally['skipped']} already done, {tally['failed']} failed ({ledger.path})")
    try:
        write_summary(out_dir)  # OUT/summary.csv and summary.html, failures first
    except OSError as exc:
        _fail(f"could not write the summary in {out_dir}: {exc}", log_path)
    return finish(interrupted if interrupted is not None else 1 if tally["failed"] else 0)


class Interrupted(KeyboardInterrupt):
    """A termination signal turned into KeyboardInterrupt, so a run stops as it does on Ctrl-C:
    the current slide's writers abort, its checkpoints stay for the rerun, the ledger, summary
    and log are written.  exit_code: 128 + the signal's number (the shell's convention)."""

    def __init__(self, signum: int) -> None:
        super().__init__()
        self.signal_name = signal.Signals(signum).name
        self.exit_code = 128 + signum


@contextmanager
def _signals_interrupt() -> Iterator[None]:
    """While the run lasts, SIGTERM (what `kill`, SLURM at its walltime, and docker stop send)
    and SIGHUP (a closed terminal) interrupt it like Ctrl-C; the previous handlers come back after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, _frame: Any) -> None:
        raise Interrupted(signum)

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _clear_progress_before_log_records(stack: ExitStack, progress: Progress) -> None:
    """While the run lasts, a record the terminal shows (a warning) first erases the unfinished
    progress line, so that it starts on a line of its own."""

    def clear(record: logging.LogRecord) -> bool:
        progress.clear()
        return True

    for handler in logging.getLogger().handlers:
        if getattr(handler, "wsiseg_cli", False) and not isinstance(handler, logging.FileHandler):
            handler.addFilter(clear)
            stack.callback(handler.removeFilter, clear)


def _report_nuclei(report: Path) -> int | None:
    """The nuclei count a finished slide's report records (None if unreadable)."""
    try:
        return int(json.loads(report.read_text())["counts"]["nuclei"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


@main.command()
@click.argument("slides", nargs=-1, required=True)
@_run_options
def run(slides: tuple[str, ...], **kw: Any) -> None:
    """Segment the nuclei of one or more SLIDES (files or folders of slides).

    Exit status: 0 every slide done (or already done), 1 some slides failed (one line each),
    2 usage error (bad option, missing input, unknown model, -o is a file): nothing was run.
    """
    out_dir: Path = kw.pop("out_dir")
    _check_out_dir(out_dir)
    _check_inputs(slides)
    from wsiseg.slide_manifest import ManifestError, expand_inputs

    try:
        entries = expand_inputs(slides, _expand_slides)  # a .csv is a manifest: path[,mpp,roi,output_name]
    except ManifestError as exc:
        _usage_error(str(exc))
    paths = [e.path for e in entries]
    if not paths:
        _usage_error(f"no slides found in {', '.join(slides)}")
    config = _prepare(out_dir, kw)
    log_path = _setup_logging(out_dir, kw["verbose"], kw["quiet"])
    sys.exit(_run_slides(paths, out_dir, config, kw, log_path, entries))


@main.command()
@click.option("--size", type=click.IntRange(min=DEMO_MIN_SIZE_PX), default=2048, show_default=True,
              help=f"Side of the synthetic slide in px (>= {DEMO_MIN_SIZE_PX}).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--slide-only", "slide_only", type=click.Path(path_type=Path), default=None, metavar="PATH",
              help="Only write the synthetic slide to PATH (.svs; e.g. to build a test cohort with "
                   "several seeds), do not run.")
@_run_options
def demo(size: int, seed: int, slide_only: Path | None, **kw: Any) -> None:
    """Make a small synthetic H&E slide and run the whole pipeline on it (no downloads)."""
    from wsiseg.synthetic import SyntheticSpec, make_nuclei, write_svs_like

    out_dir: Path = kw.pop("out_dir")
    if out_dir == Path("results"):
        out_dir = Path("demo-out")
    if slide_only is not None:
        if slide_only.suffix.lower() != ".svs":
            _usage_error(f"--slide-only {slide_only}: the synthetic slide is an Aperio-style .svs; name it NAME.svs")
        try:  # as `run -o` does for its output folder
            slide_only.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            _usage_error(f"--slide-only {slide_only}: cannot create folder {slide_only.parent}: {exc.strerror or exc}")
        slide = slide_only
    else:
        _check_out_dir(out_dir)
        config = _prepare(out_dir, kw)
        log_path = _setup_logging(out_dir, kw["verbose"], kw["quiet"])
        slide = out_dir / "demo-slide.svs"
    # a small slide is all tissue: a tissue blob with a margin would leave it without nuclei
    spec = SyntheticSpec(width=size, height=size, seed=seed, tissue_fraction=1.0 if size < 1024 else 0.6)
    levels = tuple(d for d in (1, 4, 16) if size // d >= 16)  # no pyramid level under 16 px
    truth = write_svs_like(slide, spec, make_nuclei(spec), levels=levels)
    if not kw["quiet"]:
        click.echo(f"wrote synthetic slide {slide} ({size}x{size} px, {len(truth)} nuclei)")
    if slide_only is not None:
        return
    sys.exit(_run_slides([slide], out_dir, config, kw, log_path))


@main.command()
@click.argument("slide", type=click.Path(path_type=Path))
@click.option("--mpp", type=float, default=None, help="Resolution in µm/px to use instead of the file's (or where it states none).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def info(slide: Path, mpp: float | None, as_json: bool) -> None:
    """Vendor, size, levels, mpp, objective, bounds, and which reader opened SLIDE."""
    import json

    from wsiseg.readers import open_slide
    from wsiseg.readers.base import SlideError

    if not slide.exists():
        _usage_error(f"{slide}: no such file or folder; check the path")
    try:
        reader = open_slide(slide, mpp=mpp)
    except ValueError as exc:  # an option's value (--mpp)
        _usage_error(str(exc))
    except SlideError as exc:  # the file is there but is no slide wsiseg can read: it failed
        _fail(str(exc), None)
        sys.exit(1)
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
    why = f"{p.mpp_problem}; " if p.mpp_problem else ""
    mpp_text = f"{p.mpp[0]:.4f} x {p.mpp[1]:.4f} µm/px" if p.mpp else f"unknown ({why}pass --mpp to wsiseg run)"
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


def _register_check() -> None:
    from wsiseg.cli.check import check_command

    main.add_command(check_command)


def _register_qupath() -> None:
    from wsiseg.cli.qupath import qupath_script

    main.add_command(qupath_script)


_register_models()
_register_eval()
_register_score()
_register_train()
_register_pseudo_label()
_register_check()
_register_qupath()

if __name__ == "__main__":
    main()
