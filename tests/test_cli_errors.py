"""The command line's rule: a run gives the right result, or says in ONE line what is wrong and
how to fix it.  Exit status 0: all done; 1: some slides failed; 2: usage error (nothing ran).

Damaged slides are synthetic SVS files with the start of one level-0 JPEG tile overwritten
with zeros (the decoder then says "Not a JPEG file"), or its end cut (wsiseg's end-marker check); --model classical keeps the runs fast.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tifffile
from click.testing import CliRunner

from wsiseg.cli.main import Progress, main
from wsiseg.synthetic import (
    SyntheticSpec,
    make_nuclei,
    render_region,
    truth_mask,
    write_generic_tiff,
    write_png,
    write_svs_like,
)

SPEC = SyntheticSpec(512, 512, mpp=0.5, seed=3, tissue_fraction=1.0)
#: the damaged tile: level 0, 256 px tiles, row 1 column 1 (tile index 3 of 2 x 2)
BAD_X, BAD_Y, BAD_SIZE, BAD_INDEX = 256, 256, 256, 3
FAST = ["--model", "classical", "--scheduler", "synchronous"]


def _damage_tile(path: Path, index: int, page: int = 0) -> None:
    """Overwrite the first half of one tile's compressed bytes with zeros (its size and offset
    unchanged)."""
    with tifffile.TiffFile(path) as tif:
        offset, count = tif.pages[page].dataoffsets[index], tif.pages[page].databytecounts[index]
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(bytes(count // 2))  # its header gone, its end intact: the decoder refuses it


def _cut_tile(path: Path, index: int, how: str) -> None:
    """Damage one tile the way decoders may accept (TiffSlide decodes both with grey, no
    error): its second half zeroed ("tail"), or its byte count shortened to half ("short")."""
    with tifffile.TiffFile(path, mode="r+b") as tif:
        page = tif.pages[0]
        offset, count = page.dataoffsets[index], page.databytecounts[index]
        if how == "short":
            counts = list(page.databytecounts)
            counts[index] = count // 2
            page.tags["TileByteCounts"].overwrite(counts)
            return
    with open(path, "r+b") as f:
        f.seek(offset + count // 2)
        f.write(bytes(count - count // 2))


@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("cli-errors")
    clean = folder / "clean.svs"
    write_svs_like(clean, SPEC, make_nuclei(SPEC), levels=(1, 4))
    damaged = folder / "damaged.svs"
    shutil.copy(clean, damaged)
    _damage_tile(damaged, BAD_INDEX)
    for how in ("tail", "short"):
        shutil.copy(clean, folder / f"{how}.svs")
        _cut_tile(folder / f"{how}.svs", BAD_INDEX, how)
    no_mpp = folder / "no-mpp.tif"
    write_generic_tiff(no_mpp, SyntheticSpec(256, 256, seed=5), mpp=None, levels=(1,))
    return {"clean": clean, "damaged": damaged, "no_mpp": no_mpp, "tail": folder / "tail.svs", "short": folder / "short.svs"}


def _error_lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.strip()]


def _centroids(zarr_path: Path) -> np.ndarray:
    from wsiseg.writers.zarr_store import open_nuclei

    return np.asarray(open_nuclei(zarr_path).column("centroid"), np.float64).reshape(-1, 2)


def _in_box(xy: np.ndarray, margin: float) -> np.ndarray:
    return (
        (xy[:, 0] > BAD_X - margin) & (xy[:, 0] < BAD_X + BAD_SIZE + margin)
        & (xy[:, 1] > BAD_Y - margin) & (xy[:, 1] < BAD_Y + BAD_SIZE + margin)
    )


@contextlib.contextmanager
def _port_taken(port: int) -> Iterator[None]:
    """Hold `port` the way another Dask dashboard would (if something else holds it, so be it)."""
    sock = socket.socket()
    try:
        sock.bind(("", port))
        sock.listen()
    except OSError:
        pass
    try:
        yield
    finally:
        sock.close()


# ---------------------------------------------------------------- item 9: a damaged tile


def test_damaged_tile_in_a_worker_fails_in_one_line_and_worker_logs_go_to_the_log_file(
    slides: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "wsiseg.cli.main", "run", str(slides["damaged"]), "-o", str(out), "-q",
           "--model", "classical", "--workers", "1", "--no-tissue-detection"]
    with _port_taken(8787):  # another cluster's dashboard: no warnings about it either
        # cwd outside the source tree: `python -m` must import the installed package
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 1, done.stderr
    lines = _error_lines(done.stderr)
    assert len(lines) == 1, done.stderr  # not Dask's worker tracebacks, not dashboard warnings
    line = lines[0]
    assert line.startswith("error: ") and line.count(str(slides["damaged"])) == 1
    assert "damaged" in line and "level 0" in line and f"x={BAD_X} y={BAD_Y} {BAD_SIZE}x{BAD_SIZE}" in line
    assert "--on-bad-tile skip" in line and "wsiseg.log" in line
    log = (out / "wsiseg.log").read_text()
    assert "[worker " in log and "Compute Failed" in log  # the worker's own records, in the file
    assert not list(out.glob("damaged.*")) and not list(out.glob("*.partial-*"))
    ledger = json.loads((out / "wsiseg-ledger.json").read_text())
    assert ledger["slides"][str(slides["damaged"])]["state"] == "failed"


def test_damaged_tile_met_by_tissue_detection_fails_in_one_line(slides: dict[str, Path], tmp_path: Path) -> None:
    # a small slide's tissue thumbnail reads level 0, in the main process
    result = CliRunner().invoke(main, ["run", str(slides["damaged"]), "-o", str(tmp_path), *FAST])
    assert result.exit_code == 1
    lines = _error_lines(result.stderr)
    assert len(lines) == 1 and f"level 0, region x={BAD_X} y={BAD_Y}" in lines[0] and "damaged" in lines[0]


def test_skip_paints_the_damaged_tile_as_background_and_lists_it_in_the_report(
    slides: dict[str, Path], tmp_path: Path
) -> None:
    clean = CliRunner().invoke(main, ["run", str(slides["clean"]), "-o", str(tmp_path / "clean"), *FAST])
    assert clean.exit_code == 0, clean.output
    result = CliRunner().invoke(
        main, ["run", str(slides["damaged"]), "-o", str(tmp_path / "skip"), *FAST, "--on-bad-tile", "skip"]
    )
    assert result.exit_code == 0, result.output
    assert "1 unreadable tiles painted as background" in result.stdout
    report = json.loads((tmp_path / "skip" / "damaged.report.json").read_text())
    [tile] = report["unreadable_tiles"]
    assert (tile["level"], tile["x_l0"], tile["y_l0"], tile["width_l0"], tile["height_l0"]) == (
        0, BAD_X, BAD_Y, BAD_SIZE, BAD_SIZE)
    assert "JPEG" in tile["reason"] and report["counts"]["unreadable_tiles"] == 1
    assert report["parameters"]["on_bad_tile"] == "skip"
    assert "Unreadable tiles" in (tmp_path / "skip" / "damaged.report.html").read_text()
    skipped, full = _centroids(tmp_path / "skip" / "damaged.zarr"), _centroids(tmp_path / "clean" / "clean.zarr")
    assert not _in_box(skipped, 0).any() and _in_box(full, 0).sum() > 5  # nothing found on the blank tile
    away_s, away_f = skipped[~_in_box(skipped, 32)], full[~_in_box(full, 32)]
    assert len(away_s) == len(away_f) > 50  # the rest of the slide is not lost
    order_s, order_f = np.lexsort(away_s.T[::-1]), np.lexsort(away_f.T[::-1])
    assert np.abs(away_s[order_s] - away_f[order_f]).max() < 0.5
    clean_report = json.loads((tmp_path / "clean" / "clean.report.json").read_text())
    assert clean_report["unreadable_tiles"] == [] and clean_report["counts"]["unreadable_tiles"] == 0


@pytest.mark.parametrize("backend", ["openslide", "tiffslide"])
def test_guarded_reader_names_the_damaged_tile_and_keeps_reading_the_rest(
    slides: dict[str, Path], backend: str
) -> None:
    from wsiseg.readers import open_slide
    from wsiseg.workers import DamagedSlideError, GuardedReader

    region = ((100, 100), 0, (400, 400))
    with pytest.raises(DamagedSlideError, match=rf"level 0, region x={BAD_X} y={BAD_Y} {BAD_SIZE}x{BAD_SIZE}"):
        GuardedReader(open_slide(slides["damaged"], backend=backend)).read_region(*region)
    reader = GuardedReader(open_slide(slides["damaged"], backend=backend), "skip")
    got = reader.read_region(*region)
    want = open_slide(slides["clean"], backend=backend).read_region(*region)
    changed = np.any(got != want, axis=2)
    ys, xs = np.nonzero(changed)
    assert (ys.min() + 100, xs.min() + 100, ys.max() + 100, xs.max() + 100) == (256, 256, 499, 499)
    assert (got[156:, 156:] == 255).all()  # the damaged tile's part of the region: background
    assert [(t.level, t.x_l0, t.y_l0) for t in reader.take_bad_tiles()] == [(0, BAD_X, BAD_Y)]
    assert reader.take_bad_tiles() == []  # each tile reported once
    # the reader still reads after the decoder's failure (OpenSlide refuses every read after one)
    top_left = open_slide(slides["clean"], backend=backend).read_region((0, 0), 0, (200, 200))
    assert np.array_equal(reader.read_region((0, 0), 0, (200, 200)), top_left)


@pytest.mark.parametrize("backend", ["openslide", "tiffslide"])
@pytest.mark.parametrize("how", ["tail", "short"])
def test_a_tile_cut_short_that_decoders_accept_is_named_and_skipped_like_any_damaged_tile(
    slides: dict[str, Path], backend: str, how: str
) -> None:
    from wsiseg.readers import open_slide
    from wsiseg.workers import DamagedSlideError, GuardedReader

    region = ((100, 100), 0, (400, 400))
    with pytest.raises(DamagedSlideError, match=rf"level 0, region x={BAD_X} y={BAD_Y} .*end-of-image marker"):
        GuardedReader(open_slide(slides[how], backend=backend)).read_region(*region)
    reader = GuardedReader(open_slide(slides[how], backend=backend), "skip")
    got = reader.read_region(*region)
    want = open_slide(slides["clean"], backend=backend).read_region(*region)
    assert (got[156:, 156:] == 255).all() and np.array_equal(got[:156], want[:156])
    assert [(t.level, t.x_l0, t.y_l0) for t in reader.take_bad_tiles()] == [(0, BAD_X, BAD_Y)]


def test_codestream_end_marker_rule_accepts_zero_padding_and_refuses_cut_data(tmp_path: Path) -> None:
    from wsiseg.readers.codestream_check import damaged_reason

    path = tmp_path / "bytes"
    whole = b"\xff\xd8" + bytes(range(1, 200)) + b"\xff\xd9"
    path.write_bytes(whole + bytes(300) + whole[:100] + whole[:50] + bytes(60))
    with open(path, "rb") as fh:
        assert damaged_reason(fh, 0, len(whole)) is None
        assert damaged_reason(fh, 0, len(whole) + 300) is None  # zero padding after the marker
        assert "end-of-image marker" in damaged_reason(fh, len(whole) + 300, 100)  # type: ignore[operator]
        assert "end-of-image marker" in damaged_reason(fh, len(whole) + 400, 110)  # type: ignore[operator]
        assert "end-of-image marker" in damaged_reason(fh, len(whole) + 1, 299)  # type: ignore[operator]
        assert damaged_reason(fh, 0, 0) is None  # a sparse tile


def test_a_failure_no_tile_reproduces_is_raised_unchanged(slides: dict[str, Path]) -> None:
    from wsiseg.readers import open_slide
    from wsiseg.workers import GuardedReader

    class Flaky:
        def __init__(self) -> None:
            self.inner = open_slide(slides["clean"])
            self.properties = self.inner.properties
            self.calls = 0

        def read_region(self, *args: object) -> np.ndarray:
            self.calls += 1
            if self.calls == 1:
                raise OSError("disk went away")
            return self.inner.read_region(*args)  # type: ignore[arg-type]

        def close(self) -> None:
            self.inner.close()

    with pytest.raises(OSError, match="disk went away"):
        GuardedReader(Flaky(), "skip").read_region((0, 0), 0, (300, 300))


# ---------------------------------------------------------------- item 10: exit codes and one-line errors


def test_output_folder_that_is_a_file_is_a_usage_error(slides: dict[str, Path], tmp_path: Path) -> None:
    target = tmp_path / "results.txt"
    target.write_text("keep me")
    result = CliRunner().invoke(main, ["run", str(slides["clean"]), "-o", str(target), *FAST])
    assert result.exit_code == 2
    [line] = _error_lines(result.stderr)
    assert f"-o {target}" in line and "folder" in line and "Traceback" not in result.output
    assert target.read_text() == "keep me" and sorted(p.name for p in tmp_path.iterdir()) == ["results.txt"]


@pytest.mark.parametrize("command", ["run", "info", "run-with-a-good-one"])
def test_a_missing_input_file_is_a_usage_error_everywhere(
    slides: dict[str, Path], tmp_path: Path, command: str
) -> None:
    missing = tmp_path / "nope.svs"
    out = tmp_path / "out"
    args = {
        "run": ["run", str(missing), "-o", str(out), *FAST],
        "info": ["info", str(missing)],
        "run-with-a-good-one": ["run", str(slides["clean"]), str(missing), "-o", str(out), *FAST],
    }[command]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2
    [line] = _error_lines(result.stderr)
    assert line.count(str(missing)) == 1 and "no such file" in line
    assert not out.exists()  # nothing ran


def test_a_file_that_is_no_slide_fails_info_with_status_1(tmp_path: Path) -> None:
    text = tmp_path / "notes.svs"
    text.write_text("not a slide\n")
    result = CliRunner().invoke(main, ["info", str(text)])
    assert result.exit_code == 1
    [line] = _error_lines(result.stderr)
    assert line.count(str(text)) == 1


def test_unknown_model_is_refused_once_before_anything_runs(slides: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["run", str(slides["clean"]), str(slides["damaged"]), "-o", str(out),
                                       "--model", "no-such-model"])
    assert result.exit_code == 2
    [line] = _error_lines(result.stderr)  # once, not once per slide
    assert "no-such-model" in line and "wsiseg models list" in line
    assert not out.exists()  # no Dask cluster, no log, no ledger


def test_cuda_without_a_gpu_is_a_usage_error(slides: dict[str, Path], tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    result = CliRunner().invoke(main, ["run", str(slides["clean"]), "-o", str(tmp_path / "o"), "--device", "cuda"])
    assert result.exit_code == 2
    [line] = _error_lines(result.stderr)
    assert "no CUDA GPU" in line and "'auto'" in line


def test_device_auto_is_the_default() -> None:
    help_text = CliRunner().invoke(main, ["run", "--help"]).output
    option = help_text[help_text.index("--device"):]
    assert "[default: auto]" in " ".join(option.split())[:400]


def test_a_failed_slide_is_named_once_and_the_others_still_run(slides: dict[str, Path], tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["run", str(slides["no_mpp"]), str(slides["clean"]), "-o", str(tmp_path), *FAST])
    assert result.exit_code == 1
    [line] = _error_lines(result.stderr)
    assert line.count(str(slides["no_mpp"])) == 1 and "--mpp" in line
    assert (tmp_path / "clean.report.json").exists()


# ---------------------------------------------------------------- item 12: small and degenerate synthetic slides


@pytest.mark.parametrize("size", [64, 100, 256])
def test_demo_runs_at_small_sizes(tmp_path: Path, size: int) -> None:
    out = tmp_path / "demo"
    result = CliRunner().invoke(main, ["demo", "--size", str(size), "-o", str(out), *FAST])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "demo-slide.report.json").read_text())
    assert report["size_l0"] == [size, size]
    assert (out / "demo-slide.geojson.gz").exists() and (out / "demo-slide.zarr").exists()
    if size >= 256:  # a small demo slide is all tissue, so it holds nuclei, and they are found
        truth = len(make_nuclei(SyntheticSpec(size, size, seed=0, tissue_fraction=1.0)))
        assert truth > 20 and report["counts"]["nuclei"] >= truth // 2


def test_demo_below_the_smallest_size_is_a_usage_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["demo", "--size", "32", "-o", str(tmp_path / "demo")])
    assert result.exit_code == 2 and "--size" in result.output
    assert not (tmp_path / "demo").exists()


@pytest.mark.parametrize("size", [(16, 16), (17, 33), (100, 100), (256, 256), (300, 97)])
def test_small_synthetic_slides_write_in_every_format(tmp_path: Path, size: tuple[int, int]) -> None:
    spec = SyntheticSpec(*size, seed=4, tissue_fraction=1.0)
    truth = make_nuclei(spec)
    pixels = render_region(spec, truth, 0, 0, *size)
    svs = write_svs_like(tmp_path / "s.svs", spec, truth, tile=16 * max(1, min(size) // 16), levels=(1,))
    write_generic_tiff(tmp_path / "g.tif", spec, truth, levels=(1, 2), compression="deflate")
    write_png(tmp_path / "p.png", spec, truth)
    assert len(svs) == len(truth)
    assert np.array_equal(tifffile.imread(tmp_path / "g.tif"), pixels)
    assert tifffile.TiffFile(tmp_path / "s.svs").pages[0].shape[:2] == (size[1], size[0])


def test_a_spec_with_nuclei_but_no_touching_pairs_renders() -> None:
    spec = SyntheticSpec(100, 100, tissue_fraction=1.0, seed=4)
    truth = make_nuclei(spec)
    assert len(truth) > 0 and (truth.pair_id == -1).all()
    labels = truth_mask(spec, truth, 0, 0, 100, 100)
    assert set(np.unique(labels)) - {0} <= set(truth.label_ids.tolist())


# ---------------------------------------------------------------- item 13: partial outputs of a killed run


def test_resumed_run_removes_the_partial_outputs_of_the_killed_attempt(slides: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    # killed with SIGKILL right after the first segmentor batch reached the writers
    killer = (
        "import os, signal, sys\n"
        "from wsiseg.pipeline import RunConfig, run_slide\n"
        "from wsiseg.scheduling import SchedulerConfig\n"
        "def progress(stage, done, total, count):\n"
        "    if stage == 'segmentor':\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "config = RunConfig(model='classical', batch_tiles=1, scheduler=SchedulerConfig(scheduler='synchronous'))\n"
        "run_slide(sys.argv[1], sys.argv[2], config, progress=progress)\n"
    )
    killed = subprocess.run([sys.executable, "-c", killer, str(slides["clean"]), str(out)], timeout=300)
    assert killed.returncode == -9
    partials = sorted(p.name for p in out.glob("clean.*.partial-*"))
    assert any(".geojson.gz.partial-" in p for p in partials) and any(".zarr.partial-" in p for p in partials)
    # another slide's partials, one of them named like this slide's plus a suffix, are left alone
    others = [out / "clean.b.geojson.gz.partial-0123abcd", out / "other.zarr.partial-0123abcd"]
    others[0].write_bytes(b"x")
    others[1].mkdir()
    old = time.time() - 60
    for p in out.glob("*.partial-*"):  # all from an earlier attempt
        os.utime(p, (old, old))
    result = CliRunner().invoke(main, ["run", str(slides["clean"]), "-o", str(out), *FAST, "--batch-tiles", "1"])
    assert result.exit_code == 0, result.output
    assert "resuming from" in (out / "wsiseg.log").read_text()
    assert sorted(out.glob("*.partial-*")) == sorted(others)  # this slide's are gone, the others' kept
    assert (out / "clean.geojson.gz").exists() and len(_centroids(out / "clean.zarr")) > 50


def test_partials_newer_than_the_run_are_kept(tmp_path: Path) -> None:
    from wsiseg.checkpoints import remove_partial_outputs

    stale, busy = tmp_path / "s.geojson.gz.partial-aa", tmp_path / "s.geojson.gz.partial-bb"
    stale.write_bytes(b"x")
    busy.write_bytes(b"x")
    os.utime(stale, (time.time() - 60, time.time() - 60))
    assert remove_partial_outputs([tmp_path / "s.geojson.gz"], before=time.time() - 30) == [stale]
    assert busy.exists() and not stale.exists()


# ---------------------------------------------------------------- item 14: what the numbers are


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_says_points_for_the_prompter_and_nuclei_for_the_segmentor() -> None:
    stream = _Terminal()
    progress = Progress("slide.svs", True, stream=stream)
    progress("prompter", 4, 4, 8795)
    progress("segmentor", 3, 3, 7640)
    prompter_line, segmentor_line = stream.getvalue().strip("\r\n").split("\n")
    assert "8,795 points" in prompter_line and "nuclei" not in prompter_line
    assert "7,640 nuclei" in segmentor_line


def test_final_line_counts_the_reports_nuclei(slides: dict[str, Path], tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["run", str(slides["clean"]), "-o", str(tmp_path), *FAST])
    assert result.exit_code == 0, result.output
    counts = json.loads((tmp_path / "clean.report.json").read_text())["counts"]
    assert f"clean.svs: {counts['nuclei']:,} nuclei ->" in result.stdout
    assert counts["points_found"] >= counts["points_raw"] >= counts["prompts"] > 0


# ---------------------------------------------------------------- a run stopped by SIGTERM (kill, SLURM walltime)


def test_sigterm_stops_the_run_cleanly_and_the_rerun_equals_an_uninterrupted_run(
    slides: dict[str, Path], tmp_path: Path
) -> None:
    import signal

    cohort = tmp_path / "cohort"
    cohort.mkdir()
    for name in ("first", "second"):
        shutil.copy(slides["clean"], cohort / f"{name}.svs")
    whole = CliRunner().invoke(main, ["run", str(cohort), "-o", str(tmp_path / "whole"), *FAST, "-q"])
    assert whole.exit_code == 0, whole.output

    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "wsiseg.cli.main", "run", str(cohort), "-o", str(out), "--model", "classical",
           "--workers", "1", "--batch-tiles", "1", "-q", "--log", str(tmp_path / "events.jsonl")]
    run = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 120
        while True:  # the first slide done, the second under way
            try:
                states = json.loads((out / "wsiseg-ledger.json").read_text())["slides"]
            except (OSError, ValueError):
                states = {}
            if states.get(str(cohort / "second.svs"), {}).get("state") == "running":
                break
            assert run.poll() is None and time.monotonic() < deadline, run.communicate()
            time.sleep(0.02)
        run.send_signal(signal.SIGTERM)
        _, stderr = run.communicate(timeout=120)  # the local cluster shuts down: no hang
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode == 128 + signal.SIGTERM, stderr
    lines = _error_lines(stderr)
    assert len(lines) == 1 and lines[0].startswith("error: interrupted by SIGTERM: rerun the same command"), stderr
    ledger = json.loads((out / "wsiseg-ledger.json").read_text())["slides"]
    assert ledger[str(cohort / "first.svs")]["state"] == "done"
    assert ledger[str(cohort / "second.svs")]["state"] == "pending"  # not left "running"
    assert (out / "summary.csv").exists()
    events = [json.loads(line)["event"] for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert events[-2:] == ["run_interrupted", "run_end"]

    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr
    for name in ("first", "second"):
        got, want = _centroids(out / f"{name}.zarr"), _centroids(tmp_path / "whole" / f"{name}.zarr")
        np.testing.assert_array_equal(got[np.lexsort(got.T)], want[np.lexsort(want.T)])


def test_dask_warnings_go_to_the_log_file_and_ours_to_the_terminal(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import logging
    import warnings

    from wsiseg.cli.main import _setup_logging
    from wsiseg.scheduling import Runner, SchedulerConfig

    root_handlers = list(logging.getLogger().handlers)
    logging.captureWarnings(False)  # an earlier command of this process may have left it on
    try:
        log_path = _setup_logging(tmp_path, verbose=False, quiet=False)
        dask_file = str(Path("site-packages") / "distributed" / "core.py")
        warnings.warn_explicit("Creating scratch directories is taking a surprisingly long time", UserWarning, dask_file, 1)
        warnings.warn_explicit("a warning of wsiseg's own", UserWarning, str(Path("wsiseg") / "x.py"), 1)
    finally:
        logging.captureWarnings(False)
        for handler in [h for h in logging.getLogger().handlers if h not in root_handlers]:
            logging.getLogger().removeHandler(handler)
            handler.close()
    terminal = capsys.readouterr().err
    assert "scratch directories" not in terminal and "a warning of wsiseg's own" in terminal
    assert log_path is not None and "scratch directories" in log_path.read_text()
    # worker processes warn before their logging is set up: a warning filter in their environment
    env = Runner(SchedulerConfig(workers=1))._worker_logging({})["env"]
    assert "ignore:Creating scratch directories" in env["PYTHONWARNINGS"]


def test_unknown_or_empty_prompter_is_named_as_the_prompter(slides: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["run", str(slides["clean"]), "-o", str(out), "--model", "classical",
                                       "--prompter", "no-such-prompter"])
    assert result.exit_code == 2
    [line] = _error_lines(result.stderr)
    assert line.startswith("error: --prompter 'no-such-prompter': ") and "wsiseg models list" in line
    empty = CliRunner().invoke(main, ["run", str(slides["clean"]), "-o", str(out), "--prompter", ""])
    assert empty.exit_code == 2 and "--prompter needs a model name" in empty.stderr
    assert not out.exists()
