"""wsiseg check: one row per slide, a verdict, estimates from a timed sample run; manifests."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from wsiseg.cli.main import main
from wsiseg.slide_manifest import ManifestError, SlideEntry, read_manifest
from wsiseg.synthetic import SyntheticSpec, SyntheticTruth, tissue_mask

FAST = ["--model", "classical", "--device", "cpu"]


@pytest.fixture(autouse=True)
def _memory_is_plenty(monkeypatch: pytest.MonkeyPatch) -> None:
    """The memory warning depends on the free memory of the machine running the tests (it has a
    test of its own, with the free memory set)."""
    monkeypatch.setattr("wsiseg.preflight._available_memory_bytes", lambda: None)


def _check(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, ["check", *args, *FAST])
    return result.exit_code, result.stdout, result.stderr


def test_good_slide_is_ok_with_its_size_mpp_tissue_area_and_estimates(
    svs_slide: Path, svs_spec: SyntheticSpec, svs_truth: SyntheticTruth
) -> None:
    code, out, err = _check(str(svs_slide), "--json")
    assert code == 0, out + err
    [row] = json.loads(out)
    assert row["verdict"] == "ok" and row["reasons"] == []
    assert (row["reader"], row["vendor"]) == ("openslide", "aperio")
    assert (row["width"], row["height"], row["levels"]) == (2048, 1536, 3)
    assert row["mpp"] == pytest.approx(0.5) and row["mpp_source"] == "aperio.MPP"
    assert row["objective_power"] == 20
    truth_mm2 = tissue_mask(svs_spec, svs_truth, 0, 0, 2048, 1536).sum() * svs_spec.mpp**2 / 1e6
    assert row["tissue_area_mm2"] == pytest.approx(truth_mm2, rel=0.2)
    # extrapolated from a measured sample: tissue-sized tile counts, nuclei near the truth's count
    assert row["sample"]["nuclei"] > 0 and 0 < row["sample"]["area_mm2"] < row["tissue_area_mm2"] / 5
    assert row["tiles_prompter"] > row["sample"]["prompter_tiles"]
    # four windows spread over the tissue's stain density: within a quarter of the truth (one median
    # window estimated 1,348 of these 959 nuclei: the slide's nuclei-free tissue margin was never sampled)
    assert 0.8 * len(svs_truth) <= row["nuclei"] <= 1.25 * len(svs_truth)
    assert row["time_s"] > row["sample"]["wall_s"] / 2 and row["peak_rss_mib"] > 50


def test_a_run_needing_most_of_the_free_memory_is_a_warning(svs_slide: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("wsiseg.preflight._available_memory_bytes", lambda: 100 * 2**20)  # 100 MiB free
    code, out, err = _check(str(svs_slide), "--json")
    [row] = json.loads(out)
    assert code == 0 and row["verdict"] == "warning", out + err  # usable, but said
    assert any("MiB available now; use fewer --workers" in reason for reason in row["reasons"])


def test_text_file_and_slide_without_mpp_are_unusable_and_exit_1(text_as_svs: Path, no_mpp_tiff: Path) -> None:
    code, out, _ = _check(str(text_as_svs), str(no_mpp_tiff), "--json")
    assert code == 1
    text, no_mpp = json.loads(out)
    # the path is the row's own field, not repeated in front of the reason
    assert text["verdict"] == "unusable" and text["path"] == str(text_as_svs)
    assert text["reasons"][0].startswith("no reader could open it")
    assert no_mpp["verdict"] == "unusable" and no_mpp["reader"] is not None and no_mpp["mpp"] is None
    assert "--mpp" in no_mpp["reasons"][0] and not no_mpp["reasons"][0].startswith(str(no_mpp_tiff))
    assert no_mpp["nuclei"] is None and no_mpp["time_s"] is None  # nothing is sampled


def test_table_has_one_row_per_slide_and_each_reason(text_as_svs: Path, no_mpp_tiff: Path) -> None:
    code, out, _ = _check(str(text_as_svs), str(no_mpp_tiff))
    assert code == 1
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["slide", "reader", "vendor"]
    rows = [ln for ln in lines[1:3]]
    assert rows[0].startswith(text_as_svs.name) and rows[0].rstrip().endswith("unusable")
    assert rows[1].startswith(no_mpp_tiff.name) and "missing" in rows[1]
    assert any(ln.startswith(f"{no_mpp_tiff.name}: unusable:") and "--mpp" in ln for ln in lines)
    assert "0 ok, 0 warning, 2 unusable" in out
    assert "estimates for" not in out and "in all as one run" not in out  # nothing sampled, nothing estimated


def test_mpp_option_makes_a_slide_without_mpp_usable(no_mpp_tiff: Path) -> None:
    code, out, err = _check(str(no_mpp_tiff), "--mpp", "0.5", "--json")
    assert code == 0, out + err
    [row] = json.loads(out)
    assert row["verdict"] in ("ok", "warning") and row["mpp"] == 0.5 and row["mpp_source"] == "--mpp"
    assert not any("replaces the file's own" in r for r in row["reasons"])  # the file states none


def test_mpp_option_replacing_the_files_own_resolution_is_a_warning(svs_slide: Path) -> None:
    """The file says 0.5 µm/px: --mpp 1 is used (a run would use it too) but named, since it is
    right only for a mislabelled scan; --mpp 0.5 agrees with the file and is not."""
    code, out, err = _check(str(svs_slide), "--mpp", "1", "--json")
    assert code == 0, out + err
    [row] = json.loads(out)
    assert row["mpp"] == 1 and row["mpp_source"] == "--mpp" and row["verdict"] == "warning"
    assert any("--mpp 1 µm/px replaces the file's own 0.5 (2.0x coarser)" in r for r in row["reasons"])
    code, out, err = _check(str(svs_slide), "--mpp", "0.5", "--json")
    [row] = json.loads(out)
    assert row["verdict"] == "ok" and row["reasons"] == []


def test_manifest_paths_are_relative_to_the_csv(tmp_path: Path, no_mpp_tiff: Path, text_as_svs: Path) -> None:
    folder = tmp_path / "lists"
    folder.mkdir()
    manifest = folder / "cohort.csv"
    rel = os.path.relpath(no_mpp_tiff, folder)
    manifest.write_text(f"path,mpp,output_name\n{rel},0.5,case-1\n\n{os.path.relpath(text_as_svs, folder)},,\n")
    code, out, err = _check(str(manifest), "--json")
    assert code == 1, out + err  # the text file is unusable
    good, bad = json.loads(out)
    assert Path(good["path"]).resolve() == no_mpp_tiff.resolve()
    assert good["verdict"] == "ok" and good["mpp_source"] == "manifest" and good["output_name"] == "case-1"
    assert good["origin"] == f"{manifest}, row 2" and bad["origin"] == f"{manifest}, row 4"
    assert bad["verdict"] == "unusable"


def test_bad_manifest_row_is_one_line_naming_file_row_and_fix(tmp_path: Path, svs_slide: Path) -> None:
    manifest = tmp_path / "cohort.csv"
    manifest.write_text(f"path,mpp\n{svs_slide},0.5\n{svs_slide.with_name('other.svs')},abc\n")
    result = CliRunner().invoke(main, ["check", str(manifest), *FAST])
    assert result.exit_code == 2
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and str(manifest) in lines[0] and "row 3" in lines[0] and "mpp" in lines[0]
    assert "e.g. 0.25" in lines[0]


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("slide,mpp\na.svs,0.5\n", ["row 1", "'path'"]),
        ("path,magnification\na.svs,40\n", ["row 1", "'magnification'", "path, mpp, roi, output_name"]),
        ("path\n{slide}\n{slide}\n", ["row 3", "listed twice", "row 2"]),
        ("path,roi\n{slide},nowhere.geojson\n", ["row 2", "nowhere.geojson", "not found"]),
        ("path,output_name\n{slide},../escape\n", ["row 2", "output_name", "letters"]),
        ("path,mpp\n,0.5\n", ["row 2", "path is empty"]),
        ("path\n", ["lists no slides"]),
    ],
)
def test_manifest_errors_name_the_row_and_the_fix(
    tmp_path: Path, svs_slide: Path, text: str, words: list[str]
) -> None:
    manifest = tmp_path / "m.csv"
    manifest.write_text(text.format(slide=svs_slide))
    with pytest.raises(ManifestError) as info:
        read_manifest(manifest)
    message = str(info.value)
    assert "\n" not in message and str(manifest) in message
    for word in words:
        assert word in message


def test_manifest_reads_overrides_and_skips_blank_rows(tmp_path: Path) -> None:
    (tmp_path / "r.geojson").write_text("{}")
    manifest = tmp_path / "m.csv"
    manifest.write_text("\ufeffPath , MPP,roi,output_name\nsub/a.svs, 0.25 ,r.geojson,a1\n,,,\n/abs/b.tif,,,\n")
    a, b = read_manifest(manifest)
    assert a == SlideEntry(tmp_path / "sub/a.svs", 0.25, tmp_path / "r.geojson", "a1", f"{manifest}, row 2")
    assert b.path == Path("/abs/b.tif") and b.mpp is None and b.roi is None and b.output_name is None


def test_a_missing_input_is_a_usage_error_before_the_model_loads(tmp_path: Path, svs_slide: Path) -> None:
    code, out, err = _check(str(svs_slide), str(tmp_path / "nowhere.svs"))
    assert code == 2 and out == ""  # as for `run`: nothing checked
    assert err.strip() == f"error: {tmp_path / 'nowhere.svs'}: no such file or folder; check the path"


def test_table_names_slides_relative_to_the_cohort_folder(tmp_path: Path, svs_slide: Path, text_as_svs: Path) -> None:
    import shutil

    (tmp_path / "cohort" / "sub").mkdir(parents=True)
    shutil.copy(svs_slide, tmp_path / "cohort" / "good.svs")
    shutil.copy(text_as_svs, tmp_path / "cohort" / "sub" / "good.svs")  # the same name in a subfolder
    code, out, _ = _check(str(tmp_path / "cohort"))
    assert code == 1
    rows = [line.split()[0] for line in out.splitlines()[1:3]]
    assert sorted(rows) == ["good.svs", "sub/good.svs"]
    assert "sub/good.svs: unusable: no reader could open it" in out
    assert "in all as one run" in out


def test_tta_is_estimated_with_the_models_a_tta_run_loads_and_refused_where_a_run_refuses_it(svs_slide: Path) -> None:
    from wsiseg.preflight import CheckConfig, load_model

    loaded = load_model(CheckConfig(model="wsiseg-tiny", device="cpu", tta=True))
    assert loaded.segmentor.net.settings.tta and loaded.prompter.net.settings.tta
    refused = CliRunner().invoke(main, ["check", str(svs_slide), "--model", "classical", "--tta"])
    assert refused.exit_code == 2 and "--tta" in refused.output


def test_precision_is_estimated_with_the_network_a_run_loads_and_refused_where_a_run_refuses_it(svs_slide: Path) -> None:
    from wsiseg.preflight import CheckConfig, load_model

    loaded = load_model(CheckConfig(model="wsiseg-tiny", device="cpu", precision="fp32"))
    assert loaded.segmentor.precision == loaded.prompter.precision == "fp32"
    refused = CliRunner().invoke(main, ["check", str(svs_slide), "--model", "classical", "--precision", "bf16"])
    assert refused.exit_code == 2 and "--precision" in refused.output
    shown = CliRunner().invoke(main, ["check", str(svs_slide), "--precision", "fp32"])
    assert shown.exit_code == 0
    assert "estimates for --model wsiseg-tiny --device auto --precision fp32" in shown.output
    as_json = CliRunner().invoke(main, ["check", str(svs_slide), "--precision", "fp32", "--json"])
    assert as_json.exit_code == 0 and json.loads(as_json.output)[0]["network_precision"] == "fp32"


def test_prompter_is_estimated_with_the_prompter_a_run_loads_and_refused_where_a_run_refuses_it(
    svs_slide: Path,
) -> None:
    from wsiseg.models.tiny.prompter import TinyPrompter
    from wsiseg.preflight import CheckConfig, load_model

    loaded = load_model(CheckConfig(model="classical", prompter="wsiseg-tiny", device="cpu"))
    assert isinstance(loaded.prompter, TinyPrompter)
    assert not isinstance(load_model(CheckConfig(model="classical", device="cpu")).prompter, TinyPrompter)
    shown = CliRunner().invoke(main, ["check", str(svs_slide), "--model", "classical", "--prompter", "wsiseg-tiny",
                                      "--json"])
    assert shown.exit_code == 0, shown.output
    [row] = json.loads(shown.output)
    assert row["verdict"] == "ok" and row["nuclei"] > 0 and row["network_precision"] in ("fp32", "bf16")
    table = CliRunner().invoke(main, ["check", str(svs_slide), "--model", "classical", "--prompter", "wsiseg-tiny"])
    assert "estimates for --model classical --prompter wsiseg-tiny --device auto" in table.output
    refused = CliRunner().invoke(main, ["check", str(svs_slide), "--prompter", "no-such-model"])
    assert refused.exit_code == 2 and "no-such-model" in refused.output


def test_sample_windows_spread_over_the_stain_density_and_do_not_overlap() -> None:
    """Tissue fills the thumbnail; its left half is dark (nuclei), its right half pale: a stratified
    sample puts half its windows in each half, where the median window sits in one of them."""
    from types import SimpleNamespace

    import shapely

    from wsiseg.preflight import _sample_boxes

    mask = np.ones((64, 128), bool)
    thumbnail = np.full((64, 128, 3), 230, np.uint8)
    thumbnail[:, :64] = 90
    tissue = SimpleNamespace(mask=mask, downsample=16.0, size_l0=(128 * 16, 64 * 16))
    boxes = _sample_boxes(tissue, thumbnail, side_l0=160.0, count=4)
    assert boxes.area == pytest.approx(4 * 160.0**2)  # four windows, no two overlapping
    left = shapely.box(0, 0, 64 * 16, 64 * 16)
    assert shapely.intersection(boxes, left).area == pytest.approx(boxes.area / 2)
    x0, y0, x1, y1 = boxes.bounds  # inside the slide
    assert x0 >= 0 and y0 >= 0 and x1 <= 128 * 16 and y1 <= 64 * 16
    one = _sample_boxes(tissue, thumbnail, side_l0=160.0, count=1)
    assert one.area == pytest.approx(160.0**2)


@pytest.mark.parametrize("windows", [0, -1, 1.5, True])
def test_sample_windows_must_be_a_whole_number_of_at_least_one(windows: object) -> None:
    from wsiseg.preflight import CheckConfig

    with pytest.raises(ValueError, match="sample_windows"):
        CheckConfig(sample_windows=windows)  # type: ignore[arg-type]
