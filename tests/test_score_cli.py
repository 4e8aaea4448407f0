"""`wsiseg score`: scores of label images, GeoJSON and Zarr outputs; one-line errors with exit code 2."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import shapely
import tifffile
from click.testing import CliRunner
from PIL import Image

from wsiseg.cli.main import main
from wsiseg.nuclei import MEASUREMENTS, NucleusTable
from wsiseg.writers.geojson import GeoJSONWriter
from wsiseg.writers.zarr_store import ZarrWriter

SHAPE = (12, 16)


@pytest.fixture()
def truth_tif(tmp_path: Path) -> Path:
    """Two true nuclei side by side: t1 rows 2-5 x cols 2-5 (16 px), t2 rows 2-5 x col 6 (4 px)."""
    labels = np.zeros(SHAPE, np.uint16)
    labels[2:6, 2:6] = 40
    labels[2:6, 6:7] = 41
    path = tmp_path / "truth.tif"
    tifffile.imwrite(path, labels)
    return path


def nuclei(polygons: list[shapely.Polygon]) -> NucleusTable:
    n = len(polygons)
    measurements = {m: np.ones(n, np.float32) for m in MEASUREMENTS}
    return NucleusTable.from_polygons(polygons, np.full(n, -1, np.int16), measurements)


def score(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["score", *args])
    return result.exit_code, result.output


def test_merged_prediction_png_scores_as_computed_by_hand(truth_tif: Path, tmp_path: Path) -> None:
    pred = np.zeros(SHAPE, np.uint8)
    pred[2:6, 2:7] = 3  # one prediction over both truths: 20 px
    Image.fromarray(pred).save(tmp_path / "pred.png")
    code, out = score("--pred", str(tmp_path / "pred.png"), "--truth", str(truth_tif), "--mpp", "0.5", "--json")
    assert code == 0, out
    data = json.loads(out)
    # IoU(t1, p) = 16/20 = 0.8 (match), IoU(t2, p) = 0.2: TP 1, FN 1 -> DQ 2/3, SQ 0.8, PQ 8/15
    assert (data["tp"], data["fp"], data["fn"]) == (1, 0, 1)
    assert data["pq"] == pytest.approx(8 / 15) and data["sq"] == pytest.approx(0.8)
    assert data["aji"] == pytest.approx(0.5)  # (16 + 4) / (20 + 20)
    assert data["aji_plus"] == pytest.approx(2 / 3)  # 16 / (20 + 4)
    assert data["dice"] == pytest.approx(1.0)
    # centroids: t1 (3.5, 3.5), t2 (3.5, 6), p (3.5, 4); radius 3 um / 0.5 = 6 px -> p pairs with one truth
    assert data["radius_px"] == 6.0 and data["tp_detection"] == 1 and data["recall"] == pytest.approx(0.5)


def test_geojson_written_by_wsiseg_scores_against_a_tiff(truth_tif: Path, tmp_path: Path) -> None:
    path = tmp_path / "pred.geojson.gz"
    writer = GeoJSONWriter(path, fmt="gz", offset_l0=(1.0, 2.0), seed=0)
    writer.write(nuclei([shapely.box(2, 2, 6, 6), shapely.box(6, 2, 7, 6)]))  # level 0: exactly the truth
    writer.close()
    code, out = score("--pred", str(path), "--truth", str(truth_tif), "--mpp", "0.25", "--json")
    assert code == 0, out
    data = json.loads(out)
    assert data["pq"] == 1.0 and data["aji"] == 1.0 and data["n_pred"] == 2 and data["radius_px"] == 12.0


def test_zarr_store_supplies_the_resolution(truth_tif: Path, tmp_path: Path) -> None:
    store = tmp_path / "pred.zarr"
    writer = ZarrWriter(store, slide={"width": SHAPE[1], "height": SHAPE[0], "mpp": [0.5, 0.5]}, label_mpp=(0.5, 0.5))
    writer.write(nuclei([shapely.box(2, 2, 6, 6)]))  # t1 only
    writer.close()
    code, out = score("--pred", str(store), "--truth", str(truth_tif), "--json")
    assert code == 0, out
    data = json.loads(out)
    # TP 1, FN 1: DQ 2/3, SQ 1
    assert data["radius_px"] == 6.0 and data["pq"] == pytest.approx(2 / 3) and data["fn"] == 1


def test_table_output_is_aligned(truth_tif: Path) -> None:
    code, out = score("--pred", str(truth_tif), "--truth", str(truth_tif), "--mpp", "0.5")
    assert code == 0, out
    lines = out.splitlines()
    assert any(line.split() == ["PQ", "1.0000"] for line in lines)
    assert len({line.rfind(" ") for line in lines if not line.startswith(("pred", "truth"))}) == 1  # one value column


def test_errors_are_one_line_naming_the_file_with_exit_code_2(truth_tif: Path, tmp_path: Path) -> None:
    np.save(tmp_path / "small.npy", np.zeros((3, 3), np.int32))
    (tmp_path / "pred.csv").write_text("x,y\n")
    cases = {
        "missing.png": ["--pred", str(tmp_path / "missing.png"), "--truth", str(truth_tif), "--mpp", "0.5"],
        "small.npy": ["--pred", str(tmp_path / "small.npy"), "--truth", str(truth_tif), "--mpp", "0.5"],
        "pred.csv": ["--pred", str(tmp_path / "pred.csv"), "--truth", str(truth_tif), "--mpp", "0.5"],
        "--mpp": ["--pred", str(truth_tif), "--truth", str(truth_tif)],
    }
    for needle, args in cases.items():
        code, out = score(*args)
        lines = [line for line in out.splitlines() if line.strip()]
        assert code == 2, (needle, out)
        assert len(lines) == 1 and needle in lines[0] and lines[0].startswith("error:"), (needle, out)
