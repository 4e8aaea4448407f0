"""The tasks a slide's tiles go through, wherever the Runner puts them (`wsiseg.pipeline` chains them).

Prompter: `read_tiles` -> `predict_points`.  Segmentor: `read_tiles` -> `segment` -> `stitch`.
Each takes (batch, slide_spec, model_spec) and opens the slide and models once per worker
process (`wsiseg.workers.WORKER_CACHE`); tiles are in the working frame, the nuclei they
return in level 0.  With a map store (`wsiseg.map_store`) the prompter keeps its maps and the
segmentor reads them instead of running the network again.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from wsiseg.models.protocols import PointSet
from wsiseg.nuclei import NucleusTable
from wsiseg.workers import BAD_TILES_KEY, WORKER_CACHE, ModelSpec, SlideSpec

#: Smaller remnants (e.g. a prompt whose mask lost every pixel but a few to a neighbour) are dropped.
MIN_NUCLEUS_AREA_UM2 = 4.0


def read_tiles(tiles: Sequence[Any], slide_spec: SlideSpec, model_spec: ModelSpec) -> dict[str, Any]:
    """Stage 1 (CPU): the batch's tile pixels.  `tiles` are TileSpecs or SegmentorJobs."""
    t0 = time.perf_counter()
    slide = slide_spec.open()
    specs = [getattr(t, "tile", t) for t in tiles]
    images = np.stack([read_mirrored(slide, s.x0, s.y0, s.size) for s in specs])
    times: dict[str, Any] = {"read": time.perf_counter() - t0}
    take_bad = getattr(slide.reader, "take_bad_tiles", None)
    bad = take_bad() if take_bad is not None else []
    if bad:  # tiles read as background (--on-bad-tile skip) travel with the times to the report
        times[BAD_TILES_KEY] = [b.as_dict() for b in bad]
    return {"items": list(tiles), "images": images, "times": times}


def read_mirrored(slide: Any, x0: int, y0: int, size: int) -> np.ndarray:
    """A size x size tile of the working frame at (x0, y0); beyond the image's edges the image
    is mirrored (symmetric about each edge), so a model sees no artificial border where tissue
    is cut by the image edge, and a pixel's value never depends on which tile reads it."""
    width, height = slide.size_px
    ax0, ay0 = max(x0, 0), max(y0, 0)
    ax1, ay1 = min(x0 + size, width), min(y0 + size, height)
    if ax1 <= ax0 or ay1 <= ay0:
        return np.full((size, size, 3), 255, np.uint8)
    inside = slide.read(ax0, ay0, ax1 - ax0, ay1 - ay0)
    pad = ((ay0 - y0, y0 + size - ay1), (ax0 - x0, x0 + size - ax1), (0, 0))
    return np.pad(inside, pad, mode="symmetric") if any(p for p in pad[0] + pad[1]) else np.ascontiguousarray(inside)


def predict_points(
    batch: dict[str, Any], slide_spec: SlideSpec, model_spec: ModelSpec, map_store: Path | None = None
) -> tuple[PointSet, dict]:
    """Stage 2 of the prompter (model): points owned by each tile, in the working frame; with a
    map store, each tile's core maps are stored for the segmentor (`wsiseg.map_store`)."""
    t0 = time.perf_counter()
    prompter, _ = model_spec.load()
    assert prompter is not None
    if map_store is None:
        found = prompter.predict_points(batch["images"])
    else:
        found, maps = prompter.predict_points_and_maps(batch["images"])
        store = open_map_store(map_store)
        for t, m in zip(batch["items"], maps):
            store.write_core(t, m)
    out = []
    for t, pts in zip(batch["items"], found):
        pts = PointSet(pts.xy + np.array([t.x0, t.y0], np.float32), pts.score, pts.class_id)
        out.append(pts.take(t.owns(pts.xy)))
    return PointSet.concat(out), {**batch["times"], "model": time.perf_counter() - t0}


def segment(
    batch: dict[str, Any], slide_spec: SlideSpec, model_spec: ModelSpec, map_store: Path | None = None
) -> dict[str, Any]:
    """Stage 2 of the segmentor (model): one mask per prompt of every tile; with a map store,
    from the prompter's stored maps instead of a second network pass."""
    t0 = time.perf_counter()
    _, segmentor = model_spec.load()
    prompts = [j.prompts for j in batch["items"]]
    if map_store is None:
        masks = segmentor.segment_tiles(batch["images"], prompts)
    else:
        store = open_map_store(map_store)
        maps = np.stack([store.read(j.tile.x0, j.tile.y0, j.tile.size) for j in batch["items"]])
        masks = segmentor.segment_maps(maps, prompts)
    return {**batch, "masks": masks, "times": {**batch["times"], "model": time.perf_counter() - t0}}


def stitch(batch: dict[str, Any], slide_spec: SlideSpec, model_spec: ModelSpec) -> tuple[NucleusTable, dict]:
    """Stage 3 (CPU): finished level-0 nuclei owned by the batch's segmentor tiles."""
    from wsiseg.stitching import FrameTransform, TileInput, batch_outlines, finish_nuclei

    t0, c0 = time.perf_counter(), time.thread_time()
    slide = slide_spec.open()
    transform = FrameTransform(scale=slide.scale_xy, mpp=slide.mpp, clip_l0=clip_box(slide.reader.properties))
    min_area = max(1, int(MIN_NUCLEUS_AREA_UM2 / (slide.mpp * slide.mpp)))
    tiles = [
        TileInput((job.tile.x0, job.tile.y0), tile_masks, job.n_owned, job.prompt_ids, job.score, job.class_id)
        for job, tile_masks in zip(batch["items"], batch["masks"])
    ]
    outlines = batch_outlines(tiles, batch["images"], min_area_px=min_area, image_size_px=slide.size_px)
    table = finish_nuclei([outlines], transform)  # the batch's polygons and measurements at once
    times = {**batch["times"], "post": time.perf_counter() - t0, "post_cpu": time.thread_time() - c0}
    return table, times


def clip_box(props: Any) -> tuple[float, float, float, float]:
    """The level-0 box nuclei must lie in: the slide, cut to its bounds box when it has one."""
    w, h = props.size_l0
    if props.bounds_l0 is None:
        return (0.0, 0.0, float(w), float(h))
    bx, by, bw, bh = props.bounds_l0
    return (float(max(bx, 0)), float(max(by, 0)), float(min(bx + bw, w)), float(min(by + bh, h)))


def open_map_store(path: Path) -> Any:
    """The worker's handle on a slide's map store (opened once per worker)."""
    from wsiseg.map_store import MapStore

    key = ("map_store", str(path))
    if key not in WORKER_CACHE:
        WORKER_CACHE[key] = MapStore.open(path)
    return WORKER_CACHE[key]
