"""Before a cohort runs: what each slide will cost, and whether it can run at all.

`check_slide`: opens the slide with the reader chain, finds the tissue (within the
manifest's roi) exactly as a run does, then runs the real pipeline (`run_slide`, synchronous,
in this process) on a few small sample windows spread over the tissue's range of optical
density (`_sample_boxes`) and extrapolates:
  tiles   the prompter and segmentor tiles a run plans over the tissue (the pipeline's grids);
  nuclei  sample nuclei per mm² of sample tissue x tissue area;
  time    fixed costs (model load, open, tissue, writing the outputs and report, as measured)
          + measured seconds per prompter tile and per segmentor tile x the tile counts;
  memory  the process's peak resident memory while the sample ran (a run's peak does not
          grow with slide size: tiles stream through fixed-size batches).
Estimates are for one process (`--scheduler synchronous`); Dask workers share the tiles and
each holds about that much memory.
"""

from __future__ import annotations

import json
import logging
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from wsiseg.slide_manifest import SlideEntry

log = logging.getLogger(__name__)

#: Longest side of the thumbnail whose optical density picks the sample windows.
DENSITY_THUMBNAIL_PX = 512
#: Side of each sample window (µm): about one 256 px tile at 0.5 µm/px.
SAMPLE_SIDE_UM = 128.0
#: Sample windows, spread over the tissue's range of optical density (`_sample_boxes`).
SAMPLE_WINDOWS = 4
#: Share of the memory available now above which the estimated peak is a warning.
MEMORY_WARNING_SHARE = 0.8


@dataclass(frozen=True)
class CheckConfig:
    """How `check_slide` samples: the model, prompter (--prompter; None: the model's own), device,
    test-time augmentation (--tta) and network precision (--precision; None: the model's own) a
    run will use, and the default mpp."""

    model: str = "wsiseg-tiny"
    prompter: str | None = None
    device: str = "auto"
    mpp: float | None = None
    tta: bool = False
    precision: str | None = None
    sample_side_um: float = SAMPLE_SIDE_UM
    sample_windows: int = SAMPLE_WINDOWS

    def __post_init__(self) -> None:
        if not self.sample_side_um > 0:
            raise ValueError(f"sample_side_um must be > 0, got {self.sample_side_um}")
        if isinstance(self.sample_windows, bool) or not isinstance(self.sample_windows, int) or self.sample_windows < 1:
            raise ValueError(f"sample_windows must be a whole number >= 1, got {self.sample_windows!r}")


@dataclass(frozen=True)
class SlideCheck:
    """What a run of one slide will meet.  Areas in mm², times in s, memory in MiB.

    verdict: "ok", "warning" (it runs, but read `reasons`) or "unusable" (a run fails: `reasons[0]`).
    tiles_prompter, tiles_segmentor: tiles a run plans over the tissue (segmentor: an upper bound,
        tiles without prompts are skipped).
    sample: the measured sample (area_mm2, nuclei, wall_s, prompter_tiles, segmentor_tiles), or None.
    """

    path: str
    verdict: str
    reasons: tuple[str, ...] = ()
    reader: str | None = None
    vendor: str | None = None
    width: int | None = None
    height: int | None = None
    levels: int | None = None
    mpp: float | None = None
    mpp_source: str | None = None
    objective_power: float | None = None
    tissue_area_mm2: float | None = None
    tiles_prompter: int | None = None
    tiles_segmentor: int | None = None
    nuclei: int | None = None
    time_s: float | None = None
    peak_rss_mib: float | None = None
    sample: dict[str, float] | None = None
    origin: str | None = None
    output_name: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "reasons": list(self.reasons)}


@dataclass(frozen=True)
class LoadedModel:
    """The models of a check, loaded once (cached for the sample runs), and the seconds it took."""

    config: CheckConfig
    prompter: Any
    segmentor: Any
    load_s: float


def load_model(config: CheckConfig) -> LoadedModel:
    """Load the model a run would use (into the worker cache the pipeline reads) and warm it up
    with one run on a small synthetic image, so that first-call costs (lazy imports, kernel
    set-up) count once, as in a run, and not per sampled tile.  load_s: both, in seconds.

    Raises ValueError (one line naming the option) for an unknown model, a model without a
    prompter or a device that is not there, as `wsiseg run` does.
    """
    from wsiseg.pipeline import RunConfig, load_run_models, run_slide
    from wsiseg.scheduling import SchedulerConfig
    from wsiseg.synthetic import SyntheticSpec, write_png

    t = time.perf_counter()
    _, prompter, segmentor = load_run_models(
        RunConfig(model=config.model, prompter=config.prompter, device=config.device, tta=config.tta, precision=config.precision)
    )
    if prompter is not None:
        with tempfile.TemporaryDirectory(prefix="wsiseg-check-") as tmp:
            image = Path(tmp) / "warm-up.png"
            mpp = min(max(float(segmentor.mpp), 0.05), 10.0)
            write_png(image, SyntheticSpec(256, 256, mpp=mpp, tissue_fraction=1.0))
            warm = RunConfig(model=config.model, prompter=config.prompter, device=config.device, mpp=mpp, tissue_detection=False,
                             tta=config.tta, precision=config.precision,
                             scheduler=SchedulerConfig(scheduler="synchronous"))
            run_slide(image, Path(tmp) / "out", warm)
            _forget_slide(image)
    return LoadedModel(config, prompter, segmentor, time.perf_counter() - t)


def _forget_slide(path: Path) -> None:
    """Drop the pipeline's cached open slide for `path` (its worker cache keeps one per slide)."""
    from wsiseg.workers import WORKER_CACHE

    for key in [k for k in WORKER_CACHE if k[0] == "slide" and Path(k[1].path) == Path(path)]:
        WORKER_CACHE.pop(key, None)


def check_slide(entry: SlideEntry, model: LoadedModel, runner: Any) -> SlideCheck:
    """Check one slide (see the module docstring); never raises for a bad slide.

    runner: a synchronous `wsiseg.scheduling.Runner` for the sample run.  Reasons do not
    repeat the slide's path (it is in `path`).
    """
    from wsiseg.cohort import reason_without_slide

    result = _check_slide(entry, model, runner)
    return replace(result, reasons=tuple(reason_without_slide(r, entry.path) for r in result.reasons))


def _check_slide(entry: SlideEntry, model: LoadedModel, runner: Any) -> SlideCheck:
    from wsiseg.readers import SlideError, open_slide, require_mpp
    from wsiseg.readers.scaled import ScaledSlide
    from wsiseg.tissue import RoiError, tissue_for_slide

    config = model.config
    base = SlideCheck(str(entry.path), "unusable", origin=entry.origin, output_name=entry.output_name)
    override = entry.mpp if entry.mpp is not None else config.mpp
    try:
        reader = open_slide(entry.path, mpp=override)
    except (SlideError, ValueError, OSError) as exc:
        return replace(base, reasons=(_one_line(exc),))
    try:
        props = reader.properties
        base = replace(
            base, reader=props.reader, vendor=props.vendor, width=props.size_l0[0], height=props.size_l0[1],
            levels=len(props.level_dimensions), objective_power=props.objective_power,
        )
        try:
            mpp_xy = require_mpp(props, entry.path)
        except SlideError as exc:
            return replace(base, reasons=(_one_line(exc),))
        slide_mpp = float(np.mean(mpp_xy))
        if entry.mpp is not None:
            source = "manifest"
        else:
            source = "--mpp" if config.mpp is not None else _file_mpp_source(props)
        base = replace(base, mpp=slide_mpp, mpp_source=source)
        try:
            ScaledSlide(reader, model.segmentor.mpp)  # refuses non-square pixels
        except SlideError as exc:
            return replace(base, reasons=(_one_line(exc),))
        t = time.perf_counter()
        try:
            tissue = tissue_for_slide(reader, mpp_l0=slide_mpp, roi=entry.roi)  # as the run will
            tissue_s = time.perf_counter() - t
            thumb = _thumbnail_like(reader, tissue.mask.shape)
        except RoiError as exc:
            return replace(base, reasons=(_one_line(exc),))
        except Exception as exc:  # a corrupt thumbnail level is the slide's problem
            return replace(base, reasons=(f"reading the thumbnail failed: {_one_line(exc)}",))
        mm2_per_px = mpp_xy[0] * mpp_xy[1] / 1e6
        base = replace(base, tissue_area_mm2=round(tissue.area_l0 * mm2_per_px, 4))
        warnings = _resolution_warnings(slide_mpp, model.segmentor.mpp)
        if override is not None:
            warnings += _override_warnings(reader.properties.file_mpp, slide_mpp, source)
        if tissue.is_empty:
            warnings.append("no tissue detected, so a run finds no nuclei; run with --no-tissue-detection or --roi")
            return replace(base, verdict="warning", reasons=tuple(warnings), tiles_prompter=0, tiles_segmentor=0,
                           nuclei=0)
        return _sampled(entry, model, runner, reader, tissue, thumb, slide_mpp, mm2_per_px, tissue_s, base, warnings)
    finally:
        reader.close()


def _sampled(
    entry: SlideEntry, model: LoadedModel, runner: Any, reader: Any, tissue: Any, thumbnail: np.ndarray,
    slide_mpp: float, mm2_per_px: float, tissue_s: float, base: SlideCheck, warnings: list[str],
) -> SlideCheck:
    """Run the pipeline on the sample windows and extrapolate (module docstring)."""
    import shapely

    from wsiseg.pipeline import RunConfig, run_slide
    from wsiseg.readers.scaled import ScaledSlide
    from wsiseg.scheduling import SchedulerConfig

    config = model.config
    boxes = _sample_boxes(tissue, thumbnail, config.sample_side_um / slide_mpp, config.sample_windows)
    region = shapely.intersection(tissue.polygons_l0, boxes)  # what the run's tissue-within-roi will be
    sample_area_mm2 = float(region.area) * mm2_per_px
    bounds = reader.properties.bounds_l0
    if bounds:  # --roi files are in QuPath's frame: level 0 minus the slide's bounds origin
        region = shapely.transform(region, lambda xy: xy - np.array([bounds[0], bounds[1]], np.float64))
    override = entry.mpp if entry.mpp is not None else config.mpp
    with tempfile.TemporaryDirectory(prefix="wsiseg-check-") as tmp:
        roi_file = Path(tmp) / "sample.geojson"
        roi_file.write_text(json.dumps(shapely.geometry.mapping(region)))
        run_config = RunConfig(
            model=config.model, prompter=config.prompter, device=config.device, mpp=override, tissue_detection=False, roi=roi_file,
            tta=config.tta, precision=config.precision, scheduler=SchedulerConfig(scheduler="synchronous"),
        )
        try:
            with _PeakRss() as memory:
                t = time.perf_counter()
                result = run_slide(entry.path, Path(tmp) / "out", run_config, runner=runner)
                wall_s = time.perf_counter() - t
        except Exception as exc:  # the slide's own failure (a corrupt tile, ...): a run would fail too
            log.debug("%s: sample run failed", entry.path, exc_info=True)
            return replace(base, reasons=(f"a sample run failed: {_one_line(exc)}",))
        finally:
            _forget_slide(entry.path)
    report = result.report_data
    counts, timings = report["counts"], report["timings_s"]
    scaled = ScaledSlide(reader, model.segmentor.mpp)
    n_prompter, n_segmentor = _plan_tiles(scaled, tissue, model.prompter, counts, run_config)
    per_prompter = (timings["prompter"] + timings["merge"]) / max(counts["prompter_tiles"], 1)
    per_segmentor = timings["segmentor"] / counts["segmentor_tiles"] if counts["segmentor_tiles"] else 0.0
    fixed = model.load_s + timings["open"] + tissue_s + timings["write"] + max(wall_s - timings["total"], 0.0)
    time_s = fixed + per_prompter * n_prompter + per_segmentor * n_segmentor
    density = counts["nuclei"] / sample_area_mm2 if sample_area_mm2 > 0 else 0.0
    tissue_mm2 = base.tissue_area_mm2 or 0.0
    if counts["nuclei"] == 0:
        warnings.append("the sample windows of tissue hold no nuclei: check the stain and the mpp")
    peak_mib = memory.peak_bytes / 2**20
    available = _available_memory_bytes()
    if available is not None and memory.peak_bytes > MEMORY_WARNING_SHARE * available:
        warnings.append(
            f"a run needs about {peak_mib:.0f} MiB per process, more than {MEMORY_WARNING_SHARE:.0%} of the "
            f"{available / 2**20:.0f} MiB available now; use fewer --workers or free memory"
        )
    return replace(
        base, verdict="warning" if warnings else "ok", reasons=tuple(warnings), tiles_prompter=n_prompter,
        tiles_segmentor=n_segmentor, nuclei=int(round(density * tissue_mm2)), time_s=round(time_s, 1),
        peak_rss_mib=round(peak_mib, 1),
        sample={"area_mm2": round(sample_area_mm2, 5), "nuclei": counts["nuclei"], "wall_s": round(wall_s, 3),
                "prompter_tiles": counts["prompter_tiles"], "segmentor_tiles": counts["segmentor_tiles"]},
    )


def _sample_boxes(tissue: Any, thumbnail: np.ndarray, side_l0: float, count: int = SAMPLE_WINDOWS) -> Any:
    """Up to `count` squares of side_l0 level-0 px, kept inside the slide and not overlapping one
    another, over tissue of every kind: among the windows centred on tissue that tissue fills at
    least half as well as the best-filled window (so tissue margins are sampled too), the ones
    whose mean optical density over their tissue (a proxy for how many nuclei a window holds) lies
    nearest the 1/(2 count), 3/(2 count), ... quantiles of those windows' densities.  A stratified
    sample (Cochran, "Sampling Techniques", 1977, ch. 5): one window over full tissue, even the
    median one, is biased by the slide's denser or sparser parts (+45 % of the nuclei of `wsiseg
    demo`'s slide, whose tissue margin holds none); spreading the windows over the density's range
    and the tissue's margin is not (+7 %).  Nuclei are then counted per mm² of the windows' tissue.
    Returns a shapely (Multi)Polygon in level-0 px.

    thumbnail: (h, w, 3) uint8 RGB on the grid of `tissue.mask`.
    """
    import shapely
    from scipy import ndimage as ndi

    inside = tissue.mask.astype(np.float32)
    cells = max(1, int(round(side_l0 / tissue.downsample)))
    cover = ndi.uniform_filter(inside, size=cells, mode="constant")
    # optical density summed over R, G, B: Beer-Lambert, as in Ruifrok & Johnston (2001)
    od = -np.log((thumbnail.astype(np.float32) + 1.0) / 256.0).sum(axis=2)
    od_mean = ndi.uniform_filter(od * inside, size=cells, mode="constant") / np.maximum(cover, 1e-6)
    candidates = np.flatnonzero((inside.ravel() > 0) & (cover.ravel() >= 0.5 * cover.max()))
    if candidates.size == 0:  # tissue (an roi) smaller than one thumbnail pixel: the best-covered windows
        candidates = np.flatnonzero(cover.ravel() >= cover.max())
    values = od_mean.ravel()[candidates]
    rows, cols = np.unravel_index(candidates, cover.shape)
    width, height = tissue.size_l0
    side = min(side_l0, width, height)
    chosen: list[tuple[int, int]] = []
    for target in np.quantile(values, (np.arange(count) + 0.5) / count):
        for i in np.argsort(np.abs(values - target), kind="stable"):
            row, col = int(rows[i]), int(cols[i])
            if all(max(abs(row - r), abs(col - c)) >= cells for r, c in chosen):
                chosen.append((row, col))
                break
    boxes = []
    for row, col in chosen:
        x0 = min(max((col + 0.5) * tissue.downsample - side / 2, 0.0), width - side)
        y0 = min(max((row + 0.5) * tissue.downsample - side / 2, 0.0), height - side)
        boxes.append(shapely.box(x0, y0, x0 + side, y0 + side))
    return shapely.union_all(boxes)


def _thumbnail_like(reader: Any, shape: tuple[int, ...]) -> np.ndarray:
    """A small RGB thumbnail resized to `shape` (h, w): the tissue raster's grid."""
    import cv2

    thumb, _ = reader.thumbnail(DENSITY_THUMBNAIL_PX)
    resized: np.ndarray = cv2.resize(thumb, (int(shape[1]), int(shape[0])), interpolation=cv2.INTER_LINEAR)
    return resized


def _plan_tiles(scaled: Any, tissue: Any, prompter: Any, counts: dict[str, int], run_config: Any) -> tuple[int, int]:
    """(prompter tiles, segmentor tiles) a run plans over the tissue, on the pipeline's own
    grids (tile size and halo as the sample run recorded them)."""
    from wsiseg.pipeline import prompter_overlap, tile_in_tissue
    from wsiseg.tiling import plan_prompter_tiles, plan_segmentor_tiles

    width, height = scaled.size_px
    tile_px, halo_px = counts["tile_px"], counts["halo_px"]
    n_prompter = 0
    if prompter is not None:
        pplan = plan_prompter_tiles(width, height, tile_px, prompter_overlap(run_config, prompter, tile_px))
        n_prompter = sum(tile_in_tissue(pplan.tile(i), tissue, scaled) for i in range(pplan.count))
    splan = plan_segmentor_tiles(width, height, tile_px, halo_px)
    (sx, sy), block = scaled.scale_xy, splan.stride_px
    n_segmentor = 0
    for i in range(splan.count):
        t = splan.tile(i)  # the block a segmentor tile owns (finite, unlike a prompter core)
        x0, y0 = t.col * block * sx, t.row * block * sy
        n_segmentor += tissue.intersects_box_l0(x0, y0, x0 + block * sx, y0 + block * sy)
    return n_prompter, n_segmentor


def _override_warnings(own_xy: tuple[float, float] | None, mpp: float, source: str) -> list[str]:
    """`wsiseg.readers.resolution.override_warning` for `source`'s mpp ("--mpp" or "manifest")
    against the file's own (own_xy, `SlideProperties.file_mpp`), as a list."""
    from wsiseg.readers.resolution import override_warning

    warning = override_warning(mpp, own_xy, "--mpp" if source == "--mpp" else "the manifest's mpp")
    return [warning] if warning else []


def _resolution_warnings(slide_mpp: float, model_mpp: float) -> list[str]:
    from wsiseg.readers.resolution import upsampling_warning

    warning = upsampling_warning(slide_mpp, model_mpp)
    return [warning] if warning else []


def _file_mpp_source(props: Any) -> str:
    """Which metadata key the file's mpp most likely came from (the readers' order)."""
    extra = getattr(props, "extra", {}) or {}
    for key in ("aperio.MPP", "openslide.mpp-x", "tiffslide.mpp-x", "tiff.XResolution"):
        if key in extra:
            return key
    return "file metadata"


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _available_memory_bytes() -> int | None:
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except Exception:
        return None


class _PeakRss:
    """Peak resident memory (bytes) of this process while the block runs: psutil samples every
    10 ms, and getrusage's high-water mark when the block raised it (then it is exact)."""

    def __init__(self) -> None:
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._process: Any = None

    def __enter__(self) -> _PeakRss:
        try:
            import psutil

            self._process = psutil.Process()
        except Exception:  # without psutil, getrusage alone
            self._process = None
        self._start_maxrss = _maxrss_bytes()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._read()
        end = _maxrss_bytes()
        if end > self._start_maxrss:
            self.peak_bytes = max(self.peak_bytes, end)

    def _read(self) -> None:
        if self._process is not None:
            self.peak_bytes = max(self.peak_bytes, int(self._process.memory_info().rss))

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            self._read()


def _maxrss_bytes() -> int:
    """The process's peak resident memory so far, in bytes (0 where getrusage is missing)."""
    try:
        import resource
    except ImportError:  # Windows
        return 0
    # ru_maxrss is KiB on Linux, bytes on macOS (getrusage(2), macOS man page)
    value = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(value) if sys.platform == "darwin" else int(value) * 1024
