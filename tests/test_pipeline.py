"""End to end on synthetic slides with nuclei at known positions: found once, whole, and the
same whatever the tiling or scheduling."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import shapely
from scipy.spatial import cKDTree

from wsiseg.pipeline import RunConfig, run_slide
from wsiseg.readers.base import MissingMppError
from wsiseg.scheduling import Runner, SchedulerConfig
from wsiseg.synthetic import SyntheticSpec, truth_mask
from wsiseg.writers.zarr_store import open_nuclei

SYNC = SchedulerConfig(scheduler="synchronous")


def _config(**kw: Any) -> RunConfig:
    kw.setdefault("scheduler", SYNC)
    kw.setdefault("model", "classical")  # these rules are exact for the weight-free model
    return RunConfig(**kw)


def _polygon_set(zarr_path: Path) -> set[bytes]:
    table = open_nuclei(zarr_path).table()
    return {shapely.to_wkb(shapely.normalize(p)) for p in table.polygons()}


@pytest.fixture(scope="module")
def small_slide(make_slide: Any) -> tuple[Path, Any, SyntheticSpec]:
    spec = SyntheticSpec(width=1100, height=900, mpp=0.5, seed=7, tissue_fraction=0.8, touching_fraction=0.1)
    path, truth = make_slide(spec, "svs", compression="deflate")
    return path, truth, spec


@pytest.fixture(scope="module")
def baseline(small_slide: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    out = tmp_path_factory.mktemp("baseline")
    return run_slide(small_slide[0], out, _config())


def test_known_nuclei_are_found_once_each(small_slide: Any, baseline: Any) -> None:
    _, truth, spec = small_slide
    table = open_nuclei(baseline.zarr).table()
    assert len(table) == baseline.n_nuclei > 100
    # Each true nucleus: is exactly one detection's polygon covering its centre?
    polys = table.polygons()
    tree = shapely.STRtree(polys)
    centres = shapely.points(truth.centers_l0)
    pairs = tree.query(centres, predicate="within")
    hits = np.bincount(pairs[0], minlength=len(truth))
    recall = np.mean(hits >= 1)
    assert recall >= 0.95, f"recall {recall:.3f}"
    assert hits.max() <= 1  # no nucleus found twice
    # and no detection claims two true centres or none (false positives stay rare)
    per_poly = np.bincount(pairs[1], minlength=len(polys))
    assert np.mean(per_poly == 1) >= 0.9


def test_masks_match_the_true_nuclei(small_slide: Any, baseline: Any) -> None:
    _, truth, spec = small_slide
    table = open_nuclei(baseline.zarr).table()
    label = truth_mask(spec, truth, 0, 0, spec.width, spec.height)
    ious = []
    for poly in table.polygons()[:200]:
        x0, y0, x1, y1 = (int(v) for v in poly.bounds)
        cx, cy = poly.representative_point().coords[0]
        t = label[int(cy), int(cx)]
        if t == 0:
            continue
        true_area = np.count_nonzero(label == t)
        inter = np.count_nonzero(label[y0:y1, x0:x1] == t)  # bbox approximation of the overlap
        ious.append(min(inter, poly.area) / max(true_area, poly.area))
    assert np.median(ious) > 0.6


def test_tile_size_does_not_change_the_nuclei(small_slide: Any, baseline: Any, tmp_path: Path) -> None:
    result = run_slide(small_slide[0], tmp_path, _config(tile_size_px=512, overlap_px=96))
    assert _polygon_set(result.zarr) == _polygon_set(baseline.zarr)


def test_worker_count_and_dask_do_not_change_the_nuclei(small_slide: Any, baseline: Any, tmp_path: Path) -> None:
    config = _config(scheduler=SchedulerConfig(workers=2), batch_tiles=3)
    with Runner(config.scheduler) as runner:
        assert runner.distributed and runner.n_workers == 2
        result = run_slide(small_slide[0], tmp_path, config, runner=runner)
    assert _polygon_set(result.zarr) == _polygon_set(baseline.zarr)


def test_tiled_equals_untiled_on_a_one_tile_image(make_slide: Any, tmp_path: Path) -> None:
    spec = SyntheticSpec(width=400, height=380, mpp=0.5, seed=3, tissue_fraction=1.0)
    path, _ = make_slide(spec, "tiff", compression="deflate")
    one = run_slide(path, tmp_path / "one", _config(tile_size_px=1024, overlap_px=64))
    tiled = run_slide(path, tmp_path / "tiled", _config(tile_size_px=256, overlap_px=64))
    assert one.report_data["counts"]["segmentor_tiles"] == 1
    assert tiled.report_data["counts"]["segmentor_tiles"] > 1
    assert _polygon_set(one.zarr) == _polygon_set(tiled.zarr)


def test_nucleus_on_a_tile_seam_is_emitted_once_and_whole(small_slide: Any, baseline: Any) -> None:
    _, truth, spec = small_slide
    block = 256 - 2 * baseline.report_data["counts"]["halo_px"]
    a = truth.semi_axes_l0[:, 0]
    cx, cy = truth.centers_l0[:, 0], truth.centers_l0[:, 1]
    # true nuclei whose extent crosses a segmentor block border
    crosses = (np.floor((cx - a) / block) != np.floor((cx + a) / block)) | (
        np.floor((cy - a) / block) != np.floor((cy + a) / block)
    )
    assert crosses.sum() > 10
    table = open_nuclei(baseline.zarr).table()
    polys = table.polygons()
    tree = shapely.STRtree(polys)
    idx_truth, idx_poly = tree.query(shapely.points(truth.centers_l0[crosses]), predicate="within")
    assert len(np.unique(idx_truth)) >= 0.95 * crosses.sum()
    assert np.bincount(idx_truth).max() == 1
    # whole: the polygon is roughly the true ellipse's area, and never flagged as cut
    true_area = np.pi * truth.semi_axes_l0[crosses, 0] * truth.semi_axes_l0[crosses, 1]
    ratio = shapely.area(polys[idx_poly]) / true_area[idx_truth]
    assert np.median(ratio) > 0.7
    assert not table.touches_edge[idx_poly].any()


def test_interrupted_run_leaves_no_store_claiming_completion(
    small_slide: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import wsiseg.pipeline as pipeline

    calls = {"n": 0}
    read, segment, stitch = pipeline.SEGMENTOR_STAGES

    def failing(*args: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("simulated interruption")
        return stitch.fn(*args)

    monkeypatch.setattr(pipeline, "SEGMENTOR_STAGES", (read, segment, replace(stitch, fn=failing)))
    with pytest.raises(KeyboardInterrupt):
        run_slide(small_slide[0], tmp_path, _config(batch_tiles=1))
    stem = small_slide[0].stem
    assert not (tmp_path / f"{stem}.zarr").exists()
    assert not (tmp_path / f"{stem}.geojson.gz").exists()
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(stem)]
    for p in leftovers:
        with pytest.raises(Exception):
            open_nuclei(p)


def test_missing_mpp_is_an_error_naming_the_option(no_mpp_tiff: Path, tmp_path: Path) -> None:
    with pytest.raises(MissingMppError, match="--mpp"):
        run_slide(no_mpp_tiff, tmp_path, _config())
    result = run_slide(no_mpp_tiff, tmp_path, _config(mpp=0.5))
    assert result.n_nuclei > 0


def test_roi_restricts_the_run(small_slide: Any, baseline: Any, tmp_path: Path) -> None:
    import json

    roi = tmp_path / "roi.geojson"
    box = [[100, 100], [500, 100], [500, 400], [100, 400], [100, 100]]
    roi.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [box]},
         "properties": {"objectType": "annotation"}}]}))
    result = run_slide(small_slide[0], tmp_path / "out", _config(roi=roi))
    table = open_nuclei(result.zarr).table()
    assert 0 < len(table) < baseline.n_nuclei
    c = table.centroid_l0
    assert ((c[:, 0] > 90) & (c[:, 0] < 510) & (c[:, 1] > 90) & (c[:, 1] < 410)).all()


def test_nuclei_are_spread_over_the_tissue_only(small_slide: Any, baseline: Any) -> None:
    _, truth, spec = small_slide
    table = open_nuclei(baseline.zarr).table()
    tree = cKDTree(truth.centers_l0)
    d, _ = tree.query(table.centroid_l0)
    assert np.mean(d < 4) > 0.9


def test_an_existing_dask_scheduler_gives_the_same_nuclei(small_slide: Any, baseline: Any, tmp_path: Path) -> None:
    from dask.distributed import LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        result = run_slide(small_slide[0], tmp_path, _config(scheduler=SchedulerConfig(scheduler=cluster.scheduler_address)))
    assert _polygon_set(result.zarr) == _polygon_set(baseline.zarr)


def test_resumed_run_equals_uninterrupted_and_recomputes_only_the_rest(
    small_slide: Any, baseline: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import wsiseg.pipeline as pipeline

    read, segment, stitch = pipeline.SEGMENTOR_STAGES
    calls = {"segment": 0, "prompter": 0}
    fail_at = {"n": 4}

    def counting_segment(*args: Any) -> Any:
        calls["segment"] += 1
        if calls["segment"] == fail_at["n"]:
            raise KeyboardInterrupt("killed")
        return segment.fn(*args)

    p_read, p_model = pipeline.PROMPTER_STAGES

    def counting_prompter(*args: Any) -> Any:
        calls["prompter"] += 1
        return p_model.fn(*args)

    monkeypatch.setattr(pipeline, "SEGMENTOR_STAGES", (read, replace(segment, fn=counting_segment), stitch))
    monkeypatch.setattr(pipeline, "PROMPTER_STAGES", (p_read, replace(p_model, fn=counting_prompter)))
    config = _config(batch_tiles=2)
    with pytest.raises(KeyboardInterrupt):
        run_slide(small_slide[0], tmp_path, config)
    work = tmp_path / ".wsiseg-work"
    assert len(list(work.rglob("batch-*.npz"))) == 3 and len(list(work.rglob("prompts.npz"))) == 1
    first_prompter_calls = calls["prompter"]

    fail_at["n"] = -1
    calls["segment"] = 0
    result = run_slide(small_slide[0], tmp_path, config)
    assert calls["prompter"] == first_prompter_calls  # the prompt set came from the checkpoint
    n_batches = -(-result.report_data["counts"]["segmentor_tiles"] // 2)
    assert calls["segment"] == n_batches - 3  # only the batches not saved before the kill
    assert _polygon_set(result.zarr) == _polygon_set(baseline.zarr)
    assert not work.exists()
    assert result.report_data["resumed"] is True and baseline.report_data["resumed"] is False
    from wsiseg.writers.report import report_warnings

    said = report_warnings(result.report_data, n_nuclei=100, n_edge=0, low_score_share=None,
                           median_area_um2=None, mpp=0.5)
    assert any("resumed an interrupted one" in w for w in said)


def test_a_writer_failing_in_its_thread_fails_the_run_leaves_no_outputs_and_keeps_the_checkpoint(
    small_slide: Any, baseline: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from wsiseg.writers.geojson import GeoJSONWriter

    write = GeoJSONWriter.write
    calls = {"n": 0}

    def failing_write(self: Any, table: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("No space left on device")
        write(self, table)

    monkeypatch.setattr(GeoJSONWriter, "write", failing_write)
    config = _config(batch_tiles=2)
    with pytest.raises(OSError, match="No space left"):
        run_slide(small_slide[0], tmp_path, config)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".wsiseg-work"]  # writers aborted: no partial files
    assert len(list((tmp_path / ".wsiseg-work").rglob("batch-*.npz"))) >= 2  # computed batches were checkpointed

    monkeypatch.setattr(GeoJSONWriter, "write", write)
    result = run_slide(small_slide[0], tmp_path, config)
    assert result.report_data["resumed"] is True
    assert _polygon_set(result.zarr) == _polygon_set(baseline.zarr)
    assert _geojson_shapes(result.geojson) == _geojson_shapes(baseline.geojson)


def _geojson_shapes(path: Path) -> list[str]:
    """A GeoJSON output's features as sorted JSON texts of their geometry and class (ids are
    random UUIDs; label ids and the decimals of measurements follow the batches)."""
    import gzip
    import json

    features = json.loads(gzip.decompress(path.read_bytes()))["features"]
    return sorted(json.dumps([f["geometry"], f["properties"]["classification"]], sort_keys=True) for f in features)


def test_a_run_detects_tissue_once_and_reports_the_area_it_used(
    small_slide: Any, baseline: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import wsiseg.tissue

    calls = []
    detect = wsiseg.tissue.tissue_for_slide

    def counting(*args: Any, **kw: Any) -> Any:
        calls.append(1)
        return detect(*args, **kw)

    monkeypatch.setattr(wsiseg.tissue, "tissue_for_slide", counting)
    result = run_slide(small_slide[0], tmp_path, _config())
    assert len(calls) == 1  # the report reuses the run's region
    area = result.report_data["tissue_area_mm2"]
    assert area == baseline.report_data["tissue_area_mm2"] and area > 0


# ---------------------------------------------------------------- in-process stages beside the model


def _chain(seen: dict[str, Any], fail_model_at: int | None = None) -> tuple[Any, ...]:
    """read -> model -> post over ints; the model stage of item i waits (briefly) for item i + 1
    to be read and for item i - 1 to be posted, which only happens when they run beside it."""
    import threading

    from wsiseg.scheduling import Stage

    read_done = {i: threading.Event() for i in range(100)}
    post_done = {i: threading.Event() for i in range(100)}

    def read(item: int) -> int:
        seen.setdefault("threads", set()).add(("read", threading.current_thread().name))
        read_done[item].set()
        return item * 10

    def model(value: int) -> int:
        item = value // 10
        if item == fail_model_at:
            raise KeyboardInterrupt("stopped")
        seen.setdefault("threads", set()).add(("model", threading.current_thread().name))
        seen.setdefault("read_ahead", []).append(read_done[item + 1].wait(2))
        seen.setdefault("posted_beside", []).append(item == 0 or post_done[item - 1].wait(2))
        return value + 1

    def post(value: int) -> int:
        seen.setdefault("threads", set()).add(("post", threading.current_thread().name))
        post_done[value // 10].set()
        return value * 2

    return (Stage(read), Stage(model, model=True), Stage(post))


def test_in_process_runs_read_and_post_beside_the_model_with_the_same_results_in_order() -> None:
    import threading

    seen: dict[str, Any] = {}
    with Runner(SchedulerConfig(scheduler="synchronous")) as runner:
        got = list(runner.map_chain(range(6), _chain(seen)))
        assert list(runner.map_chain([], _chain({}))) == []
    assert got == [(i * 10 + 1) * 2 for i in range(6)]
    assert seen["read_ahead"] == [True] * 5 + [False]  # item i + 1 read during item i's model stage
    assert all(seen["posted_beside"])  # item i - 1 posted during item i's model stage
    main = threading.current_thread().name
    assert {name for stage, name in seen["threads"] if stage == "model"} == {main}  # the model stays here
    assert all(name != main for stage, name in seen["threads"] if stage != "model")


def test_in_process_hands_on_the_finished_item_before_a_model_stage_failure() -> None:
    got: list[int] = []
    with Runner(SchedulerConfig(scheduler="synchronous")) as runner, pytest.raises(KeyboardInterrupt):
        for value in runner.map_chain(range(6), _chain({}, fail_model_at=3)):
            got.append(value)
    assert got == [(i * 10 + 1) * 2 for i in range(3)]  # items 0-2, as one after the other would give
