"""Output names never collide, and "already done" means the same file, parameters and model."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from click.testing import CliRunner

from wsiseg.cli.main import main
from wsiseg.cohort import output_names
from wsiseg.synthetic import SyntheticSpec, make_nuclei, write_generic_tiff, write_png, write_svs_like

SMALL = SyntheticSpec(1088, 640, mpp=0.5, seed=11, tissue_fraction=1.0)
OTHER = SyntheticSpec(1088, 640, mpp=0.5, seed=12, tissue_fraction=1.0, nucleus_density_per_mm2=1000.0)
RUN = ["--model", "classical", "--scheduler", "synchronous"]


def _report(out: Path, name: str) -> dict:
    return json.loads((out / f"{name}.report.json").read_text())


def test_same_stem_different_extension_gives_two_output_sets(tmp_path: Path) -> None:
    slides = tmp_path / "slides"
    slides.mkdir()
    svs_truth = write_svs_like(slides / "slide.svs", SMALL, make_nuclei(SMALL))
    tif_truth = write_generic_tiff(slides / "slide.tiff", OTHER, make_nuclei(OTHER))
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["run", str(slides), "-o", str(out), *RUN])
    assert result.exit_code == 0, result.output
    assert "outputs named slide_svs" in result.output and "outputs named slide_tiff" in result.output
    assert ": already done (" not in result.output
    svs, tif = _report(out, "slide_svs"), _report(out, "slide_tiff")
    assert svs["source"]["path"] == str((slides / "slide.svs").resolve())
    assert tif["source"]["path"] == str((slides / "slide.tiff").resolve())
    # each slide's own nuclei: the two synthetic slides hold different numbers of nuclei
    assert abs(svs["counts"]["nuclei"] - len(svs_truth)) < 0.15 * len(svs_truth)
    assert abs(tif["counts"]["nuclei"] - len(tif_truth)) < 0.15 * len(tif_truth)
    assert not (out / "slide.report.json").exists()


def test_a_replaced_scan_under_the_same_name_is_run_again(tmp_path: Path) -> None:
    slide = tmp_path / "slide.svs"
    first_truth = write_svs_like(slide, SMALL, make_nuclei(SMALL))
    out = tmp_path / "out"
    assert CliRunner().invoke(main, ["run", str(slide), "-o", str(out), *RUN]).exit_code == 0
    first = _report(out, "slide")["counts"]["nuclei"]
    again = CliRunner().invoke(main, ["run", str(slide), "-o", str(out), *RUN])
    assert ": already done (" in again.output
    # a new scan under the same name: different pixels, size and mtime
    replacement = tmp_path / "new.svs"
    second_truth = write_svs_like(replacement, OTHER, make_nuclei(OTHER))
    shutil.move(replacement, slide)
    st = slide.stat()
    os.utime(slide, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    rerun = CliRunner().invoke(main, ["run", str(slide), "-o", str(out), *RUN])
    assert rerun.exit_code == 0, rerun.output
    assert ": already done (" not in rerun.output
    second = _report(out, "slide")["counts"]["nuclei"]
    assert len(first_truth) != len(second_truth)
    assert abs(second - len(second_truth)) < abs(second - len(first_truth))
    assert first != second


def test_same_name_in_two_folders_is_named_by_folder(tmp_path: Path) -> None:
    for folder in ("caseA", "caseB"):
        (tmp_path / folder).mkdir()
        write_png(tmp_path / folder / "slide.png", SMALL, make_nuclei(SMALL))
    paths = [tmp_path / "caseA" / "slide.png", tmp_path / "caseB" / "slide.png"]
    names = output_names(paths, tmp_path / "out")
    assert names == {paths[0]: "caseA_slide_png", paths[1]: "caseB_slide_png"}


def test_unique_stems_keep_their_plain_names(tmp_path: Path) -> None:
    paths = [tmp_path / "a.svs", tmp_path / "b.svs", tmp_path / "c.ome.tiff"]
    assert list(output_names(paths, tmp_path / "out").values()) == ["a", "b", "c"]


def test_outputs_of_another_source_in_the_folder_are_not_overwritten(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "slide.report.json").write_text(json.dumps({"source": {"path": "/elsewhere/slide.svs"}}))
    here = tmp_path / "slide.svs"
    assert output_names([here], out) == {here: "slide_svs"}
    # the same source keeps its name (a rerun resumes or skips it)
    (out / "slide.report.json").write_text(json.dumps({"source": {"path": str(here.resolve())}}))
    assert output_names([here], out) == {here: "slide"}


def test_changed_parameters_are_not_already_done(tmp_path: Path) -> None:
    slide = tmp_path / "slide.png"
    write_png(slide, SMALL, make_nuclei(SMALL))
    out = tmp_path / "out"
    base = ["run", str(slide), "-o", str(out), "--mpp", "0.5", *RUN]
    assert CliRunner().invoke(main, base).exit_code == 0
    changed = CliRunner().invoke(main, [*base, "--min-score", "0.2"])
    assert changed.exit_code == 0 and ": already done (" not in changed.output
    assert _report(out, "slide")["parameters"]["min_score"] == 0.2
