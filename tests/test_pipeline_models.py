"""The pipeline with SAM segmentors and learned prompters from bundles (small untrained
configurations: these tests are about wiring, formats and invariance, not accuracy)."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import pytest
import shapely
import torch
from click.testing import CliRunner

from wsiseg.models.bundles import write_bundle
from wsiseg.pipeline import RunConfig, run_slide
from wsiseg.scheduling import Runner, SchedulerConfig
from wsiseg.synthetic import SyntheticSpec
from wsiseg.writers.geojson import check_qupath_geojson
from wsiseg.writers.zarr_store import open_nuclei

SYNC = SchedulerConfig(scheduler="synchronous")
SAM_MEAN, SAM_STD = [123.675, 116.28, 103.53], [58.395, 57.12, 57.375]


def _sam_state(lora_rank: int | None, seed: int) -> dict[str, torch.Tensor]:
    from wsiseg.models.sam.build import build_sam
    from wsiseg.models.sam.lora import apply_lora

    torch.manual_seed(seed)
    model = build_sam("vit_test", input_size=256)
    if lora_rank:
        apply_lora(model, lora_rank, 4.0)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_b" in name:
                    p.normal_(0, 0.02)  # a "trained" adapter: not the identity
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _manifest(name: str, components: dict[str, Any]) -> dict[str, Any]:
    return {
        "format": "wsiseg-bundle/1",
        "name": name,
        "version": "0.0-test",
        "description": "untrained test configuration",
        "mpp": 0.5,
        "input_size": 256,
        "normalisation": {"mean": SAM_MEAN, "std": SAM_STD},
        "k_negatives": 2,
        "nms_radius_px": 6,
        "max_nucleus_diameter_px": 32,
        "classes": [{"id": 0, "name": "Nucleus", "color": [0, 136, 255]}],
        "components": components,
    }


@pytest.fixture(scope="module")
def slide(make_slide: Any) -> tuple[Path, Any]:
    spec = SyntheticSpec(width=700, height=600, mpp=0.5, seed=11, tissue_fraction=0.9)
    return make_slide(spec, "svs", compression="deflate")


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from wsiseg.models.prompters.dpa_p2pnet import DPAP2PNet, DPAP2PNetConfig
    from wsiseg.models.prompters.unet import UNet, UNetConfig

    root = tmp_path_factory.mktemp("bundles")
    sam_lora = {"architecture": "sam", "config": {"variant": "vit_test", "lora": {"rank": 4, "alpha": 4.0}}}
    sam_plain = {"architecture": "sam", "config": {"variant": "vit_test"}}
    torch.manual_seed(0)
    unet = UNet(UNetConfig(levels=2, base_channels=4))
    with torch.no_grad():
        unet.head.bias.fill_(2.0)  # untrained: make "nucleus" likely so points get sampled
    torch.manual_seed(0)
    p2p = DPAP2PNet(DPAP2PNetConfig.with_backbone("convnext_test", num_classes=1, num_levels=3, space=16, hidden_dim=16))
    out = {}
    out["unet_sam_lora"] = write_bundle(
        root / "unet-sam-lora",
        _manifest("unet-sam-lora", {"prompter": {"architecture": "unet_prompter",
                                                 "config": {"levels": 2, "base_channels": 4, "context_px": 16,
                                                            "selection": "probability", "points_per_tile": 64}},
                                    "segmentor": sam_lora}),
        {"prompter": unet.state_dict(), "segmentor": _sam_state(4, 1)},
    ).path
    out["p2p_sam"] = write_bundle(
        root / "p2p-sam",
        _manifest("p2p-sam", {"prompter": {"architecture": "dpa_p2pnet",
                                           "config": {"backbone": "convnext_test", "num_classes": 1,
                                                      "num_levels": 3, "space": 16, "hidden_dim": 16,
                                                      "context_px": 16}},
                              "segmentor": sam_plain}),
        {"prompter": p2p.state_dict(), "segmentor": _sam_state(None, 2)},
    ).path
    out["sam_only"] = write_bundle(
        root / "sam-only", _manifest("sam-only", {"segmentor": sam_plain}), {"segmentor": _sam_state(None, 3)}
    ).path
    return out


def _check_outputs(result: Any) -> Any:
    assert check_qupath_geojson(result.geojson) == []
    store = open_nuclei(result.zarr)
    assert store.count == result.n_nuclei
    assert store.attrs["status"] == "complete"
    return store


def _wkb_set(zarr: Path) -> set[bytes]:
    return {shapely.to_wkb(shapely.normalize(p)) for p in open_nuclei(zarr).table().polygons()}


def test_probability_prompter_with_lora_sam_runs_and_is_worker_invariant(
    slide: Any, bundles: dict[str, Path], tmp_path: Path
) -> None:
    model = str(bundles["unet_sam_lora"])
    sync = run_slide(slide[0], tmp_path / "sync", RunConfig(model=model, scheduler=SYNC))
    _check_outputs(sync)
    assert sync.report_data["model"]["segmentor"] == "unet-sam-lora"
    assert sync.report_data["counts"]["prompts"] > 0
    config = RunConfig(model=model, scheduler=SchedulerConfig(workers=2), batch_tiles=2)
    with Runner(config.scheduler) as runner:
        dask = run_slide(slide[0], tmp_path / "dask", config, runner=runner)
    assert _wkb_set(dask.zarr) == _wkb_set(sync.zarr)


def test_point_prompter_with_sam_runs(slide: Any, bundles: dict[str, Path], tmp_path: Path) -> None:
    result = run_slide(slide[0], tmp_path, RunConfig(model=str(bundles["p2p_sam"]), scheduler=SYNC))
    _check_outputs(result)
    assert result.report_data["counts"]["prompter_tiles"] > 0


def test_file_prompts_with_sam_give_at_most_one_nucleus_per_prompt(
    slide: Any, bundles: dict[str, Path], tmp_path: Path
) -> None:
    path, truth = slide
    prompts = tmp_path / "points.csv"
    with prompts.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["x", "y"])
        w.writerows(truth.centers_l0.round(2).tolist())
    result = run_slide(path, tmp_path / "out", RunConfig(model=str(bundles["sam_only"]), prompts_file=prompts,
                                                         scheduler=SYNC))
    store = _check_outputs(result)
    counts = result.report_data["counts"]
    assert counts["prompts"] == len(truth)
    assert 0 < store.count <= len(truth)


def test_segmentor_only_bundle_without_prompts_is_a_clear_error(
    slide: Any, bundles: dict[str, Path], tmp_path: Path
) -> None:
    with pytest.raises(ValueError, match="--prompts"):
        run_slide(slide[0], tmp_path, RunConfig(model=str(bundles["sam_only"]), scheduler=SYNC))


def test_classical_prompter_feeds_a_sam_segmentor(slide: Any, bundles: dict[str, Path], tmp_path: Path) -> None:
    result = run_slide(
        slide[0], tmp_path, RunConfig(model=str(bundles["sam_only"]), prompter="classical", scheduler=SYNC)
    )
    _check_outputs(result)
    assert result.report_data["counts"]["prompts"] > 0.9 * len(slide[1]) * 0.9


def test_wrong_tile_size_for_sam_names_the_option(slide: Any, bundles: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--tile-size 256"):
        run_slide(slide[0], tmp_path, RunConfig(model=str(bundles["sam_only"]), prompter="classical",
                                                tile_size_px=512, scheduler=SYNC))


def test_cli_runs_a_bundle(slide: Any, bundles: dict[str, Path], tmp_path: Path) -> None:
    from wsiseg.cli.main import main

    result = CliRunner().invoke(
        main, ["run", str(slide[0]), "-o", str(tmp_path), "--model", str(bundles["unet_sam_lora"]),
               "--scheduler", "synchronous", "--quiet"],
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / f"{slide[0].stem}.geojson.gz").exists()
