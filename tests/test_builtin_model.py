"""The shipped learned default, wsiseg-tiny: a sound bundle with its model card, the default of
`wsiseg run`, and right on synthetic slides (every nucleus once, whatever the tile size)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import shapely
from click.testing import CliRunner
from scipy.spatial import cKDTree

from wsiseg.cli.main import main
from wsiseg.models.bundles import open_bundle
from wsiseg.models.cache import BUILTIN_BUNDLES, resolve_model
from wsiseg.pipeline import DEFAULT_MODEL, RunConfig, run_slide
from wsiseg.scheduling import SchedulerConfig
from wsiseg.synthetic import SyntheticSpec
from wsiseg.writers.zarr_store import open_nuclei

BUNDLE = BUILTIN_BUNDLES["wsiseg-tiny"]
SYNC = SchedulerConfig(scheduler="synchronous")


def test_the_default_model_is_the_shipped_bundle() -> None:
    assert RunConfig().model == DEFAULT_MODEL == "wsiseg-tiny"
    assert resolve_model("wsiseg-tiny") == BUNDLE


def test_shipped_bundle_verifies_is_small_and_carries_its_model_card() -> None:
    from wsiseg.models.bundles import verify_bundle

    assert verify_bundle(BUNDLE) == []
    size = sum(p.stat().st_size for p in BUNDLE.iterdir() if p.is_file())
    assert size < 20 * 2**20
    manifest = json.loads((BUNDLE / "manifest.json").read_text())
    card = manifest["model_card"]
    assert "MoNuSeg" in card["data"] and "CC BY-NC-SA 4.0" in card["licence"]
    assert any("10.1109/TMI.2017.2677499" in c for c in card["citations"])
    assert any("10.1109/TMI.2019.2947628" in c for c in card["citations"])
    training = manifest["training"]
    assert training["recipe"]["mpp"] == manifest["mpp"]
    assert len(training["validation_images"]) >= 7  # whole images held out, one per organ at least


@pytest.fixture(scope="module")
def synthetic(make_slide: Any) -> tuple[Path, Any]:
    spec = SyntheticSpec(width=1100, height=900, mpp=0.5, seed=7, tissue_fraction=0.8, touching_fraction=0.1)
    return make_slide(spec, "svs", compression="deflate")


@pytest.fixture(scope="module")
def default_run(synthetic: tuple[Path, Any], tmp_path_factory: pytest.TempPathFactory) -> Any:
    return run_slide(synthetic[0], tmp_path_factory.mktemp("tiny"), RunConfig(scheduler=SYNC))


def test_learned_default_finds_the_synthetic_nuclei_once_each(synthetic: tuple[Path, Any], default_run: Any) -> None:
    _, truth = synthetic
    assert default_run.report_data["model"]["segmentor"] == "wsiseg-tiny"
    polys = open_nuclei(default_run.zarr).table().polygons()
    pairs = shapely.STRtree(polys).query(shapely.points(truth.centers_l0), predicate="within")
    hits = np.bincount(pairs[0], minlength=len(truth))
    assert np.mean(hits >= 1) >= 0.95
    assert hits.max() <= 1
    claimed = np.bincount(pairs[1], minlength=len(polys))
    assert np.mean(claimed == 0) < 0.05  # few polygons without a true nucleus


def test_learned_default_finds_the_same_nuclei_whatever_the_tile_size(
    synthetic: tuple[Path, Any], default_run: Any, tmp_path: Path
) -> None:
    base = open_nuclei(default_run.zarr).table().centroid_l0  # the model's own 1024 px tiles
    for tile in (512, 2048):
        other = open_nuclei(run_slide(synthetic[0], tmp_path / str(tile),
                                      RunConfig(tile_size_px=tile, scheduler=SYNC)).zarr).table().centroid_l0
        # the network's receptive field is wider than the tile overlap, so maps differ slightly
        # near tile seams: at most one nucleus in 200 may come or go, the rest are the same
        assert abs(len(other) - len(base)) <= len(base) / 200
        distance, _ = cKDTree(base).query(other)
        assert np.mean(distance < 1.0) >= 0.99


def test_fp32_finds_the_nuclei_of_the_default_precision_and_each_run_records_its_own(
    synthetic: tuple[Path, Any], default_run: Any, tmp_path: Path
) -> None:
    import torch

    from wsiseg.models.tiny.maps import resolve_precision

    manifest = json.loads((BUNDLE / "manifest.json").read_text())
    assert {c["config"]["precision"] for c in manifest["components"].values()} == {"auto"}
    assert default_run.report_data["model"]["precision"] == resolve_precision("auto", torch.device("cpu"))
    assert default_run.report_data["parameters"]["precision"] == default_run.report_data["model"]["precision"]
    exact = run_slide(synthetic[0], tmp_path, RunConfig(precision="fp32", scheduler=SYNC))
    assert exact.report_data["model"]["precision"] == "fp32"
    assert exact.report_data["parameters"]["precision"] == "fp32"
    assert open_nuclei(exact.zarr).attrs["model"]["precision"] == "fp32"
    base = open_nuclei(default_run.zarr).table().centroid_l0
    other = open_nuclei(exact.zarr).table().centroid_l0
    # where the default runs in bf16 its maps differ by a few hundredths: the same nuclei, within a pixel
    assert abs(len(other) - len(base)) <= len(base) / 200
    distance, _ = cKDTree(base).query(other)
    assert np.mean(distance < 1.0) >= 0.99


def test_min_score_drops_the_prompts_scoring_below_it(synthetic: tuple[Path, Any], default_run: Any, tmp_path: Path) -> None:
    scores = np.asarray(open_nuclei(default_run.zarr).table().measurements["score"])
    values = np.unique(scores)
    assert len(values) > 10  # the score ranks nuclei: not one value for all
    threshold = float(values[len(values) // 2 - 1] + values[len(values) // 2]) / 2  # between two scores
    strict = run_slide(synthetic[0], tmp_path, RunConfig(min_score=threshold, scheduler=SYNC))
    kept = np.asarray(open_nuclei(strict.zarr).table().measurements["score"])
    assert 0 < strict.n_nuclei < default_run.n_nuclei
    assert kept.min() >= threshold - 1e-6
    # the report names the score each run required: the manifest's threshold, then --min-score's
    manifest_threshold = open_bundle(resolve_model("wsiseg-tiny")).component("prompter").config["threshold"]
    assert default_run.report_data["model"]["min_score"] == manifest_threshold
    assert strict.report_data["model"]["min_score"] == threshold
    shown = CliRunner().invoke(main, ["models", "info", "wsiseg-tiny"]).output
    assert f"score threshold (the default --min-score): {manifest_threshold:g}" in shown
    from wsiseg.models.tiny.maps import cpu_has_bf16

    here = "bf16" if cpu_has_bf16() else "fp32"
    assert f"network precision (the default --precision): auto (on this machine's CPU: {here})" in shown


def test_one_network_pass_gives_the_nuclei_of_two_passes(
    synthetic: tuple[Path, Any], default_run: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The segmentor reads the prompter's stored maps (wsiseg.map_store) instead of running the
    network again; the nuclei are those of two separate passes."""
    import wsiseg.pipeline as pipeline
    from wsiseg.models.tiny.maps import DenseMapNet

    pixels = {"n": 0}
    original = DenseMapNet.predict_maps

    def counted(self: DenseMapNet, tiles: np.ndarray) -> np.ndarray:
        pixels["n"] += int(np.prod(tiles.shape[:3]))
        return original(self, tiles)

    monkeypatch.setattr(DenseMapNet, "predict_maps", counted)
    one = run_slide(synthetic[0], tmp_path / "one", RunConfig(scheduler=SYNC))
    one_pass = pixels["n"]
    monkeypatch.setattr(pipeline, "shares_maps", lambda p, s: False)
    pixels["n"] = 0
    two = run_slide(synthetic[0], tmp_path / "two", RunConfig(scheduler=SYNC))
    assert one_pass < 0.6 * pixels["n"]  # the prompter tiles only
    a = open_nuclei(one.zarr).table().centroid_l0
    b = open_nuclei(two.zarr).table().centroid_l0
    assert abs(len(a) - len(b)) <= 0.01 * len(b)
    distance, _ = cKDTree(b).query(a)
    assert np.mean(distance < 1.0) > 0.97
    assert not (tmp_path / "one" / ".wsiseg-work").exists() or not any((tmp_path / "one" / ".wsiseg-work").iterdir())


def test_map_store_works_across_dask_worker_processes(synthetic: tuple[Path, Any], default_run: Any, tmp_path: Path) -> None:
    result = run_slide(synthetic[0], tmp_path, RunConfig(scheduler=SchedulerConfig(scheduler=None, workers=2)))
    a = open_nuclei(result.zarr).table().centroid_l0
    b = open_nuclei(default_run.zarr).table().centroid_l0
    assert len(a) == len(b)
    distance, _ = cKDTree(b).query(a)
    assert distance.max() < 1e-6
