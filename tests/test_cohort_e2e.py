"""A cohort as a lab hands it over: `check` flags the bad slides, `run` completes the good ones,
the summary lists each failure first with its reason, a rerun does only what is left, and the
terminal and `--log FILE` say how far the cohort got.

The cohort folder holds two good synthetic SVS slides, one cut at 60 % of its bytes, a text file
named `.svs`, a TIFF without resolution tags, an SVS with one level-0 JPEG tile overwritten with
zeros, and a DICOM folder.  No DICOM writer (pydicom, wsidicom, highdicom) is installed here, so
the DICOM folder holds several `.dcm` files that are no valid DICOM (a preamble, the `DICM` magic,
then zeros): the test asserts the one-line reason such a folder fails with.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import tifffile
from click.testing import CliRunner, Result

from wsiseg.cli import event_log, progress
from wsiseg.cli.event_log import EventLog
from wsiseg.cli.main import Progress, main
from wsiseg.synthetic import SyntheticSpec, make_nuclei, write_generic_tiff, write_svs_like


@pytest.fixture(autouse=True)
def _memory_is_plenty(monkeypatch: pytest.MonkeyPatch) -> None:
    """`check`'s memory warning depends on the free memory of the machine running the tests."""
    monkeypatch.setattr("wsiseg.preflight._available_memory_bytes", lambda: None)


FAST = ["--model", "classical", "--device", "cpu", "--scheduler", "synchronous"]
GOOD_SPECS = {
    "good-1.svs": SyntheticSpec(512, 512, mpp=0.5, seed=11, tissue_fraction=1.0),
    "good-2.svs": SyntheticSpec(512, 512, mpp=0.5, seed=12, tissue_fraction=1.0),
}
#: each bad slide and words its one-line reason must hold (from `check`, from `run`)
BAD = {
    "truncated.svs": ("truncated", "truncated"),
    "notes.svs": ("no reader could open it", "no reader could open it"),
    "no-mpp.tif": ("--mpp", "--mpp"),
    "damaged.svs": ("Not a JPEG file", "--on-bad-tile skip"),
    "dicom-slide": ("no reader could open it", "no reader could open it"),
}
EVENTS = ("run_start", "slide_start", "progress", "slide_done", "slide_failed", "slide_skipped", "run_end")


def _damage_tile(path: Path, index: int) -> None:
    """Overwrite the first half of one level-0 tile's compressed bytes with zeros (its size and offset unchanged)."""
    with tifffile.TiffFile(path) as tif:
        offset, count = tif.pages[0].dataoffsets[index], tif.pages[0].databytecounts[index]
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(bytes(count // 2))  # its header gone, its end intact: the decoder refuses it


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("cohort") / "slides"
    folder.mkdir()
    for name, spec in GOOD_SPECS.items():
        write_svs_like(folder / name, spec, make_nuclei(spec), levels=(1, 4))
    data = (folder / "good-1.svs").read_bytes()
    (folder / "truncated.svs").write_bytes(data[: int(len(data) * 0.6)])
    (folder / "notes.svs").write_text("this is a text file, not a slide\n")
    write_generic_tiff(folder / "no-mpp.tif", SyntheticSpec(256, 256, seed=5), mpp=None, levels=(1,))
    shutil.copy(folder / "good-2.svs", folder / "damaged.svs")
    _damage_tile(folder / "damaged.svs", 3)  # level 0, row 1 column 1 of 2 x 2 tiles of 256 px
    dicom = folder / "dicom-slide"
    dicom.mkdir()
    for k in range(3):  # one series of three instances, none of them valid
        (dicom / f"instance-{k}.dcm").write_bytes(bytes(128) + b"DICM" + bytes(256))
    return folder


def _run(*args: str) -> Result:
    return CliRunner().invoke(main, ["run", *args])


def _events(log: Path) -> list[dict[str, Any]]:
    lines = log.read_text().splitlines()
    records = [json.loads(line) for line in lines]  # every line one valid JSON object
    assert all(isinstance(r, dict) for r in records)
    return records


def _runs(records: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """The log's events split per run (each run_start starts one)."""
    runs: list[list[dict[str, Any]]] = []
    for r in records:
        if r["event"] == "run_start":
            runs.append([])
        runs[-1].append(r)
    return runs


@pytest.fixture(scope="module")
def first_run(cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Result, Path, Path]:
    base = tmp_path_factory.mktemp("first-run")
    out, log = base / "out", base / "events.jsonl"
    return _run(str(cohort), "-o", str(out), "--log", str(log), *FAST), out, log


@pytest.fixture(scope="module")
def second_run(cohort: Path, first_run: tuple[Result, Path, Path]) -> tuple[Result, dict[str, int]]:
    _, out, log = first_run
    stamps = {name: (out / f"{Path(name).stem}.zarr" / "zarr.json").stat().st_mtime_ns for name in GOOD_SPECS}
    return _run(str(cohort), "-o", str(out), "--log", str(log), *FAST), stamps


# ---------------------------------------------------------------- check


def test_check_flags_exactly_the_bad_slides_with_a_reason_each_and_exits_1(cohort: Path) -> None:
    result = CliRunner().invoke(main, ["check", str(cohort), "--json", "--model", "classical", "--device", "cpu"])
    assert result.exit_code == 1, result.output
    rows = {Path(r["path"]).name: r for r in json.loads(result.stdout)}
    assert set(rows) == set(GOOD_SPECS) | set(BAD)
    for name in GOOD_SPECS:
        assert rows[name]["verdict"] == "ok" and rows[name]["reasons"] == [], rows[name]
    for name, (words, _) in BAD.items():
        row = rows[name]
        assert row["verdict"] == "unusable", row
        [reason] = row["reasons"]
        assert "\n" not in reason and not reason.startswith(f"{cohort / name}: ") and words in reason, reason


# ---------------------------------------------------------------- run


def test_run_completes_the_good_slides_with_nuclei_near_the_truth_and_exits_1(
    first_run: tuple[Result, Path, Path]
) -> None:
    result, out, _ = first_run
    assert result.exit_code == 1, result.output
    for name, spec in GOOD_SPECS.items():
        stem = Path(name).stem
        for suffix in (".geojson.gz", ".zarr", ".report.json", ".report.html"):
            assert (out / f"{stem}{suffix}").exists(), stem + suffix
        nuclei = json.loads((out / f"{stem}.report.json").read_text())["counts"]["nuclei"]
        truth = len(make_nuclei(spec))
        assert abs(nuclei - truth) <= 0.15 * truth, (name, nuclei, truth)
        assert f"{name}: {nuclei:,} nuclei ->" in result.stdout
    for name in BAD:
        assert not list(out.glob(f"{Path(name).stem}.*")), name  # nothing half-written for a failure
    errors = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(errors) == len(BAD) and all(ln.startswith("error: ") for ln in errors)


def test_run_prints_plain_cohort_lines_when_not_on_a_terminal(first_run: tuple[Result, Path, Path]) -> None:
    result, _, _ = first_run
    starts = [ln for ln in result.stdout.splitlines() if ln.startswith("slide ")]
    assert len(starts) == 7 and starts[0].startswith("slide 1/7: ") and starts[-1].startswith("slide 7/7: ")
    assert "\r" not in result.stdout + result.stderr
    assert starts[-1].startswith("slide 7/7: truncated.svs | 2/7 slides done, 4 failed | cohort ETA ")  # so far
    assert "2 done, 0 already done, 5 failed" in result.stdout


def test_summary_lists_every_failure_first_with_its_reason(cohort: Path, first_run: tuple[Result, Path, Path]) -> None:
    _, out, _ = first_run
    with (out / "summary.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    states = [r["state"] for r in rows]
    assert states == ["failed"] * len(BAD) + ["done"] * len(GOOD_SPECS)
    failed = {Path(r["slide"]).name: r["reason"] for r in rows[: len(BAD)]}
    assert set(failed) == set(BAD)
    for name, (_, words) in BAD.items():
        assert not failed[name].startswith(f"{cohort / name}: ") and words in failed[name], failed[name]
        assert "\n" not in failed[name]
    assert all(int(r["nuclei"]) > 0 and r["reason"] == "" for r in rows[len(BAD):])
    page = (out / "summary.html").read_text()
    assert all(page.index(name) < page.index("good-1.svs") for name in BAD)


def test_rerun_does_nothing_for_finished_slides_and_retries_only_the_failed(
    cohort: Path, first_run: tuple[Result, Path, Path], second_run: tuple[Result, dict[str, int]]
) -> None:
    _, out, log = first_run
    again, stamps = second_run
    assert again.exit_code == 1, again.output
    for name in GOOD_SPECS:
        assert f"{name}: already done" in again.stdout
        assert (out / f"{Path(name).stem}.zarr" / "zarr.json").stat().st_mtime_ns == stamps[name]
    assert "0 done, 2 already done, 5 failed" in again.stdout
    errors = [ln for ln in again.stderr.splitlines() if ln.strip()]
    assert len(errors) == len(BAD) and all(sum(str(cohort / n) in ln for ln in errors) == 1 for n in BAD)  # again
    run2 = _runs(_events(log))[1]
    assert {Path(e["slide"]).name for e in run2 if e["event"] == "slide_start"} == set(BAD)
    assert {Path(e["slide"]).name for e in run2 if e["event"] == "slide_skipped"} == set(GOOD_SPECS)
    assert all(e["reason"] == "already done" for e in run2 if e["event"] == "slide_skipped")
    assert run2[-1]["event"] == "run_end"
    assert (run2[-1]["done"], run2[-1]["skipped"], run2[-1]["failed"], run2[-1]["exit_code"]) == (0, 2, 5, 1)
    # the ledger and the summary still show the finished slides as done, with their nuclei
    ledger = json.loads((out / "wsiseg-ledger.json").read_text())["slides"]
    for name in GOOD_SPECS:
        entry = next(e for k, e in ledger.items() if Path(k).name == name)
        assert entry["state"] == "done" and entry["nuclei"] > 0
    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert sum(r["state"] == "done" for r in rows) == len(GOOD_SPECS)


def test_log_holds_one_json_event_per_line_for_the_run_and_each_slide(
    cohort: Path, first_run: tuple[Result, Path, Path]
) -> None:
    _, out, log = first_run
    records = _events(log)
    assert all(r["event"] in EVENTS for r in records)
    assert all("time" in r and "slide" in r for r in records)
    assert all(r["time"][:4].isdigit() and "T" in r["time"] and r["time"][-6] in "+-" for r in records)  # ISO, offset
    run1 = _runs(records)[0]
    start, end = run1[0], run1[-1]
    assert start["event"] == "run_start" and start["slide"] is None and start["slides"] == 7
    assert start["parameters"]["model"] == "classical"
    assert end["event"] == "run_end"
    assert (end["done"], end["skipped"], end["failed"], end["pending"], end["exit_code"]) == (2, 0, 5, 0, 1)
    by_slide: dict[str, list[dict[str, Any]]] = {}
    for r in run1[1:-1]:
        by_slide.setdefault(Path(r["slide"]).name, []).append(r)
    assert set(by_slide) == set(GOOD_SPECS) | set(BAD)
    for name, (_, words) in BAD.items():
        kinds = [r["event"] for r in by_slide[name]]
        assert kinds[0] == "slide_start" and kinds[-1] == "slide_failed", kinds
        assert words in by_slide[name][-1]["reason"] and by_slide[name][-1]["slide"] == str(cohort / name)
    for name in GOOD_SPECS:
        events = by_slide[name]
        assert events[0]["event"] == "slide_start" and events[-1]["event"] == "slide_done"
        done = events[-1]
        report = json.loads((out / f"{Path(name).stem}.report.json").read_text())
        assert done["nuclei"] == report["counts"]["nuclei"] and done["seconds"] > 0
        assert all(Path(p).exists() for p in done["outputs"].values())
        steps = [e for e in events if e["event"] == "progress"]
        assert {e["stage"] for e in steps} == {"prompter", "segmentor"}
        last = [e for e in steps if e["stage"] == "segmentor"][-1]  # a stage's last batch is always logged
        assert last["tiles_done"] == last["tiles_total"] and last["unit"] == "nuclei"
        assert last["count"] == done["nuclei"]


def test_quiet_run_prints_nothing_but_errors(cohort: Path, first_run: tuple[Result, Path, Path]) -> None:
    _, out, _ = first_run
    result = _run(str(cohort), "-o", str(out), "-q", *FAST)
    assert result.exit_code == 1
    assert result.stdout == ""
    assert all(ln.startswith("error: ") for ln in result.stderr.splitlines() if ln.strip())


def test_a_log_file_that_cannot_be_written_is_a_usage_error(cohort: Path, tmp_path: Path) -> None:
    result = _run(str(cohort / "good-1.svs"), "-o", str(tmp_path / "out"), "--log", str(tmp_path / "no" / "x.jsonl"),
                  *FAST)
    assert result.exit_code == 2 and "--log" in result.stderr
    assert not (tmp_path / "out" / "good-1.report.json").exists()


@pytest.mark.parametrize("quiet", [False, True])
def test_dask_dashboard_address_is_printed_once_unless_quiet(cohort: Path, tmp_path: Path, quiet: bool) -> None:
    log = tmp_path / "events.jsonl"
    args = [str(cohort / "good-1.svs"), "-o", str(tmp_path / "out"), "--model", "classical", "--device", "cpu",
            "--workers", "1", "--log", str(log)]
    result = _run(*args, *(["-q"] if quiet else []))
    assert result.exit_code == 0, result.output
    [cluster] = [e for e in _events(log) if e["event"] == "cluster_start"]
    assert cluster["dashboard"].startswith("http://") and cluster["workers"] == 1
    shown = [ln for ln in result.output.splitlines() if ln.startswith("Dask") or cluster["dashboard"] in ln]
    assert shown == ([] if quiet else [f"Dask dashboard: {cluster['dashboard']}"])


# ---------------------------------------------------------------- the progress line and the event log, alone


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_cohort_progress_is_one_line_in_place_with_slides_stage_nuclei_and_cohort_eta(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = _Clock()
    monkeypatch.setattr(progress, "time", SimpleNamespace(monotonic=clock))  # this module's clock only
    terminal, plain = _Terminal(), io.StringIO()
    bar = Progress(enabled=True, stream=terminal, slides_total=4, plain_stream=plain)
    bar.start_slide("a.svs")
    clock.now = 10.0
    bar("prompter", 10, 10, 900)
    clock.now = 20.0
    bar("segmentor", 10, 10, 800)
    bar.end_slide("done")  # 20 tiles in 20 s: 1 s per tile, 20 tiles per slide
    bar.start_slide("b.svs")
    bar.end_slide("failed")  # no tiles, no time
    bar.start_slide("c.svs")
    clock.now = 25.0
    bar("prompter", 5, 10, 300)  # 25 tiles in 25 s; left: c's 5 + its segmentor's ~10, and slide d's 20
    text = terminal.getvalue()
    assert "\n" not in text and plain.getvalue() == ""  # one line, rewritten in place
    line = text.split("\r")[-1]
    assert line.startswith("1/4 slides done, 1 failed | c.svs: prompter 5/10 tiles, 300 points")
    assert line.endswith("cohort ETA 35s")
    clock.now = 25.5
    bar("prompter", 10, 10, 600)
    clock.now = 26.0
    bar("segmentor", 2, 10, 123)  # 32 tiles in 26 s; left: 8 of c's and slide d's 20
    assert "c.svs: segmentor 2/10 tiles, 123 nuclei" in terminal.getvalue().split("\r")[-1]
    assert bar.eta_s() == pytest.approx(26 / 32 * 28)
    bar.end_slide("done")
    assert terminal.getvalue().split("\r")[-1].strip() == ""  # cleared before the slide's own line


def test_cohort_progress_writes_plain_lines_when_not_on_a_terminal_and_nothing_when_quiet(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = _Clock()
    monkeypatch.setattr(progress, "time", SimpleNamespace(monotonic=clock))  # this module's clock only
    stderr, stdout = io.StringIO(), io.StringIO()
    bar = Progress(enabled=True, stream=stderr, slides_total=2, plain_stream=stdout, plain_every_s=60)
    bar.start_slide("a.svs")
    clock.now = 30.0
    bar("prompter", 1, 4, 10)  # under a minute: no line
    clock.now = 61.0
    bar("prompter", 2, 4, 20)
    lines = stdout.getvalue().splitlines()
    # 30.5 s per tile; left: 2 + 4 (the segmentor's, taken as the prompter's) of a.svs, 8 of the next slide
    assert lines == ["slide 1/2: a.svs | 0/2 slides done | cohort ETA unknown",
                     "0/2 slides done | a.svs: prompter 2/4 tiles, 20 points | cohort ETA 7m07s"]
    assert stderr.getvalue() == ""
    quiet_err, quiet_out = _Terminal(), io.StringIO()
    quiet = Progress(enabled=False, stream=quiet_err, slides_total=2, plain_stream=quiet_out, plain_every_s=0)
    quiet.start_slide("a.svs")
    quiet("prompter", 2, 4, 20)
    quiet.end_slide("done")
    assert quiet_err.getvalue() == quiet_out.getvalue() == ""


def test_progress_events_are_a_stages_ends_and_at_most_one_per_interval(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    clock = _Clock()
    monkeypatch.setattr(event_log, "time", SimpleNamespace(monotonic=clock))
    path = tmp_path / "events.jsonl"
    with EventLog(path, progress_every_s=5.0) as events:
        for t, done in ((0, 1), (1, 2), (2, 3), (6, 4), (7, 5), (8, 10)):
            clock.now = t
            events.progress(Path("a.svs"), "segmentor", done, 10, done * 3)
        clock.now = 8.5
        events.progress(Path("a.svs"), "prompter", 1, 4, 2)  # a new stage: logged at once
    logged = [(r["stage"], r["tiles_done"]) for r in _events(path)]
    assert logged == [("segmentor", 1), ("segmentor", 4), ("segmentor", 10), ("prompter", 1)]


def test_cohort_eta_counts_the_last_slide_before_its_first_tiles_are_known(monkeypatch: pytest.MonkeyPatch) -> None:
    """The last slide has started but no stage has reported its tiles: it still has a finished
    slide's worth of tiles left, not none (the ETA read 0 s there)."""
    clock = _Clock()
    monkeypatch.setattr(progress, "time", SimpleNamespace(monotonic=clock))
    bar = Progress(enabled=True, stream=_Terminal(), slides_total=2, plain_stream=io.StringIO())
    bar.start_slide("a.svs")
    clock.now = 10.0
    bar("prompter", 10, 10, 900)
    clock.now = 20.0
    bar("segmentor", 10, 10, 800)
    bar.end_slide("done")  # 20 tiles in 20 s
    bar.start_slide("b.svs")
    clock.now = 21.0
    assert bar.eta_s() == pytest.approx(21 / 20 * 20)  # b's 20 tiles (as a's) at 21 s per 20 tiles
    first = Progress(enabled=True, stream=_Terminal(), slides_total=1, plain_stream=io.StringIO())
    first.start_slide("only.svs")
    assert first.eta_s() is None  # nothing measured yet
