"""The wsiseg command: info, run (with bad slides among good ones), demo."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from wsiseg.cli.main import main


def test_info_reports_reader_size_levels_and_mpp(svs_slide: Path) -> None:
    result = CliRunner().invoke(main, ["info", str(svs_slide), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["reader"] == "openslide" and data["vendor"] == "aperio"
    assert data["width"] == 2048 and data["height"] == 1536
    assert data["mpp"] == [0.5, 0.5]
    assert [lvl["downsample"] for lvl in data["levels"]] == [1.0, 4.0, 16.0]
    text = CliRunner().invoke(main, ["info", str(svs_slide)]).output
    assert "0.5000 x 0.5000" in text


def test_info_on_a_text_file_is_one_clear_line(text_as_svs: Path) -> None:
    result = CliRunner().invoke(main, ["info", str(text_as_svs)])
    assert result.exit_code != 0
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and str(text_as_svs) in lines[0]


def test_one_bad_slide_does_not_stop_the_others(text_as_svs: Path, png_image: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(
        main, ["run", str(text_as_svs), str(png_image), "-o", str(tmp_path), "--mpp", "0.5", "--scheduler", "synchronous"]
    )
    assert result.exit_code == 1
    assert (tmp_path / f"{png_image.stem}.geojson.gz").exists()
    assert (tmp_path / f"{png_image.stem}.zarr").exists()
    errors = [ln for ln in result.output.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and str(text_as_svs) in errors[0] and "wsiseg.log" in errors[0]
    assert "Traceback" in (tmp_path / "wsiseg.log").read_text()
    ledger = json.loads((tmp_path / "wsiseg-ledger.json").read_text())
    assert ledger["slides"][str(text_as_svs)]["state"] == "failed"
    assert str(text_as_svs) in ledger["slides"][str(text_as_svs)]["reason"]
    assert ledger["slides"][str(png_image)]["state"] == "done"
    assert ledger["counts"]["done"] == 1 and ledger["counts"]["failed"] == 1


def test_missing_mpp_message_names_the_option(no_mpp_tiff: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["run", str(no_mpp_tiff), "-o", str(tmp_path), "--scheduler", "synchronous"])
    assert result.exit_code == 1
    assert "--mpp" in result.output


def test_bad_option_values_are_refused_before_any_work(svs_slide: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["run", str(svs_slide), "-o", str(tmp_path), "--overlap", "7",
                                       "--scheduler", "synchronous"])
    assert result.exit_code != 0
    assert "--overlap" in result.output


def test_demo_runs_the_whole_pipeline(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    result = CliRunner().invoke(main, ["demo", "--size", "768", "-o", str(out), "--scheduler", "synchronous"])
    assert result.exit_code == 0, result.output
    for name in ("demo-slide.geojson.gz", "demo-slide.zarr", "demo-slide.report.json", "demo-slide.report.html"):
        assert (out / name).exists(), name
    report = json.loads((out / "demo-slide.report.json").read_text())
    assert report["counts"]["nuclei"] > 50


def test_rerun_skips_completed_slides_unless_overwrite(svs_slide: Path, tmp_path: Path) -> None:
    args = ["run", str(svs_slide), "-o", str(tmp_path), "--scheduler", "synchronous", "--roi"]
    roi = tmp_path / "roi.geojson"
    roi.write_text(json.dumps({"type": "Polygon", "coordinates": [[[0, 0], [300, 0], [300, 300], [0, 300], [0, 0]]]}))
    first = CliRunner().invoke(main, [*args, str(roi)])
    assert first.exit_code == 0, first.output
    store = tmp_path / f"{svs_slide.stem}.zarr"
    stamp = (store / "zarr.json").stat().st_mtime_ns
    again = CliRunner().invoke(main, [*args, str(roi)])
    assert again.exit_code == 0 and "already done" in again.output
    assert (store / "zarr.json").stat().st_mtime_ns == stamp
    # the network arithmetic asked for by another name is the same run: "auto", or what it resolved to
    import torch

    from wsiseg.models.tiny.maps import resolve_precision

    for spelling in ("auto", resolve_precision("auto", torch.device("cpu"))):
        same = CliRunner().invoke(main, [*args, str(roi), "--precision", spelling])
        assert same.exit_code == 0 and "already done" in same.output, spelling
    redo = CliRunner().invoke(main, [*args, str(roi), "--overwrite"])
    assert redo.exit_code == 0 and "already done" not in redo.output


def test_a_rerun_after_an_interrupt_resumes_and_says_so(
    svs_slide: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dataclasses import replace

    import wsiseg.pipeline as pipeline

    read, segment, stitch = pipeline.SEGMENTOR_STAGES
    calls = {"n": 0}

    def interrupted_segment(*args: object) -> object:
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return segment.fn(*args)

    monkeypatch.setattr(pipeline, "SEGMENTOR_STAGES", (read, replace(segment, fn=interrupted_segment), stitch))
    args = ["run", str(svs_slide), "-o", str(tmp_path), "--scheduler", "synchronous", "--model", "classical",
            "--batch-tiles", "1"]
    first = CliRunner().invoke(main, args)
    assert first.exit_code != 0 and "resumed" not in first.output
    monkeypatch.setattr(pipeline, "SEGMENTOR_STAGES", (read, segment, stitch))
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0, again.output
    assert f"{svs_slide.name}: " in again.output and "(resumed: " in again.output
    fresh = CliRunner().invoke(main, [*args, "-o", str(tmp_path / "fresh")])
    assert fresh.exit_code == 0 and "resumed" not in fresh.output


def test_prompt_selection_needs_a_probability_prompter(svs_slide: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["run", str(svs_slide), "-o", str(tmp_path), "--prompt-selection", "centroid",
                                       "--scheduler", "synchronous"])
    assert result.exit_code == 2  # a usage error: refused before any slide is read
    assert "--prompt-selection" in result.output


def test_tta_with_a_model_without_dense_maps_is_a_usage_error(svs_slide: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["run", str(svs_slide), "-o", str(tmp_path), "--model", "classical", "--tta",
                                       "--scheduler", "synchronous"])
    assert result.exit_code == 2  # refused before any slide is read
    assert "--tta" in result.output and "'classical'" in result.output
    assert not list(tmp_path.glob("*.geojson*"))


def test_demo_slide_only_writes_a_slide_that_opens_and_runs_nothing(tmp_path: Path) -> None:
    from wsiseg.readers import open_slide

    slides = []
    for seed in (1, 2):
        path = tmp_path / "cohort" / f"case-{seed}.svs"  # the folder is created, as run -o creates its own
        result = CliRunner().invoke(main, ["demo", "--size", "256", "--seed", str(seed), "--slide-only", str(path)])
        assert result.exit_code == 0, result.output
        assert result.output.startswith(f"wrote synthetic slide {path} (256x256 px, ")
        slides.append(path.read_bytes())
    assert slides[0] != slides[1]  # another seed, another slide
    assert open_slide(tmp_path / "cohort" / "case-1.svs").properties.size_l0 == (256, 256)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["case-1.svs", "case-2.svs", "cohort"]  # no outputs
    bad = CliRunner().invoke(main, ["demo", "--slide-only", str(tmp_path / "x.tif")])
    assert bad.exit_code == 2 and "name it NAME.svs" in bad.stderr


def test_rerun_of_a_finished_run_starts_no_dask_cluster(svs_slide: Path, tmp_path: Path) -> None:
    import json

    out, log = tmp_path / "out", tmp_path / "events.jsonl"
    args = ["run", str(svs_slide), "-o", str(out), "--model", "classical", "--workers", "1", "--log", str(log)]
    first = CliRunner().invoke(main, args)
    assert first.exit_code == 0, first.output
    assert "Dask dashboard:" in first.output
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0, again.output
    assert "already done" in again.output and "Dask dashboard:" not in again.output
    events = [json.loads(line) for line in log.read_text().splitlines()]
    second = events[next(i for i, e in enumerate(events[1:], 1) if e["event"] == "run_start"):]
    assert [e["event"] for e in second] == ["run_start", "slide_skipped", "run_end"]


def test_precision_with_a_model_without_a_network_is_a_usage_error(svs_slide: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["run", str(svs_slide), "-o", str(tmp_path), "--model", "classical",
                                       "--precision", "fp32", "--scheduler", "synchronous"])
    assert result.exit_code == 2  # refused before any slide is read
    assert "--precision" in result.output and "'classical'" in result.output
    assert not list(tmp_path.glob("*.geojson*"))


def test_log_file_keeps_wsiseg_debug_but_not_numba_compiler_debug(tmp_path: Path) -> None:
    """numba logs tens of thousands of DEBUG lines (with "captured error" tracebacks) while it
    compiles kernels on a first run; they must not fill OUT/wsiseg.log."""
    import logging

    from wsiseg.cli.main import _setup_logging

    log_path = _setup_logging(tmp_path, verbose=False, quiet=True)
    try:
        logging.getLogger("numba.core.ssa").debug("numba compiler chatter")
        logging.getLogger("numba.core.ssa").warning("numba warning")
        logging.getLogger("wsiseg.pipeline").debug("wsiseg detail")
    finally:
        root = logging.getLogger()
        for handler in [h for h in root.handlers if getattr(h, "wsiseg_cli", False)]:
            root.removeHandler(handler)
            handler.close()
    assert log_path is not None
    text = log_path.read_text()
    assert "wsiseg detail" in text and "numba warning" in text
    assert "numba compiler chatter" not in text
