"""The steps of the GPU benchmark (`gpu.py`), run in its child process: one network on a fixed
number of tiles (model steps), or `run_slide` on a square of the region (pipeline steps), and
the helpers that measure them (CUDA events around model calls, NVML sampling).

Each step returns a flat dict of figures; see gpu.py's docstring for what they mean.
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

#: the slide the projection is for: level-0 px, tissue share, µm per px
SLIDE_PX = (100_000, 80_000)
SLIDE_TISSUE_FRACTION = 0.4
#: SAM at 40x as PromptNucSeg runs it on Kumar/CPM: K = 1 negative, each prompt decoded with and without it
SAM_K_NEGATIVES = 1
SAM_MAX_NUCLEUS_PX = 48  # 12 µm at 0.25 µm/px: the segmentor's halo
SAM_INPUT_PX = 256


@dataclass(frozen=True)
class Settings:
    """How much work each step does.  Sizes in level-0 px of the region (0.25 µm/px)."""

    size_px: int = 8192
    mpp: float = 0.25
    sam_variant: str = "vit_b"
    tiny_batch: int = 8  # tiles (the model's own size) per network call
    tiny_batches: int = 12
    sam_batch: int = 64  # 256 px tiles per segment_tiles call
    sam_batches: int = 8
    distinct_tiles: int = 64
    batch_tiles: int = 8  # pipeline tiles per task (the CLI's default)
    tiny_tile_px: int | None = None  # wsiseg-tiny's model-step tile (None: the model's own, 1024)
    tiny_roi_px: int = 8192
    sam_roi_px: int = 4096
    warmup_roi_px: int = 1024  # 0: no warm-up run
    budget_s: float = 420.0

    def __post_init__(self) -> None:
        if self.size_px < 256 or min(self.tiny_batch, self.tiny_batches, self.sam_batch, self.sam_batches) < 1:
            raise ValueError(f"--size must be >= 256 px and every batch setting >= 1, got {self}")
        if self.budget_s <= 0:
            raise ValueError(f"--budget-s must be > 0, got {self.budget_s}")


#: --tiny: the code paths in seconds (a toy SAM, a 512 px region, one small batch per step, no warm-up run)
TINY = Settings(size_px=512, sam_variant="vit_test", tiny_batch=1, tiny_batches=1, sam_batch=2, sam_batches=1,
                distinct_tiles=2, tiny_tile_px=256, tiny_roi_px=512, sam_roi_px=256, warmup_roi_px=0, budget_s=300.0)


@dataclass
class StepContext:
    """What the steps share in the child process (the slide's nuclei and the SAM bundle, made once)."""

    device: str
    slide: Path
    settings: Settings
    work: Path
    _truth: Any = None
    _sam_bundle: Path | None = None

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"

    def truth(self) -> Any:
        """The region's nuclei (`wsiseg.synthetic.SyntheticTruth`, level-0 px)."""
        if self._truth is None:
            from common import synthetic_spec
            from wsiseg.synthetic import make_nuclei

            s = self.settings
            self._truth = make_nuclei(synthetic_spec(s.size_px, mpp=s.mpp, tissue_fraction=1.0, tissue_pieces=1))
        return self._truth

    def sam_bundle(self) -> Path:
        """A bundle of an untrained SAM segmentor with wsiseg-tiny's prompter network, at the region's mpp."""
        if self._sam_bundle is None:
            self._sam_bundle = _write_sam_bundle(self.work / "sam-bundle", self.settings)
        return self._sam_bundle


def run_steps(plan: dict[str, Any], tag: str) -> int:
    """Run plan["steps"] in order, printing `tag` + one JSON result per step; a step whose
    estimate exceeds the time left before plan["deadline"] is skipped, saying so."""
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    ctx = StepContext(plan["device"], Path(plan["slide"]), Settings(**plan["settings"]), Path(plan["work"]))
    for step in plan["steps"]:
        left = plan["deadline"] - time.time()
        if step["estimate_s"] > left:
            reason = f"time budget: {max(left, 0):.0f} s left, the step takes about {step['estimate_s']:.0f} s"
            result = {**step, "status": "skipped", "reason": reason}
        else:
            result = _run_step(step, ctx)
        print(tag + json.dumps(result), flush=True)
    return 0


def _run_step(step: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    import gc

    import torch

    try:
        figures = _model_step(step, ctx) if step["kind"] == "model" else _pipeline_step(step, ctx)
        return {**step, "status": "done", **figures}
    except Exception as exc:  # noqa: BLE001 - one failed step is reported; the others still run
        return {**step, "status": "failed", "reason": f"{type(exc).__name__}: {' '.join(str(exc).split())[:400]}"}
    finally:
        gc.collect()
        if ctx.cuda:
            torch.cuda.empty_cache()


def _model_step(step: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    """One network on `batches` x `batch` tiles of the region, after one warm-up batch."""
    import torch

    timer = CallTimer(ctx.cuda)
    t = time.perf_counter()
    net = (TinyNetworks if step["model"] == "wsiseg-tiny" else SamNetwork)(ctx, step["mode"], timer)
    load_s = time.perf_counter() - t
    tiles, prompts = net.inputs()

    def batch(b: int) -> tuple[Any, list[Any]]:
        index = [(b * net.batch + i) % len(tiles) for i in range(net.batch)]
        return tiles[index], [prompts[i] for i in index]

    if ctx.cuda:
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    net.run(*batch(0))  # compiles, picks kernels
    _sync(ctx.cuda)
    warmup_s = time.perf_counter() - t
    timer.reset()
    n_prompts = n_nuclei = 0
    with NvmlSampler(1 if ctx.cuda else 0) as nvml:
        t = time.perf_counter()
        for b in range(net.batches):
            p, n = net.run(*batch(b))
            n_prompts, n_nuclei = n_prompts + p, n_nuclei + n
        _sync(ctx.cuda)
        wall = time.perf_counter() - t
    n_tiles = net.batches * net.batch
    slide_tiles = net.slide_tiles()
    return {
        "tiles": n_tiles, "tile_px": net.tile_px, "model_mpp": net.mpp, "prompts": n_prompts, "nuclei": n_nuclei,
        "load_s": round(load_s, 3), "warmup_s": round(warmup_s, 3), "wall_s": round(wall, 4),
        "tiles_per_s": round(n_tiles / wall, 2), "prompts_per_s": round(n_prompts / wall, 1),
        "nuclei_per_s": round(n_nuclei / wall, 1),
        "gpu_busy_fraction": round(min(1.0, timer.total_s() / wall), 4),
        "busy_source": "cuda-events" if ctx.cuda else "cpu-timer",
        "gpu_busy_nvml": nvml.busy_fraction(),
        "peak_memory_mb": round(torch.cuda.max_memory_allocated() / 2**20 if ctx.cuda else _rss_mb(), 1),
        "memory_source": "torch.cuda.max_memory_allocated" if ctx.cuda else "host-rss",
        "slide_tiles": slide_tiles,
        "projected_slide_s": round(slide_tiles * wall / n_tiles, 1),
        **net.details(),
    }


class TinyNetworks:
    """wsiseg-tiny as the pipeline runs it: the prompter's network and points, then the
    segmentor's watershed on the same maps (one network pass per tile of the model's own size and
    resolution: 1024 px at 0.25 µm/px)."""

    def __init__(self, ctx: StepContext, mode: str, timer: CallTimer) -> None:
        import torch
        from wsiseg.models import load_prompter, load_segmentor

        precision = "fp32" if mode == "fp32" else "bf16"
        self.ctx = ctx
        self.prompter: Any = load_prompter("wsiseg-tiny", device=ctx.device, precision=precision)
        self.segmentor: Any = load_segmentor("wsiseg-tiny", device=ctx.device)
        net = self.prompter.net
        net.settings = replace(net.settings, batch=ctx.settings.tiny_batch)  # one network call per batch
        if mode == "compile":
            net.network = torch.compile(net.network)
        net.network = timer.wrap(net.network)
        self.mpp = float(self.prompter.mpp)
        self.tile_px = int(ctx.settings.tiny_tile_px or self.segmentor.preferred_tile_px)
        self.batch, self.batches = ctx.settings.tiny_batch, ctx.settings.tiny_batches

    def inputs(self) -> tuple[Any, list[Any]]:
        tiles, _, _ = read_tiles(self.ctx, self.mpp, self.tile_px)
        return tiles, [None] * len(tiles)

    def run(self, tiles: Any, _prompts: list[Any]) -> tuple[int, int]:
        points, maps = self.prompter.predict_points_and_maps(tiles)
        seg = self.segmentor
        batches = [prompt_batch(p.xy, seg.k_negatives, seg.max_nucleus_diameter_px) for p in points]
        masks = seg.segment_maps(maps, batches)
        return sum(len(b) for b in batches), sum(_nonempty(m) for m in masks)

    def slide_tiles(self) -> int:
        # the prompter's overlap as wsiseg.pipeline.prompter_overlap sets it (--overlap 64)
        overlap = min(max(64, 2 * int(self.prompter.context_px)), self.tile_px // 4 * 2)
        return _slide_tiles(self.ctx.settings, self.mpp, self.tile_px, overlap_px=overlap)

    def details(self) -> dict[str, Any]:
        return {"precision": self.prompter.net.precision}


class SamNetwork:
    """SAM (random weights) as the segmentor: the encoder once per 256 px tile at the region's
    mpp, the mask decoder once per prompt, with and without its negative."""

    def __init__(self, ctx: StepContext, mode: str, timer: CallTimer) -> None:
        from wsiseg.models.sam import SamSegmentor

        s = ctx.settings
        self.ctx = ctx
        self.segmentor: Any = SamSegmentor.from_architecture(
            s.sam_variant, input_size=SAM_INPUT_PX, device=ctx.device, mpp=s.mpp,
            max_nucleus_diameter_px=SAM_MAX_NUCLEUS_PX, k_negatives=SAM_K_NEGATIVES, negatives_mode="best_of_both",
            bf16=mode != "fp32", compile=mode == "compile",
        )
        seg = self.segmentor
        # instrumentation: SamSegmentor calls its (possibly compiled) encoder and the model's decode
        seg._encoder = timer.wrap(seg._encoder)
        seg.model.decode = timer.wrap(seg.model.decode)
        self.mpp, self.tile_px = s.mpp, SAM_INPUT_PX
        self.batch, self.batches = s.sam_batch, s.sam_batches

    def inputs(self) -> tuple[Any, list[Any]]:
        """Tiles and their prompts: the known nucleus centres in each tile."""
        tiles, origins, scale = read_tiles(self.ctx, self.mpp, self.tile_px)
        centres = self.ctx.truth().centers_l0 / scale
        prompts = []
        for x0, y0 in origins:
            rel = centres - (x0, y0)
            inside = ((rel >= 0) & (rel < self.tile_px)).all(axis=1)
            prompts.append(prompt_batch(rel[inside], SAM_K_NEGATIVES, SAM_MAX_NUCLEUS_PX))
        return tiles, prompts

    def run(self, tiles: Any, prompts: list[Any]) -> tuple[int, int]:
        masks = self.segmentor.segment_tiles(tiles, prompts)
        return sum(len(p) for p in prompts), sum(_nonempty(m) for m in masks)

    def slide_tiles(self) -> int:
        halo = max(64 // 2, SAM_MAX_NUCLEUS_PX)  # the pipeline's halo with --overlap 64
        return _slide_tiles(self.ctx.settings, self.mpp, self.tile_px, halo_px=halo)

    def details(self) -> dict[str, Any]:
        seg = self.segmentor
        return {"bf16": seg.bf16, "encoder_batch": seg.encoder_batch_size, "decoder_batch": seg.decoder_batch_size}


def _pipeline_step(step: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    """run_slide on a square of the region (after a warm-up run on the same cluster)."""
    import shutil

    from common import pipeline_figures
    from wsiseg.pipeline import RunConfig, run_slide
    from wsiseg.scheduling import Runner, SchedulerConfig

    s, gpus = ctx.settings, int(step["gpus"])
    tiny = step["model"] == "wsiseg-tiny"
    model = "wsiseg-tiny" if tiny else str(ctx.sam_bundle())
    roi_px = min(s.tiny_roi_px if tiny else s.sam_roi_px, s.size_px)
    if gpus:
        sched = SchedulerConfig(gpus=gpus, workers=max(1, (os.cpu_count() or 2) - gpus))
    else:
        sched = SchedulerConfig(scheduler="synchronous")
    out = ctx.work / step["id"].replace(":", "-").replace("=", "")
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    config = RunConfig(model=model, device=ctx.device, batch_tiles=s.batch_tiles, scheduler=sched)
    t = time.perf_counter()
    with Runner(sched) as runner:
        start_s = time.perf_counter() - t
        t = time.perf_counter()
        if s.warmup_roi_px:  # loads the models in the workers, runs the first kernels
            warmup_roi = _square_roi(out / "warmup-roi.geojson", min(s.warmup_roi_px, roi_px))
            run_slide(ctx.slide, out, replace(config, roi=warmup_roi), runner=runner, output_name="warmup")
        warmup_s = time.perf_counter() - t
        roi = _square_roi(out / "roi.geojson", roi_px)
        with NvmlSampler(gpus if ctx.cuda else 0) as nvml:
            t = time.perf_counter()
            result = run_slide(ctx.slide, out, replace(config, roi=roi), runner=runner, output_name="run")
            wall = time.perf_counter() - t
        workers = runner.n_workers
    figures = pipeline_figures(result.report_data, wall)
    busy, busy_source = nvml.busy_fraction(), "nvml"
    if busy is None:  # the model tasks' share of the GPU workers' (or the one process's) time
        busy, busy_source = round(figures["task_s"].get("model", 0.0) / (wall * max(gpus, 1)), 4), "task-times"
    memory, memory_source = nvml.peak_memory_mb(), "nvml (all processes, above the step's start)"
    if memory is None:
        memory, memory_source = (None, "unavailable (no NVML)") if ctx.cuda else (round(_rss_mb(), 1), "host-rss")
    area_ratio = SLIDE_PX[0] * SLIDE_PX[1] * SLIDE_TISSUE_FRACTION / roi_px**2
    return {
        "roi_px": roi_px, "workers": workers, "batch_tiles": s.batch_tiles,
        "cluster_start_s": round(start_s, 2), "warmup_s": round(warmup_s, 2), **figures,
        "gpu_busy_fraction": busy, "busy_source": busy_source, "peak_memory_mb": memory, "memory_source": memory_source,
        "projected_slide_s": round(start_s + warmup_s + wall * area_ratio, 1),
    }


# --------------------------------------------------------------------------- measuring helpers


class CallTimer:
    """Time spent inside wrapped model calls.

    CUDA: an event recorded on the current stream before and after each call; a call's time is
    the span from its first kernel to its last (read once, at `total_s`).  CPU: the call's wall time.
    """

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self._events: list[tuple[Any, Any]] = []
        self._cpu_s = 0.0

    def wrap(self, fn: Any) -> Any:
        def timed(*args: Any, **kwargs: Any) -> Any:
            if not self.cuda:
                t = time.perf_counter()
                try:
                    return fn(*args, **kwargs)
                finally:
                    self._cpu_s += time.perf_counter() - t
            import torch

            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn(*args, **kwargs)
            end.record()
            self._events.append((start, end))
            return out

        return timed

    def reset(self) -> None:
        self._events, self._cpu_s = [], 0.0

    def total_s(self) -> float:
        if not self.cuda:
            return self._cpu_s
        import torch

        torch.cuda.synchronize()
        return sum(a.elapsed_time(b) for a, b in self._events) / 1000.0


class NvmlSampler:
    """GPU utilisation and memory in use on the first `count` GPUs, sampled by NVML every
    `period_s` in a thread (every process on the device counts: Dask's GPU workers too).
    Without NVML (no pynvml, no driver, count 0) both figures are None."""

    def __init__(self, count: int, period_s: float = 0.05) -> None:
        self.count, self.period_s = count, period_s
        self._handles: list[Any] = []
        self._util: list[list[int]] = []
        self._base: list[int] = []
        self._peak: list[int] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._nvml: Any = None

    def __enter__(self) -> NvmlSampler:
        if self.count:
            try:
                import pynvml

                pynvml.nvmlInit()
                self._nvml = pynvml
                self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in _physical_gpus(self.count)]
                self._base = [pynvml.nvmlDeviceGetMemoryInfo(h).used for h in self._handles]
            except Exception:  # noqa: BLE001 - no NVML here: the figures come from elsewhere
                self._handles, self._base = [], []
        if self._handles:
            self._util, self._peak = [[] for _ in self._handles], list(self._base)
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while True:
            try:
                for i, h in enumerate(self._handles):
                    self._util[i].append(self._nvml.nvmlDeviceGetUtilizationRates(h).gpu)
                    self._peak[i] = max(self._peak[i], self._nvml.nvmlDeviceGetMemoryInfo(h).used)
            except Exception:  # noqa: BLE001 - a device that stops answering ends the sampling
                return
            if self._stop.wait(self.period_s):
                return

    def __exit__(self, *exc: object) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
        if self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except Exception:  # noqa: BLE001 - nothing to release
                pass

    def busy_fraction(self) -> float | None:
        """Mean utilisation (kernels running) over the samples and GPUs, 0-1."""
        if not self._util or not all(self._util):
            return None
        return round(sum(sum(u) / len(u) for u in self._util) / len(self._util) / 100.0, 4)

    def peak_memory_mb(self) -> float | None:
        """Largest rise of memory in use on any GPU during the block, MiB."""
        if not self._peak:
            return None
        return round(max(p - b for p, b in zip(self._peak, self._base)) / 2**20, 1)


def _physical_gpus(count: int) -> list[int]:
    """NVML indices of the first `count` GPUs torch sees (CUDA_VISIBLE_DEVICES, when numeric)."""
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    if visible and all(v.isdigit() for v in visible):
        return [int(v) for v in visible[:count]]
    return list(range(count))


def read_tiles(ctx: StepContext, mpp: float, tile_px: int) -> tuple[Any, list[tuple[int, int]], float]:
    """Up to `distinct_tiles` tiles of the region at `mpp`, row-major: (n, tile_px, tile_px, 3)
    uint8 (a frame smaller than a tile is mirrored to fill it), their origins (working px) and
    the working frame's scale (level-0 px per working px)."""
    import numpy as np
    from wsiseg.readers import open_slide
    from wsiseg.readers.scaled import ScaledSlide

    reader = open_slide(ctx.slide)
    try:
        scaled = ScaledSlide(reader, mpp)
        w, h = scaled.size_px
        origins = [(x, y) for y in range(0, h, tile_px) for x in range(0, w, tile_px)][: ctx.settings.distinct_tiles]
        tiles = []
        for x, y in origins:
            inside = scaled.read(x, y, min(tile_px, w - x), min(tile_px, h - y))
            pad = ((0, tile_px - inside.shape[0]), (0, tile_px - inside.shape[1]), (0, 0))
            tiles.append(np.pad(inside, pad, mode="symmetric"))
        return np.stack(tiles), origins, float(scaled.scale)
    finally:
        reader.close()


def prompt_batch(xy: Any, k: int, reach_px: float) -> Any:
    """A PromptBatch for points (n, 2) in tile px: each point positive, its k nearest others
    within reach_px negative (padding where there are fewer)."""
    import numpy as np
    from wsiseg.models.protocols import PromptBatch
    from wsiseg.prompts import nearest_negatives

    xy = np.asarray(xy, np.float64).reshape(-1, 2)
    neg = nearest_negatives(xy, k, reach_px)
    points = np.zeros((len(xy), 1 + k, 2), np.float32)
    labels = np.full((len(xy), 1 + k), -1, np.int8)
    points[:, 0], labels[:, 0] = xy, 1
    has = neg >= 0
    points[:, 1:][has] = xy[neg[has]]
    labels[:, 1:][has] = 0
    return PromptBatch(points, labels)


def _nonempty(masks: Any) -> int:
    box = masks.bbox_px
    return int(((box[:, 2] > box[:, 0]) & (box[:, 3] > box[:, 1])).sum())


def _slide_tiles(
    s: Settings, model_mpp: float, tile_px: int, *, overlap_px: int = 0, halo_px: int | None = None
) -> int:
    """Tiles of the projected slide's tissue at model_mpp: prompter tiles, or segmentor tiles given halo_px."""
    import math

    from wsiseg.tiling import plan_prompter_tiles, plan_segmentor_tiles

    w, h = (math.ceil(n * s.mpp / model_mpp) for n in SLIDE_PX)
    if halo_px is None:
        plan = plan_prompter_tiles(w, h, tile_px, overlap_px)
    else:
        plan = plan_segmentor_tiles(w, h, tile_px, halo_px)
    return round(plan.count * SLIDE_TISSUE_FRACTION)


def _square_roi(path: Path, side_px: int) -> Path:
    """A GeoJSON region: the square [0, side_px)² of the region (level-0 px; the slide has no bounds offset)."""
    ring = [[0, 0], [side_px, 0], [side_px, side_px], [0, side_px], [0, 0]]
    feature = {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]}, "properties": {}}
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [feature]}))
    return path


def _write_sam_bundle(folder: Path, s: Settings) -> Path:
    """Untrained SAM `s.sam_variant` segmentor + wsiseg-tiny's prompter network, at s.mpp: a speed
    stand-in for PromptNucSeg at 40x (its masks and counts are meaningless)."""
    import torch
    from wsiseg.models import open_bundle, resolve_model, write_bundle
    from wsiseg.models.sam.build import SAM_PIXEL_MEAN, SAM_PIXEL_STD, build_sam

    tiny = open_bundle(resolve_model("wsiseg-tiny"))
    prompter = tiny.component("prompter")
    torch.manual_seed(0)
    sam = build_sam(s.sam_variant, input_size=SAM_INPUT_PX)
    manifest = {
        "name": f"untrained-sam-{s.sam_variant}",
        "version": "0.0",
        "description": "speed stand-in: untrained SAM segmentor with wsiseg-tiny's prompter network",
        "mpp": s.mpp,
        "input_size": SAM_INPUT_PX,
        "normalisation": {"mean": list(SAM_PIXEL_MEAN), "std": list(SAM_PIXEL_STD)},
        "k_negatives": SAM_K_NEGATIVES,
        "nms_radius_px": tiny.manifest.nms_radius_px * tiny.manifest.mpp / s.mpp,  # the same µm
        "max_nucleus_diameter_px": SAM_MAX_NUCLEUS_PX,
        "components": {
            "prompter": {"architecture": prompter.architecture, "config": dict(prompter.config)},
            "segmentor": {
                "architecture": "sam", "config": {"variant": s.sam_variant, "negatives_mode": "best_of_both"}
            },
        },
    }
    write_bundle(folder, manifest, {"prompter": tiny.load_weights("prompter"), "segmentor": sam.state_dict()})
    return folder


def _sync(cuda: bool) -> None:
    if cuda:
        import torch

        torch.cuda.synchronize()


def _rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
