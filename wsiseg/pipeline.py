"""One slide, end to end.  The only module that knows every stage.

    slide -> reader -> tissue -> prompter tiles -> global prompt set (point NMS)
          -> segmentor tiles (owned prompts + negatives) -> stitch -> writers

Coordinates: stages work in the *working frame* (pixels at the model's mpp, from
ScaledSlide); everything stored is level-0 (l0 = working * scale).  Tasks carry batches of
tiles and run wherever the Runner puts them; models and slides are opened once per worker
process and cached.
"""

from __future__ import annotations

import logging
import math
import sys
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal, Sequence

import numpy as np

from wsiseg._version import __version__
from wsiseg.models.protocols import NucleusClass, PointSet, Prompter, Segmentor
from wsiseg.checkpoints import SlideCheckpoint, checkpoint_key, remove_partial_outputs
from wsiseg.cohort import slide_stem
from wsiseg.map_store import shares_maps
from wsiseg.models.tiny.maps import PRECISIONS
from wsiseg.nuclei import NucleusTable
from wsiseg.provenance import build_provenance, build_report, model_sha256, model_version
from wsiseg.workers import (
    BAD_TILE_POLICIES, BAD_TILES_KEY, WORKER_CACHE, BadTilePolicy, GuardedReader, ModelSpec, SlideSpec,
    network_precision, unique_bad_tiles,
)
from wsiseg.prompts import count_segmentor_jobs, iter_segmentor_jobs, point_nms
from wsiseg.scheduling import Runner, SchedulerConfig, Stage
from wsiseg.stages import predict_points, read_tiles, segment, stitch
from wsiseg.tiling import plan_prompter_tiles, plan_segmentor_tiles

log = logging.getLogger(__name__)

GeoJSONFormat = Literal["gz", "geojson", "zip"]
GEOJSON_FORMATS: tuple[GeoJSONFormat, ...] = ("gz", "geojson", "zip")
STAGES = ("open", "tissue", "prompter", "merge", "segmentor", "write")
#: the model `wsiseg run` uses when none is named: the built-in learned model.
DEFAULT_MODEL = "wsiseg-tiny"
#: tile side (model px) when neither --tile-size nor the model decides it.
DEFAULT_TILE_PX = 256


@dataclass(frozen=True)
class RunConfig:
    """Everything that decides a run's result, plus how it is scheduled."""

    model: str = DEFAULT_MODEL
    prompter: str | None = None
    prompts_file: Path | None = None
    #: None: the segmentor's required or preferred tile size, else DEFAULT_TILE_PX
    tile_size_px: int | None = None
    overlap_px: int = 64
    mpp: float | None = None
    tissue_detection: bool = True
    roi: Path | None = None
    geojson_format: GeoJSONFormat = "gz"
    write_labels: bool = True
    device: str = "cpu"
    k_negatives: int | None = None
    prompt_selection: str | None = None
    points_per_tile: int | None = None
    min_score: float | None = None
    #: test-time augmentation: a dense-map model's maps averaged over each tile's flips (4 network passes a tile)
    tta: bool = False
    #: a dense-map model's arithmetic: "auto" (bf16 where the hardware has it), "fp32", "bf16"; None: the model's own
    precision: str | None = None
    batch_tiles: int = 8
    #: a tile the file cannot decode: "fail" (one line naming it) or "skip" (background, listed in the report)
    on_bad_tile: BadTilePolicy = "fail"
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)

    def __post_init__(self) -> None:
        if self.tile_size_px is not None and self.tile_size_px < 64:
            raise ValueError(f"--tile-size must be >= 64, got {self.tile_size_px}")
        # without --tile-size the tile is the model's: `_tile_size` checks the overlap against it
        below_tile = self.tile_size_px is None or self.overlap_px < self.tile_size_px
        if not (0 <= self.overlap_px and below_tile and self.overlap_px % 2 == 0):
            raise ValueError(
                f"--overlap must be an even number of px, >= 0 and below --tile-size ({self.tile_size_px}); "
                f"got {self.overlap_px}"
            )
        if self.prompter is not None and not str(self.prompter).strip():
            raise ValueError("--prompter needs a model name or bundle folder (see `wsiseg models list`), got ''")
        if self.geojson_format not in GEOJSON_FORMATS:
            raise ValueError(f"--geojson-format must be one of {GEOJSON_FORMATS}, got {self.geojson_format!r}")
        if self.mpp is not None and not 0.01 < self.mpp < 100:
            raise ValueError(f"--mpp must be a resolution in µm per pixel (e.g. 0.25), got {self.mpp}")
        if self.batch_tiles < 1:
            raise ValueError(f"batch size must be >= 1, got {self.batch_tiles}")
        if self.on_bad_tile not in BAD_TILE_POLICIES:
            raise ValueError(f"--on-bad-tile must be one of {', '.join(BAD_TILE_POLICIES)}, got {self.on_bad_tile!r}")
        if self.prompt_selection not in (None, "centroid", "probability"):
            raise ValueError(f"--prompt-selection must be centroid or probability, got {self.prompt_selection!r}")
        if self.points_per_tile is not None and self.points_per_tile < 1:
            raise ValueError(f"--points-per-tile must be >= 1, got {self.points_per_tile}")
        if self.min_score is not None and not 0 <= self.min_score < 1:
            raise ValueError(f"--min-score must be in [0, 1), got {self.min_score}")
        if self.precision is not None and self.precision not in PRECISIONS:
            choices = f"{', '.join(PRECISIONS[:-1])} or {PRECISIONS[-1]}"
            raise ValueError(f"--precision must be {choices}, got {self.precision!r}")
        if self.k_negatives is not None and self.k_negatives < 0:
            raise ValueError(f"--k-negatives must be >= 0, got {self.k_negatives}")

    def parameters(self) -> dict[str, Any]:
        """The result-deciding parameters, JSON-ready (for provenance and the report)."""
        d = asdict(self)
        d.pop("scheduler")
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in d.items()}


@dataclass
class SlideResult:
    slide: Path
    geojson: Path
    zarr: Path
    report: Path
    report_html: Path
    n_nuclei: int
    report_data: dict[str, Any]


ProgressFn = Callable[[str, int, int, int], None]
"""progress(stage, done, total, nuclei_so_far)."""


# --------------------------------------------------------------------------- models


def load_run_models(config: RunConfig) -> tuple[ModelSpec, Prompter | None, Segmentor]:
    """The run's models, loaded once per process (cached): call it before any slide so an unknown
    --model, a --device without CUDA or an option the model does not take fails once, up front.
    Raises ValueError (BundleError, ModelNotFoundError) with one line naming the option."""
    if config.prompter is not None:
        from wsiseg.models.cache import resolve_model

        try:  # a bad --prompter is named as such, not as a bad model
            resolve_model(config.prompter)
        except ValueError as exc:
            raise ValueError(f"--prompter {config.prompter!r}: {exc}") from exc
    model_spec = ModelSpec(
        config.model, config.prompter, config.device, config.k_negatives, _prompter_options(config), config.tta,
        config.precision,
    )
    prompter, segmentor = model_spec.load()
    # "auto" (or the bundle's own) resolved here, once: the workers get the result, so a slide is
    # computed in one arithmetic, the one its provenance records, whatever hardware they run on
    resolved = network_precision(prompter, segmentor)
    if resolved is not None and model_spec.precision != resolved:
        model_spec = replace(model_spec, precision=resolved)
        WORKER_CACHE[("models", model_spec)] = (prompter, segmentor)
    if prompter is None and config.prompts_file is None:
        raise ValueError(
            f"model {config.model!r} has no prompter; give one with --prompter NAME or points with --prompts FILE"
        )
    return model_spec, prompter, segmentor


def _prompter_options(config: RunConfig) -> tuple[tuple[str, Any], ...]:
    """--prompt-selection / --points-per-tile, which only a probability prompter takes, and
    --min-score, which a prompter with a score threshold of its own (wsiseg-tiny) takes as it."""
    options: list[tuple[str, Any]] = []
    if config.prompt_selection is not None:
        options.append(("selection", config.prompt_selection))
    if config.points_per_tile is not None:
        options.append(("points_per_tile", config.points_per_tile))
    if not options and config.min_score is None:
        return ()
    from wsiseg.models.bundles import open_bundle
    from wsiseg.models.cache import resolve_model

    target = resolve_model(config.prompter or config.model)
    arch = None
    if target != "classical":
        bundle = open_bundle(target)
        arch = bundle.component("prompter").architecture if bundle.has("prompter") or options else None
    if options and arch != "unet_prompter":
        raise ValueError(
            "--prompt-selection and --points-per-tile apply to probability (UNet) prompters; "
            f"{config.prompter or config.model!r} has a {arch or 'classical'} prompter"
        )
    if config.min_score is not None and arch == "tiny_prompter":
        options.append(("min_score", config.min_score))
    return tuple(options)


# --------------------------------------------------------------------------- tasks (wsiseg.stages)

PROMPTER_STAGES = (Stage(read_tiles), Stage(predict_points, model=True))
SEGMENTOR_STAGES = (Stage(read_tiles), Stage(segment, model=True), Stage(stitch))


def _prompter_stages(map_store: Path | None) -> tuple[Stage, ...]:
    if map_store is None:
        return PROMPTER_STAGES
    return (Stage(read_tiles), Stage(partial(predict_points, map_store=map_store), model=True))


def _segmentor_stages(map_store: Path | None) -> tuple[Stage, ...]:
    if map_store is None:
        return SEGMENTOR_STAGES
    return (Stage(read_tiles), Stage(partial(segment, map_store=map_store), model=True), Stage(stitch))


def _batches(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


# --------------------------------------------------------------------------- the run


def run_slide(
    slide_path: Path | str,
    out_dir: Path | str,
    config: RunConfig = RunConfig(),
    *,
    runner: Runner | None = None,
    progress: ProgressFn | None = None,
    output_name: str | None = None,
) -> SlideResult:
    """Segment every nucleus of one slide and write `NAME.geojson.gz`, `.zarr`, `.report.json`.

    NAME is `output_name`, by default the slide's file name without its extension (a cohort
    takes unique names from `wsiseg.cohort.output_names`).
    """
    slide_path = Path(slide_path)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = output_name or slide_stem(slide_path)
    with ExitStack() as stack:
        if runner is None:
            runner = stack.enter_context(Runner(config.scheduler))
        return _run(slide_path, out_dir, config, runner, progress or (lambda *a: None), name)


def _run(
    slide_path: Path, out_dir: Path, config: RunConfig, runner: Runner, progress: ProgressFn, name: str
) -> SlideResult:
    from wsiseg.readers import open_slide, require_mpp
    from wsiseg.readers.scaled import ScaledSlide

    timings: dict[str, float] = {s: 0.0 for s in STAGES}
    # task time; post_cpu, write_cpu: CPU time of the stitching threads and of streaming the
    # nuclei to the writers (waits for other threads left out); write_wall: the latter's wall
    # time; checkpoint_cpu: CPU time of saving the segmentor batches for a resume; the report
    # adds write_close, the wall time of closing the writers (after the report is built)
    work = dict.fromkeys(("read", "model", "post", "post_cpu", "write_cpu", "write_wall", "checkpoint_cpu"), 0.0)
    t_start = time.perf_counter()
    started = time.time()  # partial outputs older than this are a killed run's

    # -- open
    reader = GuardedReader(open_slide(slide_path, mpp=config.mpp), config.on_bad_tile)
    props = reader.properties
    slide_mpp = float(np.mean(require_mpp(props, slide_path)))
    # tissue detection (it reads only the thumbnail) runs in a thread while the models load
    pool = ThreadPoolExecutor(1, thread_name_prefix="wsiseg-tissue")
    tissue_job = pool.submit(_timed_tissue, reader, config, slide_mpp)
    pool.shutdown(wait=False)  # the thread ends with the job
    model_spec, prompter, segmentor = load_run_models(config)
    config = replace(config, precision=model_spec.precision)  # what runs: "auto" or the model's own, resolved
    classes = _classes(prompter)
    tile_px = _tile_size(config, segmentor, prompter)
    scaled = ScaledSlide(reader, segmentor.mpp)
    slide_spec = SlideSpec(slide_path, config.mpp, segmentor.mpp, config.on_bad_tile)
    WORKER_CACHE[("slide", slide_spec)] = scaled
    width, height = scaled.size_px
    timings["open"] = time.perf_counter() - t_start

    # -- tissue, prompter and the global prompt set (or their checkpoint)
    decisive = _decisive(replace(config, tile_size_px=tile_px), model_spec)  # the tile size used, not None
    checkpoint = SlideCheckpoint(out_dir, name, checkpoint_key(slide_path, decisive))
    saved = checkpoint.load_prompts()
    # one network pass when the segmentor reads the prompter's maps (wsiseg.map_store)
    map_store: Path | None = None
    if config.prompts_file is None and shares_maps(prompter, segmentor):
        map_store = checkpoint.folder / "maps.zarr"
    resumed = saved is not None and (map_store is None or map_store.exists())
    if resumed:
        points, counts = saved
        log.info("%s: resuming from %s", slide_path.name, checkpoint.folder)
    else:
        points, counts = _global_prompts(
            config, tissue_job, reader, props, scaled, prompter, classes, tile_px, slide_spec, model_spec,
            runner, progress, timings, work, map_store,
        )
        checkpoint.save_prompts(points, counts)
    n_prompter_tiles, n_raw = counts["prompter_tiles"], counts["points_raw"]
    n_found = counts.get("points_found", n_raw)
    unreadable: list[dict[str, Any]] = list(counts.get(BAD_TILES_KEY, []))

    # -- segmentor + stitch, streamed into the writers
    t = time.perf_counter()
    halo = max(config.overlap_px // 2, segmentor.max_nucleus_diameter_px, int(getattr(segmentor, "halo_px", 0)))
    splan = plan_segmentor_tiles(width, height, tile_px, halo)
    n_jobs = count_segmentor_jobs(points, splan)
    jobs = iter_segmentor_jobs(
        points, splan, k_negatives=segmentor.k_negatives, context_px=segmentor.max_nucleus_diameter_px
    )
    geojson_path, zarr_path, report_path, html_path = output_paths(name, out_dir, config)
    provenance = build_provenance(slide_path, props, slide_mpp, scaled.scale, config, segmentor, prompter, classes)
    writers = _open_writers(geojson_path, zarr_path, config, props, classes, provenance, slide_mpp)
    n_nuclei = n_edge = 0
    # the writers (and the checkpoint) take each batch in a thread of their own, so the model
    # never waits for them; at most WRITE_QUEUE batches wait there, in order
    writing = ThreadPoolExecutor(1, thread_name_prefix="wsiseg-write")
    pending: deque[Future[None]] = deque()
    stopping = threading.Event()
    try:
        done = 0
        for table, tm, save in _segmentor_results(jobs, config, checkpoint, runner, slide_spec, model_spec, map_store):
            _add(work, tm)
            unreadable.extend(tm.get(BAD_TILES_KEY, ()))
            pending.append(writing.submit(_write_batch, writers, table, save, work, stopping))
            tw = time.perf_counter()
            while len(pending) > WRITE_QUEUE:
                pending.popleft().result()
            timings["write"] += time.perf_counter() - tw
            n_nuclei += len(table)
            n_edge += int(table.touches_edge.sum())
            done += min(config.batch_tiles, n_jobs - done)
            progress("segmentor", done, n_jobs, n_nuclei)
        tw = time.perf_counter()
        while pending:
            pending.popleft().result()
        timings["write"] += time.perf_counter() - tw
        timings["segmentor"] = time.perf_counter() - t - timings["write"]
        tw = time.perf_counter()
        unreadable = unique_bad_tiles([*unreadable, *(b.as_dict() for b in reader.take_bad_tiles())])
        counts = {
            "prompter_tiles": n_prompter_tiles, "segmentor_tiles": n_jobs, "points_found": n_found,
            "points_raw": n_raw, "prompts": len(points), "nuclei": n_nuclei, "unreadable_tiles": len(unreadable),
            "nuclei_touching_tile_edge": n_edge, "halo_px": halo,
            "tile_px": tile_px,
            "workers": runner.n_workers,
        }
        report = build_report(
            slide_path, props, config, segmentor, prompter, scaled.scale, work, time.perf_counter() - t_start, counts,
            unreadable_tiles=unreadable,
        )
        report["identity"] = run_identity(slide_path, config)
        report["resumed"] = resumed  # from an interrupted attempt's checkpoints: times cover only this attempt
        geojson_writer, zarr_writer = writers
        tc = time.perf_counter()
        geojson_writer.close()
        zarr_writer.close(extra_attributes={"report": report})
        report["task_time_s"]["write_close"] = round(time.perf_counter() - tc, 4)
        timings["write"] += time.perf_counter() - tw
    except BaseException:
        # batches already computed are still checkpointed (a resumed run skips them), not written
        stopping.set()
        writing.shutdown(wait=True)
        for w in writers:
            w.abort()
        raise
    finally:
        writing.shutdown(wait=True)
    report["timings_s"] = {**{k: round(v, 4) for k, v in timings.items()}, "total": round(time.perf_counter() - t_start, 4)}
    _write_reports(report, reader, config, slide_mpp, (geojson_path, zarr_path, report_path, html_path), tissue_job)
    checkpoint.clear()
    remove_partial_outputs(
        {p for fmt in GEOJSON_FORMATS for p in output_paths(name, out_dir, replace(config, geojson_format=fmt))},
        before=started,
    )
    if unreadable:
        log.warning(
            "%s: %d unreadable tiles painted as background (listed in %s)", slide_path.name, len(unreadable),
            report_path.name,
        )
    if n_edge:
        log.warning("%s: %d nuclei reached their tile's outer edge (see report)", slide_path.name, n_edge)
    return SlideResult(slide_path, geojson_path, zarr_path, report_path, html_path, n_nuclei, report)


def _global_prompts(
    config: RunConfig, tissue_job: Future[tuple[Any, float]], reader: Any, props: Any, scaled: Any,
    prompter: Prompter | None,
    classes: Sequence[NucleusClass], tile_px: int, slide_spec: SlideSpec,
    model_spec: ModelSpec, runner: Runner, progress: ProgressFn, timings: dict[str, float], work: dict[str, float],
    map_store: Path | None = None,
) -> tuple[PointSet, dict[str, Any]]:
    """Prompter tiles in the tissue (`tissue_job`: `_timed_tissue`'s) and point NMS: the slide's
    one global prompt set (working frame) and counts (with the damaged tiles read as background,
    as dicts under BAD_TILES_KEY)."""
    width, height = scaled.size_px
    tissue, timings["tissue"] = tissue_job.result()
    if tissue.is_empty and config.prompts_file is None:
        from wsiseg.tissue import no_tissue_advice

        advice = no_tissue_advice(roi_given=config.roi is not None, detect=config.tissue_detection)
        log.warning("%s: %s", props.path.name if props.path else "slide", advice)

    t = time.perf_counter()
    n_prompter_tiles = 0
    unreadable: list[dict[str, Any]] = []
    if config.prompts_file is not None:
        from wsiseg.models.prompters.file_prompts import read_prompt_file

        # GeoJSON points are in QuPath's frame (bounds subtracted, as wsiseg writes them); CSV in level 0.
        is_geojson = ".geojson" in config.prompts_file.name.lower() or config.prompts_file.suffix.lower() == ".json"
        bounds = props.bounds_l0 if is_geojson and props.bounds_l0 else (0, 0)
        pts_l0 = read_prompt_file(config.prompts_file, classes=classes, offset_l0=(bounds[0], bounds[1]))
        points = PointSet(scaled.from_l0(pts_l0.xy), pts_l0.score, pts_l0.class_id)
        xy = points.xy
        points = points.take((xy[:, 0] >= 0) & (xy[:, 1] >= 0) & (xy[:, 0] < width) & (xy[:, 1] < height))
        if len(pts_l0) and not len(points):  # a file for another slide or in another frame, never 0 nuclei
            raise ValueError(
                f"{config.prompts_file}: none of its {len(pts_l0)} points lies on the slide; GeoJSON points are in "
                "QuPath's frame (level-0 px minus the slide's bounds), CSV points in level-0 px"
            )
        n_found = len(points)
        nms_radius = 0.0
    else:
        assert prompter is not None
        pplan = plan_prompter_tiles(width, height, tile_px, prompter_overlap(config, prompter, tile_px))
        ptiles = [s for s in (pplan.tile(i) for i in range(pplan.count)) if tile_in_tissue(s, tissue, scaled)]
        n_prompter_tiles = len(ptiles)
        found: list[PointSet] = []
        n_found = 0
        if map_store is not None:
            from wsiseg.map_store import MapStore

            map_store.parent.mkdir(parents=True, exist_ok=True)
            MapStore.create(map_store, prompter.map_channels, width, height, pplan.stride_px)
        stages = _prompter_stages(map_store)
        for pts, tm in runner.map_chain(_batches(ptiles, config.batch_tiles), stages, slide_spec, model_spec):
            found.append(pts)
            _add(work, tm)
            unreadable.extend(tm.get(BAD_TILES_KEY, ()))
            n_found += len(pts)
            progress("prompter", min(len(found) * config.batch_tiles, n_prompter_tiles), n_prompter_tiles, n_found)
        points = PointSet.concat(found)
        if config.min_score is not None:
            points = points.take(points.score >= config.min_score)
        if len(points):
            points = points.take(tissue.contains_points_l0(scaled.to_l0(points.xy)))
        nms_radius = prompter.nms_radius_px
    timings["prompter"] = time.perf_counter() - t

    t = time.perf_counter()
    n_raw = len(points)
    points = point_nms(points, nms_radius)
    timings["merge"] = time.perf_counter() - t
    unreadable.extend(b.as_dict() for b in reader.take_bad_tiles())  # the tissue thumbnail's (and in-process reads')
    counts = {"prompter_tiles": n_prompter_tiles, "points_found": n_found, "points_raw": n_raw,
              BAD_TILES_KEY: unique_bad_tiles(unreadable)}
    return points, counts


def _segmentor_results(
    jobs: Iterable[Any], config: RunConfig, checkpoint: SlideCheckpoint, runner: Runner,
    slide_spec: SlideSpec, model_spec: ModelSpec, map_store: Path | None = None,
) -> Iterator[tuple[NucleusTable, dict[str, float], Callable[[], None] | None]]:
    """Each segmentor batch's (nuclei, task times, save), in order: the checkpointed prefix from
    disk (save None), then the rest computed, each with `save`, which checkpoints it; the caller
    calls it before the writers see the batch (`_write_batch`)."""
    batches = _batches(jobs, config.batch_tiles)
    n_saved = checkpoint.saved_batches()
    for index in range(n_saved):
        next(batches, None)
        yield (*checkpoint.load_batch(index), None)
    for index, (table, times) in enumerate(runner.map_chain(batches, _segmentor_stages(map_store), slide_spec, model_spec), n_saved):
        yield table, times, partial(checkpoint.save_batch, index, table, times)


#: Segmentor batches that may wait for the writer thread before the model waits for it.
WRITE_QUEUE = 2


def _write_batch(
    writers: Sequence[Any], table: NucleusTable, save: Callable[[], None] | None, work: dict[str, float],
    stopping: threading.Event,
) -> None:
    """Checkpoint one batch (`save`, when not None) and hand it to every writer, unless the run
    is `stopping` (failed or interrupted: its writers are aborted); adds the CPU time of the
    checkpoint to work["checkpoint_cpu"] and the wall and CPU time of the writing to
    work["write_wall"] and work["write_cpu"].  Runs in the writer thread."""
    if save is not None:
        cw = time.thread_time()
        save()
        work["checkpoint_cpu"] += time.thread_time() - cw
    if stopping.is_set():
        return
    tw, cw = time.perf_counter(), time.thread_time()
    for w in writers:
        w.write(table)
    work["write_wall"] += time.perf_counter() - tw
    work["write_cpu"] += time.thread_time() - cw


def _decisive(config: RunConfig, model_spec: ModelSpec) -> dict[str, Any]:
    """What decides a run's nuclei (for checkpoint keys): parameters minus output-only options,
    the models by name and by sha256 (new weights under an old name never resume old work), and
    the network's arithmetic as resolved (a run resumed on other hardware does not mix fp32 and
    bf16 work)."""
    params = config.parameters()
    for output_only in ("geojson_format", "write_labels", "device"):
        params.pop(output_only, None)
    params["precision"] = model_spec.precision
    models = [model_spec.model, model_spec.prompter]
    return {"parameters": params, "models": models, "model_sha256": [model_sha256(m) for m in models],
            "version": __version__}


def run_identity(slide_path: Path, config: RunConfig) -> str:
    """sha256 of what makes two runs' outputs the same: the source file (resolved path, size,
    mtime), every parameter, the models' sha256 and wsiseg's version.  Recorded in the report;
    a rerun skips a slide only when it matches."""
    import hashlib
    import json

    st = slide_path.stat()
    blob = {"source": [str(slide_path.resolve()), st.st_size, st.st_mtime_ns], "parameters": config.parameters(),
            "models": [config.model, config.prompter, model_sha256(config.model), model_sha256(config.prompter)],
            "version": __version__}
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()


# --------------------------------------------------------------------------- helpers


def output_paths(name: str, out_dir: Path, config: RunConfig) -> tuple[Path, Path, Path, Path]:
    """(GeoJSON, Zarr, report JSON, report HTML) paths of output name `name` in out_dir."""
    suffix = {"gz": ".geojson.gz", "geojson": ".geojson", "zip": ".geojson.zip"}[config.geojson_format]
    return (out_dir / f"{name}{suffix}", out_dir / f"{name}.zarr", out_dir / f"{name}.report.json",
            out_dir / f"{name}.report.html")


def completed_outputs(slide_path: Path, out_dir: Path, config: RunConfig, name: str | None = None) -> Path | None:
    """The report of an earlier complete run of this very slide file into out_dir with the same
    parameters, models (by sha256) and wsiseg version (`run_identity`), or None."""
    import json

    geojson, zarr_path, report, _ = output_paths(name or slide_stem(slide_path), out_dir, config)
    if not (geojson.exists() and report.exists() and zarr_path.exists()):
        return None
    try:
        from wsiseg.writers.zarr_store import open_nuclei

        open_nuclei(zarr_path)
        previous = json.loads(report.read_text())
    except Exception:
        return None
    return report if previous.get("identity") == run_identity(slide_path, config) else None


def _add(acc: dict[str, float], more: dict[str, Any]) -> None:
    for k, v in more.items():
        if k != BAD_TILES_KEY:
            acc[k] = acc.get(k, 0.0) + v


def _classes(prompter: Prompter | None) -> tuple[NucleusClass, ...]:
    from wsiseg.models.protocols import NUCLEUS

    classes = tuple(getattr(prompter, "classes", ()) or ())
    return classes or (NUCLEUS,)


def _tile_size(config: RunConfig, segmentor: Segmentor, prompter: Prompter | None = None) -> int:
    """--tile-size, else the size the segmentor requires, else the larger of the sizes the
    segmentor and the prompter prefer (`preferred_tile_px`; a network prompter beside the
    classical segmentor keeps its own large tiles), else 256."""
    want = segmentor.input_size_px
    if want is not None and config.tile_size_px is not None and want != config.tile_size_px:
        raise ValueError(
            f"model {config.model!r} takes {want} px tiles; run with --tile-size {want} (got {config.tile_size_px})"
        )
    preferred = [getattr(m, "preferred_tile_px", None) for m in (segmentor, prompter)]
    tile_px = int(config.tile_size_px or want or max((p for p in preferred if p), default=DEFAULT_TILE_PX))
    if config.overlap_px >= tile_px:
        raise ValueError(f"--overlap ({config.overlap_px}) must be below the tile size ({tile_px} px)")
    return tile_px


def prompter_overlap(config: RunConfig, prompter: Prompter, tile_px: int) -> int:
    """Prompter tiles overlap by at least twice the prompter's context (so points found in a
    tile's core are those an untiled run finds), but never by more than half a tile."""
    want = max(config.overlap_px, 2 * int(prompter.context_px))
    overlap = min(want, (tile_px // 2) // 2 * 2)
    if overlap < want:
        log.info(
            "prompter context %d px wants %d px of overlap; a %d px tile allows %d: points near tile "
            "cores may differ slightly from an untiled run (use a larger --tile-size)",
            prompter.context_px, want, tile_px, overlap,
        )
    return overlap + overlap % 2


def _timed_tissue(reader: Any, config: RunConfig, slide_mpp: float) -> tuple[Any, float]:
    """`_tissue` and the seconds it took."""
    t = time.perf_counter()
    return _tissue(reader, config, slide_mpp), time.perf_counter() - t


def _tissue(reader: Any, config: RunConfig, slide_mpp: float) -> Any:
    from wsiseg.tissue import tissue_for_slide

    # --roi is read in QuPath's frame (bounds subtracted), like every GeoJSON wsiseg reads and writes
    return tissue_for_slide(reader, mpp_l0=slide_mpp, detect=config.tissue_detection, roi=config.roi)


def tile_in_tissue(spec: Any, tissue: Any, scaled: Any) -> bool:
    """Whether a tile's owned box (working-frame px, `wsiseg.tiling` TileSpec) meets the tissue
    region (`wsiseg.tissue`, level 0); `scaled` converts with its per-axis scale."""
    sx, sy = scaled.scale_xy
    x0 = max(spec.own_x0, spec.x0) if math.isfinite(spec.own_x0) else spec.x0
    y0 = max(spec.own_y0, spec.y0) if math.isfinite(spec.own_y0) else spec.y0
    x1 = spec.own_x1 if math.isfinite(spec.own_x1) else spec.x0 + spec.size
    y1 = spec.own_y1 if math.isfinite(spec.own_y1) else spec.y0 + spec.size
    return bool(tissue.intersects_box_l0(x0 * sx, y0 * sy, x1 * sx, y1 * sy))


def _open_writers(
    geojson_path: Path, zarr_path: Path, config: RunConfig, props: Any,
    classes: Sequence[NucleusClass], provenance: dict[str, Any], slide_mpp: float,
) -> list[Any]:
    from wsiseg.writers.geojson import GeoJSONWriter
    from wsiseg.writers.zarr_store import ZarrWriter

    bounds = props.bounds_l0
    offset = (float(bounds[0]), float(bounds[1])) if bounds else (0.0, 0.0)
    gj = GeoJSONWriter(
        geojson_path,
        fmt=config.geojson_format,
        classes=classes,
        offset_l0=offset,
        foreign_members={"wsiseg": {"version": __version__, "qupath_offset": list(offset),
                                    "source": provenance["source"]["path"]}},
    )
    zw = ZarrWriter(
        zarr_path,
        width=props.size_l0[0],
        height=props.size_l0[1],
        classes=classes,
        provenance=provenance,
        label_mpp=(float(props.mpp[0]), float(props.mpp[1])) if props.mpp else (slide_mpp, slide_mpp),
        write_labels=config.write_labels,
    )
    return [gj, zw]


def _write_reports(
    report: dict[str, Any], reader: Any, config: RunConfig, slide_mpp: float, paths: tuple[Path, Path, Path, Path],
    tissue_job: Future[tuple[Any, float]],
) -> None:
    """The report JSON (tissue area, command line, models, outputs added) and its HTML page; paths as
    `output_paths`; tissue_job: the run's tissue detection (`_timed_tissue`)."""
    from wsiseg.writers.report import ReportSlide, record_run, write_report, write_report_html
    from wsiseg.writers.zarr_store import open_nuclei

    tissue = None
    try:  # a resumed run detects it too: the same thumbnail gives the same region again
        tissue = tissue_job.result()[0].polygons_l0
    except Exception as exc:  # noqa: BLE001 - the report goes without a tissue area then
        log.warning("%s: tissue area for the report not measured: %s", paths[2].name, exc)
    outputs = dict(zip(("geojson", "zarr", "report_json", "report_html"), paths))
    models = [model_version(r, n) for r, n in (("model", config.model), ("prompter", config.prompter)) if n]
    record_run(report, command_line=sys.argv, tissue_l0=tissue, mpp=slide_mpp, outputs=outputs, models=models)
    write_report(paths[2], report)
    try:
        thumb, downsample = reader.thumbnail(1024)
        slide = ReportSlide(thumb, downsample, reader.properties.size_l0, slide_mpp, tissue,
                            lambda x, y, w, h: reader.read_region((x, y), 0, (w, h)))
        write_report_html(paths[3], report, slide, open_nuclei(paths[1]))
    except Exception as exc:  # the HTML page is a convenience; never fail a finished run for it
        log.warning("could not write %s: %s", paths[3], exc)
