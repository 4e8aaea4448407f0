"""Cohort outputs: OUT/summary.csv and OUT/summary.html after every run; manifests for run."""

from __future__ import annotations

import csv
import html
import json
import os
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import pytest
from click.testing import CliRunner

from wsiseg.cli.main import main
from wsiseg.slide_manifest import ManifestError, SlideEntry, requested_output_names
from wsiseg.summary import render_html, summary_rows, write_summary

FAST = ["--model", "classical", "--device", "cpu", "--scheduler", "synchronous"]


class _Refs(HTMLParser):
    """Every href and src of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.hrefs: list[str] = []
        self.srcs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for key, value in attrs:
            if key == "href" and value:
                self.hrefs.append(value)
            if key == "src" and value:
                self.srcs.append(value)


def _refs(page: Path) -> _Refs:
    parser = _Refs()
    parser.feed(page.read_text())
    return parser


def _csv_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_run_with_a_failure_lists_it_first_with_its_reason(
    text_as_svs: Path, png_image: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    args = ["run", str(png_image), str(text_as_svs), "-o", str(out), "--mpp", "0.5", *FAST]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1, result.output
    failed, done = _csv_rows(out / "summary.csv")
    assert failed["slide"] == str(text_as_svs) and failed["state"] == "failed"
    assert failed["reason"].startswith("no reader could open it")  # the slide column names the slide
    assert failed["nuclei"] == "" and failed["report"] == ""
    assert done["slide"] == str(png_image) and done["state"] == "done" and done["reason"] == ""
    report = json.loads((out / f"{png_image.stem}.report.json").read_text())
    assert int(done["nuclei"]) == report["counts"]["nuclei"] > 0
    assert done["model"] == "classical" and float(done["mpp"]) == 0.5 and float(done["time_s"]) > 0
    assert done["precision"] == ""  # classical has no network
    assert done["report"] == f"{png_image.stem}.report.html"

    page = out / "summary.html"
    refs = _refs(page)
    assert refs.hrefs == [f"{png_image.stem}.report.html"]  # the failed slide has no report to link
    assert all((out / unquote(h)).is_file() for h in refs.hrefs)
    assert refs.srcs == [] and "<link" not in page.read_text()  # self-contained: nothing to fetch
    text = page.read_text()
    assert text.index(text_as_svs.name) < text.index(png_image.name)  # failures first
    assert "no reader could open it" in text


def test_manifest_gives_run_per_slide_mpp_and_output_name(tmp_path: Path, no_mpp_tiff: Path) -> None:
    manifest = tmp_path / "lists" / "cohort.csv"
    manifest.parent.mkdir()
    manifest.write_text(f"path,mpp,output_name\n{os.path.relpath(no_mpp_tiff, manifest.parent)},0.5,case-7\n")
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["run", str(manifest), "-o", str(out), *FAST])
    assert result.exit_code == 0, result.output
    assert (out / "case-7.geojson.gz").is_file() and (out / "case-7.zarr").is_dir()
    assert json.loads((out / "case-7.report.json").read_text())["mpp"] == 0.5
    [row] = _csv_rows(out / "summary.csv")
    assert row["state"] == "done" and row["report"] == "case-7.report.html"
    assert _refs(out / "summary.html").hrefs == ["case-7.report.html"]
    again = CliRunner().invoke(main, ["run", str(manifest), "-o", str(out), *FAST])
    assert again.exit_code == 0 and "already done" in again.output  # the requested name is the slide's name


def test_an_mpp_far_from_the_files_own_is_warned_in_the_report_and_the_summary(
    tmp_path: Path, svs_slide: Path
) -> None:
    """The file says 0.5 µm/px: a run given 1 (a typo, or a mislabelled scan) says so where a
    cohort's results are read, as `wsiseg check` does; a run given the file's own value does not."""
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["run", str(svs_slide), "-o", str(out), "--mpp", "1", *FAST])
    assert result.exit_code == 0, result.output
    report = json.loads((out / f"{svs_slide.stem}.report.json").read_text())
    assert report["mpp"] == 1 and report["file_mpp"] == pytest.approx(0.5)
    warning = "--mpp (or the slide manifest's mpp) 1 µm/px replaces the file's own 0.5 (2.0x coarser)"
    [row] = _csv_rows(out / "summary.csv")
    assert warning in row["warnings"]
    assert warning in html.unescape((out / f"{svs_slide.stem}.report.html").read_text())
    assert warning in html.unescape((out / "summary.html").read_text())
    agreeing = tmp_path / "agreeing"
    result = CliRunner().invoke(main, ["run", str(svs_slide), "-o", str(agreeing), "--mpp", "0.5", *FAST])
    assert result.exit_code == 0, result.output
    [row] = _csv_rows(agreeing / "summary.csv")
    assert "replaces the file's own" not in row["warnings"]


def test_bad_manifest_is_a_usage_error_before_any_work(tmp_path: Path) -> None:
    manifest = tmp_path / "cohort.csv"
    manifest.write_text("path,mpp\nmissing.svs,fast\n")
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["run", str(manifest), "-o", str(out), *FAST])
    assert result.exit_code == 2
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and str(manifest) in lines[0] and "row 2" in lines[0]
    assert not (out / "summary.csv").exists()


def test_requested_output_names_follow_the_collision_rules(tmp_path: Path) -> None:
    a, b = tmp_path / "x" / "a.svs", tmp_path / "y" / "b.svs"
    auto = {a: "a", b: "b"}
    same = [SlideEntry(a, output_name="case", origin="m.csv, row 2"),
            SlideEntry(b, output_name="CASE", origin="m.csv, row 3")]
    with pytest.raises(ManifestError, match="row 2: output_name 'case' is also"):
        requested_output_names(auto, same, tmp_path)
    with pytest.raises(ManifestError, match="row 2: output_name 'b'"):  # another slide's automatic name
        requested_output_names(auto, [SlideEntry(a, output_name="b", origin="m.csv, row 2")], tmp_path)
    (tmp_path / "case.report.json").write_text(json.dumps({"source": {"path": str(tmp_path / "other.svs")}}))
    with pytest.raises(ManifestError, match="another slide's outputs"):
        requested_output_names(auto, [SlideEntry(a, output_name="case", origin="m.csv, row 2")], tmp_path)
    named = requested_output_names(auto, [SlideEntry(a, output_name="case-a", origin="m.csv, row 2")], tmp_path)
    assert named == {a: "case-a", b: "b"}


def test_summary_rows_take_tissue_area_from_the_report_and_leave_unknowns_empty(tmp_path: Path) -> None:
    def report(name: str, **extra: object) -> str:
        path = tmp_path / f"{name}.report.json"
        data = {"counts": {"nuclei": 500, "nuclei_touching_tile_edge": 3}, "timings_s": {"total": 12.34},
                "parameters": {"model": "wsiseg-tiny", "prompter": None}, "mpp": 0.25, **extra}
        path.write_text(json.dumps(data))
        return str(path)

    ledger = {"slides": {
        "s/with_area.svs": {"state": "done", "report": report("with_area", tissue_area_mm2=2.0,
                                                               model={"precision": "bf16"})},
        "s/no_area.svs": {"state": "skipped", "report": report("no_area")},
        "s/bad.svs": {"state": "failed", "reason": "s/bad.svs: file is truncated; copy it again"},
        "s/later.svs": {"state": "pending"},
        "s/lost_report.svs": {"state": "done", "nuclei": 7, "report": str(tmp_path / "gone.report.json")},
    }}
    (tmp_path / "wsiseg-ledger.json").write_text(json.dumps(ledger))
    rows = summary_rows(tmp_path)
    assert [r.slide for r in rows] == ["s/bad.svs", "s/later.svs", "s/with_area.svs", "s/no_area.svs",
                                       "s/lost_report.svs"]
    bad, later, with_area, no_area, lost = rows
    assert bad.reason == "file is truncated; copy it again" and bad.nuclei is None
    assert with_area.tissue_area_mm2 == 2.0 and with_area.nuclei_per_mm2 == 250.0 and with_area.time_s == 12.3
    assert with_area.warnings == ("3 nuclei reached their tile's edge",) and with_area.model == "wsiseg-tiny"
    assert with_area.report == "with_area.report.json"  # no HTML report beside it: the JSON is linked
    assert no_area.tissue_area_mm2 is None and no_area.nuclei_per_mm2 is None and no_area.nuclei == 500
    assert with_area.precision == "bf16" and no_area.precision is None  # a report without it: empty
    assert lost.nuclei == 7 and lost.report is None and later.state == "pending"
    csv_path, html_path = write_summary(tmp_path)
    lines = csv_path.read_text().splitlines()
    assert lines[0] == "slide,state,reason,nuclei,tissue_area_mm2,nuclei_per_mm2,time_s,model,precision,mpp,warnings,report"
    assert ",wsiseg-tiny,bf16,0.25," in lines[3]
    assert "not applicable (precision: a model without a network" in html_path.read_text()
    assert lines[1].startswith("s/bad.svs,failed,file is truncated; copy it again,")
    assert _refs(html_path).hrefs == ["with_area.report.json", "no_area.report.json"]


def test_summary_html_escapes_what_it_shows() -> None:
    from wsiseg.summary import SummaryRow

    page = render_html([SummaryRow("a<b>.svs", "failed", reason="<script>x</script>")])
    assert "<script>" not in page and "&lt;script&gt;" in page and "a&lt;b&gt;.svs" in page
