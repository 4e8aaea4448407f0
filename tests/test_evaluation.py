"""`wsiseg eval` and `wsiseg.evaluation`: the same run path as `wsiseg run`, scored per image."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from wsiseg.cli.main import main
from wsiseg.evaluation import TABLE_COLUMNS
from wsiseg.evaluation_overlay import BOTH_RGB, PREDICTION_RGB, TRUTH_RGB, render_overlay
from wsiseg.synthetic import SyntheticSpec, make_nuclei, render_region, truth_mask

SIZE = 256
MPP = 0.5
SPECS = {  # two small all-tissue scenes with touching pairs
    "scene-a": SyntheticSpec(SIZE, SIZE, mpp=MPP, seed=1, tissue_fraction=1.0, touching_fraction=0.1),
    "scene-b": SyntheticSpec(SIZE, SIZE, mpp=MPP, seed=2, tissue_fraction=1.0, touching_fraction=0.1),
}
SYNC = ["--scheduler", "synchronous"]


@pytest.fixture(scope="module")
def pairs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A "pairs" dataset: NAME.png + NAME.labels.tif (uint16 instance map) for two scenes."""
    import tifffile

    folder = tmp_path_factory.mktemp("pairs")
    for name, spec in SPECS.items():
        truth = make_nuclei(spec)
        Image.fromarray(render_region(spec, truth, 0, 0, SIZE, SIZE)).save(folder / f"{name}.png")
        tifffile.imwrite(folder / f"{name}.labels.tif", truth_mask(spec, truth, 0, 0, SIZE, SIZE).astype(np.uint16))
    return folder


@pytest.fixture(scope="module")
def sam_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained segmentor-only SAM bundle (vit_test): a second, different model to compare."""
    import torch

    from wsiseg.models.bundles import write_bundle
    from wsiseg.models.sam.build import build_sam

    torch.manual_seed(0)
    sam = build_sam("vit_test", input_size=256)
    manifest = {
        "name": "sam-test", "version": "0.0-test", "description": "untrained test configuration",
        "mpp": MPP, "input_size": 256,
        "normalisation": {"mean": [123.675, 116.28, 103.53], "std": [58.395, 57.12, 57.375]},
        "k_negatives": 2, "nms_radius_px": 6, "max_nucleus_diameter_px": 32,
        "classes": [{"id": 0, "name": "Nucleus", "color": [0, 136, 255]}],
        "components": {"segmentor": {"architecture": "sam", "config": {"variant": "vit_test"}}},
    }
    path = tmp_path_factory.mktemp("bundles") / "sam-test"
    write_bundle(path, manifest, {"segmentor": sam.state_dict()})
    return path


@pytest.fixture(scope="module")
def classical_eval(pairs_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any], str]:
    """`wsiseg eval --model classical` on the pairs dataset: (output folder, eval.json, stdout)."""
    out = tmp_path_factory.mktemp("eval-classical")
    result = CliRunner().invoke(
        main, ["eval", "--model", "classical", "--data", str(pairs_dir), "--mpp", str(MPP), "-o", str(out), *SYNC]
    )
    assert result.exit_code == 0, result.output
    return out, json.loads((out / "eval.json").read_text()), result.output


def test_eval_equals_wsiseg_run_then_wsiseg_score(
    pairs_dir: Path, classical_eval: tuple[Path, dict[str, Any], str], tmp_path: Path
) -> None:
    _, report, _ = classical_eval
    expected = {}
    for name in SPECS:
        image = pairs_dir / f"{name}.png"
        run = CliRunner().invoke(
            main, ["run", str(image), "--model", "classical", "--mpp", str(MPP), "--no-tissue-detection", "-o", str(tmp_path), "-q", *SYNC]
        )
        assert run.exit_code == 0, run.output
        pred, truth = tmp_path / f"{name}.zarr", pairs_dir / f"{name}.labels.tif"
        score = CliRunner().invoke(main, ["score", "--pred", str(pred), "--truth", str(truth), "--json"])
        assert score.exit_code == 0, score.output
        expected[name] = json.loads(score.output)
    got = {row["name"]: row for row in report["per_image"]}
    assert list(got) == list(SPECS)
    for name, want in expected.items():
        assert {k: got[name][k] for k in want} == want  # every score, exactly the same number
        assert want["n_true"] > 30 and want["n_pred"] > 0
    for metric in ("pq", "aji", "dice", "f1_detection"):  # the mean is the mean of the per-image values
        values = [expected[name][metric] for name in SPECS]
        assert report["mean"][metric] == sum(values) / len(values)


def test_eval_writes_csv_and_json_with_the_table_columns(classical_eval: tuple[Path, dict[str, Any], str]) -> None:
    out, report, stdout = classical_eval
    with open(out / "eval.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0])[: len(TABLE_COLUMNS)] == TABLE_COLUMNS
    assert [r["name"] for r in rows] == [*SPECS, "mean"]
    assert float(rows[-1]["pq"]) == pytest.approx(np.mean([float(r["pq"]) for r in rows[:-1]]))
    assert report["model"] == "classical" and report["model_sha256"] is None and report["network_precision"] is None
    assert report["split"] == "all" and report["dataset"]
    assert report["parameters"]["tissue_detection"] is False and report["parameters"]["model"] == "classical"
    assert 0.0 < report["mean"]["pq"] <= 1.0 and report["mean"]["n_images"] == 2
    assert all(r["time_s"] > 0 for r in report["per_image"])
    for name in SPECS:  # the printed table has a row per image and the mean
        assert any(line.startswith(name) for line in stdout.splitlines())
    assert any(line.startswith("mean") for line in stdout.splitlines())
    assert not [p for p in out.iterdir() if "runs-" in p.name]  # run outputs are cleaned up


def test_overlays_have_the_image_shape_and_both_outline_colours(
    pairs_dir: Path, classical_eval: tuple[Path, dict[str, Any], str]
) -> None:
    out, _, _ = classical_eval
    for name in SPECS:
        overlay = np.asarray(Image.open(out / "overlays" / f"{name}.png"))
        assert overlay.shape == (SIZE, SIZE, 3)
        colours = {tuple(c) for c in overlay.reshape(-1, 3)}
        assert TRUTH_RGB in colours and PREDICTION_RGB in colours
        image = np.asarray(Image.open(pairs_dir / f"{name}.png"))
        assert (overlay == image).all(axis=2).mean() > 0.5  # outlines only: the image stays visible


def test_overlay_colours_truth_prediction_and_agreement() -> None:
    image = np.full((12, 12, 3), 128, np.uint8)
    truth = np.zeros((12, 12), np.int32)
    truth[1:5, 1:5] = 1
    truth[6:10, 6:10] = 2
    pred = np.zeros((12, 12), np.int32)
    pred[6:10, 6:10] = 7  # the same nucleus as truth 2
    pred[1:4, 8:11] = 3  # a false positive
    out = render_overlay(image, truth, pred)
    assert tuple(out[1, 1]) == TRUTH_RGB and tuple(out[2, 2]) == (128, 128, 128)  # outline, not fill
    assert tuple(out[6, 6]) == BOTH_RGB
    assert tuple(out[1, 8]) == PREDICTION_RGB
    assert tuple(out[11, 11]) == (128, 128, 128)


def test_compare_shows_both_models_side_by_side(pairs_dir: Path, sam_bundle: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(main, [
        "eval", "--model", "classical", "--compare", str(sam_bundle), "--prompter", "classical",
        "--data", str(pairs_dir), "--mpp", str(MPP), "-o", str(tmp_path), *SYNC,
    ])
    assert result.exit_code == 0, result.output
    with open(tmp_path / "eval.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for label in ("classical", "sam-test"):
        assert {f"pq[{label}]", f"aji[{label}]", f"n_pred[{label}]"} <= set(rows[0])
        for name in SPECS:
            assert (tmp_path / "overlays" / f"{name}.{label}.png").exists()
    report = json.loads((tmp_path / "eval.json").read_text())
    means = {m["label"]: m["mean"] for m in report["models"]}
    assert report["delta_mean"]["sam-test"]["pq"] == pytest.approx(means["sam-test"]["pq"] - means["classical"]["pq"])
    n_true = [[r["n_true"] for r in m["per_image"]] for m in report["models"]]
    assert n_true[0] == n_true[1] == [int(r["n_true"]) for r in rows[:-1]]  # the same images for both
    assert "pq[sam-test]" in result.output and "mean sam-test - classical" in result.output


def test_a_bad_dataset_path_is_one_line_and_exit_code_2(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-dataset"
    result = CliRunner().invoke(main, ["eval", "--data", str(missing), "-o", str(tmp_path / "out"), *SYNC])
    assert result.exit_code == 2
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and str(missing) in lines[0]


def test_library_evaluate_keeps_runs_only_when_asked(pairs_dir: Path, tmp_path: Path) -> None:
    from wsiseg.datasets import open_dataset
    from wsiseg.evaluation import evaluate

    dataset = open_dataset(pairs_dir, mpp=MPP)
    report = evaluate("classical", dataset, out_dir=tmp_path, overlays=False, keep_runs=True)
    assert report.runs_dir is not None and (report.runs_dir / "runs" / "scene-a.zarr").is_dir()
    assert not (tmp_path / "overlays").exists()
    assert [r["name"] for r in report.per_image] == list(SPECS)
    csv_path, json_path = report.write(tmp_path)
    assert json.loads(json_path.read_text())["runs_dir"] == str(report.runs_dir)


def test_eval_min_score_drops_low_scoring_prompts_as_run_does(
    pairs_dir: Path, classical_eval: tuple[Path, dict[str, Any], str], tmp_path: Path
) -> None:
    _, plain, _ = classical_eval
    result = CliRunner().invoke(main, [
        "eval", "--model", "classical", "--data", str(pairs_dir), "--mpp", str(MPP), "-o", str(tmp_path),
        "--min-score", "0.999", "--no-overlays", *SYNC,
    ])
    assert result.exit_code == 0, result.output
    strict = json.loads((tmp_path / "eval.json").read_text())
    assert strict["parameters"]["min_score"] == 0.999 and plain["parameters"]["min_score"] is None
    n_plain = sum(row["n_pred"] for row in plain["per_image"])
    assert sum(row["n_pred"] for row in strict["per_image"]) < n_plain


def test_eval_precision_is_models_only_and_recorded(pairs_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "eval"
    result = CliRunner().invoke(main, ["eval", "--model", "wsiseg-tiny", "--precision", "bf16", "--compare", "classical",
                                       "--data", str(pairs_dir), "--mpp", str(MPP), "-o", str(out), "--no-overlays", *SYNC])
    assert result.exit_code == 0, result.output
    tiny, classical = json.loads((out / "eval.json").read_text())["models"]
    assert tiny["network_precision"] == "bf16" and tiny["parameters"]["precision"] == "bf16"
    assert classical["network_precision"] is None and classical["parameters"]["precision"] is None  # its own
    refused = CliRunner().invoke(main, ["eval", "--model", "classical", "--precision", "fp32", "--data", str(pairs_dir),
                                        "--mpp", str(MPP), "-o", str(tmp_path / "refused"), *SYNC])
    assert refused.exit_code == 2 and "--precision" in refused.output  # a usage error, before any image runs
    assert not (tmp_path / "refused").exists()  # and before the output folder and its log are made
