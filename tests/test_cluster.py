"""Scale out and survive: real `dask scheduler` / `dask worker` processes, a SLURM job script
rendered from a config file, a scheduler killed mid-cohort, a disk that fills while writing.

The classical model's nuclei do not depend on tiling or scheduling, so every run here must
give exactly the nuclei of a plain `--scheduler synchronous` run.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
from click.testing import CliRunner

from wsiseg.cli.main import main
from wsiseg.cluster import ClusterConfigError, cluster_from_options, read_cluster_config, slurm_job_script
from wsiseg.synthetic import SyntheticSpec, make_nuclei, write_svs_like

FAST = ["--model", "classical", "-q"]
#: how long wsiseg waits for a lost scheduler in these tests (Dask's connect timeout)
LOST_SCHEDULER_TIMEOUT_S = 5
DASK = Path(sys.executable).with_name("dask")


# ---------------------------------------------------------------- slides, baseline, helpers


@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Four small slides (512 px square, about 170 nuclei each)."""
    folder = tmp_path_factory.mktemp("cluster-slides")
    sizes = {"a": 512, "b": 512, "c": 512, "d": 512}
    out = {}
    for seed, (name, size) in enumerate(sizes.items(), start=30):
        spec = SyntheticSpec(size, size, mpp=0.5, seed=seed, tissue_fraction=1.0)
        out[name] = folder / f"{name}.svs"
        write_svs_like(out[name], spec, make_nuclei(spec), levels=(1, 4))
    return out


@pytest.fixture(scope="module")
def baseline(slides: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every slide run in this process without Dask."""
    out = tmp_path_factory.mktemp("baseline")
    result = CliRunner().invoke(main, ["run", *map(str, slides.values()), "-o", str(out), "--scheduler", "synchronous",
                                       *FAST])
    assert result.exit_code == 0, result.output
    return out


def _nuclei(zarr_path: Path) -> np.ndarray:
    """The store's centroids (level-0 px), rows sorted, so two runs compare exactly."""
    from wsiseg.writers.zarr_store import open_nuclei

    xy = np.asarray(open_nuclei(zarr_path).column("centroid"), np.float64).reshape(-1, 2)
    return xy[np.lexsort((xy[:, 1], xy[:, 0]))]


def _assert_same_nuclei(out: Path, baseline: Path, names: list[str]) -> None:
    for name in names:
        got, want = _nuclei(out / f"{name}.zarr"), _nuclei(baseline / f"{name}.zarr")
        assert len(got) == len(want) > 20, name
        np.testing.assert_array_equal(got, want, err_msg=name)


def _error_lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.strip()]


def _ledger(out: Path) -> dict[str, Any]:
    return json.loads((out / "wsiseg-ledger.json").read_text())["slides"]


class ExternalDask:
    """`dask scheduler` and `dask worker --nworkers 2` processes on 127.0.0.1, started the way
    users start them (a scheduler file tells the workers where the scheduler is)."""

    def __init__(self, folder: Path) -> None:
        """folder: scheduler files and the processes' logs."""
        self.folder = folder
        self.scheduler: subprocess.Popen[bytes] | None = None
        self.workers: subprocess.Popen[bytes] | None = None
        self.address = ""
        self._starts = 0

    def start(self, port: int = 0) -> str:
        """Start both; returns the scheduler's tcp:// address once both workers have joined."""
        from dask.distributed import Client

        self._starts += 1
        file = self.folder / f"scheduler-{self._starts}.json"
        log = open(self.folder / f"dask-{self._starts}.log", "wb")  # noqa: SIM115 - the processes hold it
        self.scheduler = subprocess.Popen(
            [str(DASK), "scheduler", "--host", "127.0.0.1", "--port", str(port), "--scheduler-file", str(file),
             "--no-dashboard"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 60
        while not file.exists():
            if self.scheduler.poll() is not None and port:  # the old port is not free yet: any port
                return self.start(0)
            assert time.monotonic() < deadline, (self.folder / f"dask-{self._starts}.log").read_text()
            time.sleep(0.1)
        while True:  # the file appears before its text is written whole
            try:
                self.address = json.loads(file.read_text())["address"]
                break
            except (ValueError, KeyError):
                assert time.monotonic() < deadline, file.read_text()
                time.sleep(0.1)
        self.workers = subprocess.Popen(
            [str(DASK), "worker", "--scheduler-file", str(file), "--nthreads", "1", "--nworkers", "2",
             "--no-dashboard"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        with Client(self.address, timeout="30s") as client:
            client.wait_for_workers(2, timeout=90)
        return self.address

    def running(self) -> str:
        """The address of a running scheduler with both workers joined: this one, or a new one."""
        from dask.distributed import Client

        alive = [p is not None and p.poll() is None for p in (self.scheduler, self.workers)]
        if not all(alive):
            self.stop()
            return self.start()
        with Client(self.address, timeout="30s") as client:  # a killed worker's nanny may still be restarting it
            client.wait_for_workers(2, timeout=90)
        return self.address

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])

    def kill_scheduler(self) -> None:
        assert self.scheduler is not None
        os.kill(self.scheduler.pid, signal.SIGKILL)
        self.scheduler.wait(timeout=10)

    def stop(self) -> None:
        for proc in (self.workers, self.scheduler):
            if proc is None or proc.poll() is not None:
                continue
            os.killpg(proc.pid, signal.SIGTERM)  # the process group we started: the workers' nannies too
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)


@pytest.fixture(scope="module")
def external_dask(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ExternalDask]:
    """One external cluster for the module's tests (started on first use, restarted when dead)."""
    if not DASK.exists():
        pytest.skip(f"no `dask` command beside {sys.executable}")
    cluster = ExternalDask(tmp_path_factory.mktemp("dask"))
    try:
        yield cluster
    finally:
        cluster.stop()


# ---------------------------------------------------------------- an existing Dask cluster


def test_an_external_dask_cluster_gives_the_nuclei_of_a_synchronous_run(
    slides: dict[str, Path], baseline: Path, external_dask: ExternalDask, tmp_path: Path
) -> None:
    address = external_dask.running()
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["run", str(slides["a"]), str(slides["b"]), "-o", str(out),
                                       "--scheduler", address, *FAST])
    assert result.exit_code == 0, result.output
    _assert_same_nuclei(out, baseline, ["a", "b"])
    report = json.loads((out / "a.report.json").read_text())
    assert report["workers"] == 2  # the tasks ran on the external workers


def test_an_unreachable_scheduler_fails_the_run_in_one_line(slides: dict[str, Path], tmp_path: Path) -> None:
    import socket

    import dask

    with socket.socket() as sock:  # bound but not listening for the whole run: refused, and nobody else's
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        out = tmp_path / "out"
        with dask.config.set({"distributed.comm.timeouts.connect": "2s"}):
            result = CliRunner().invoke(main, ["run", str(slides["a"]), "-o", str(out),
                                               "--scheduler", f"tcp://127.0.0.1:{port}", *FAST])
    assert result.exit_code == 1
    lines = _error_lines(result.stderr)
    assert len(lines) == 1, result.stderr
    assert f"cannot reach the Dask scheduler at tcp://127.0.0.1:{port}" in lines[0] and "docs/cluster.md" in lines[0]
    assert _ledger(out)[str(slides["a"])]["state"] == "pending"  # nothing ran


# ---------------------------------------------------------------- a killed scheduler


def test_a_killed_scheduler_fails_the_run_in_one_line_and_the_rerun_equals_an_uninterrupted_run(
    slides: dict[str, Path], baseline: Path, external_dask: ExternalDask, tmp_path: Path
) -> None:
    address = external_dask.running()
    out = tmp_path / "out"
    cohort = [str(slides[n]) for n in ("a", "c", "d")]
    cmd = [sys.executable, "-m", "wsiseg.cli.main", "run", *cohort, "-o", str(out), *FAST]
    env = {**os.environ, "DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT": f"{LOST_SCHEDULER_TIMEOUT_S}s"}
    # cwd outside the source tree: `python -m` must import the installed package
    run = subprocess.Popen([*cmd, "--scheduler", address], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 120
        while True:  # the first slide done, the others not: kill the scheduler
            try:
                states = [e["state"] for e in _ledger(out).values()]
            except (OSError, ValueError):
                states = []
            if states.count("done") >= 1:
                break
            assert run.poll() is None and time.monotonic() < deadline, run.communicate()
            time.sleep(0.05)
        external_dask.kill_scheduler()
        killed_at = time.monotonic()
        _, stderr = run.communicate(timeout=LOST_SCHEDULER_TIMEOUT_S + 60)  # no hang
    finally:
        if run.poll() is None:
            run.kill()
    assert time.monotonic() - killed_at < LOST_SCHEDULER_TIMEOUT_S + 45
    assert run.returncode == 1
    lines = _error_lines(stderr)
    assert len(lines) == 1, stderr
    assert "lost the Dask scheduler at " + address in lines[0] and "rerun the same command" in lines[0]
    ledger = _ledger(out)
    assert ledger[cohort[0]]["state"] == "done"
    assert [ledger[s]["state"] for s in cohort[1:]].count("done") < 2  # killed mid-cohort
    assert not list(out.glob("*.partial-*"))  # the interrupted slide's writers were aborted

    external_dask.stop()  # the workers of the dead scheduler have gone; start both again
    address = external_dask.start(port=external_dask.port)
    rerun = subprocess.run([*cmd, "--scheduler", address], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr
    assert {e["state"] for e in _ledger(out).values()} <= {"done", "skipped"}
    first = _ledger(out)[cohort[0]]
    assert first["state"] == "done" and first.get("already_done")  # the finished slide was not redone
    _assert_same_nuclei(out, baseline, ["a", "c", "d"])


# ---------------------------------------------------------------- a killed worker


def test_a_worker_killed_mid_cohort_leaves_a_run_whose_rerun_equals_an_uninterrupted_run(
    slides: dict[str, Path], baseline: Path, external_dask: ExternalDask, tmp_path: Path
) -> None:
    from dask.distributed import Client

    address = external_dask.running()
    out = tmp_path / "out"
    cohort = [str(slides[n]) for n in ("a", "b", "c", "d")]
    cmd = [sys.executable, "-m", "wsiseg.cli.main", "run", *cohort, "-o", str(out), "--scheduler", address, *FAST]
    with Client(address, timeout="30s") as client:
        pids = sorted(client.run(os.getpid).values())
    run = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 120
        while True:  # a slide under way: kill one worker process (SIGKILL, as the OOM killer does)
            try:
                states = [e["state"] for e in _ledger(out).values()]
            except (OSError, ValueError):
                states = []
            if "running" in states:
                break
            assert run.poll() is None and time.monotonic() < deadline, run.communicate()
            time.sleep(0.02)
        os.kill(pids[0], signal.SIGKILL)
        assert run.poll() is None  # killed while the cohort was still running
        _, stderr = run.communicate(timeout=300)
    finally:
        if run.poll() is None:
            run.kill()
    # Dask hands the lost worker's tasks to the other worker (and the nanny restarts it): either
    # the run finishes, or it fails in one line per slide and the rerun completes the rest
    assert run.returncode in (0, 1), stderr
    if run.returncode == 1:
        assert all(line.startswith("error: ") for line in _error_lines(stderr)), stderr
    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr
    assert {e["state"] for e in _ledger(out).values()} == {"done"}
    assert all(e.get("already_done") for e in _ledger(out).values()) == (run.returncode == 0)
    _assert_same_nuclei(out, baseline, ["a", "b", "c", "d"])
    assert not list(out.glob("*.partial-*"))


# ---------------------------------------------------------------- SLURM (no SLURM here: the job script)

SLURM_YAML = """\
queue: gpu
account: pathology-lab
cores: 8
memory: 32GiB
processes: 1
gpus: 1
walltime: "04:00:00"
jobs: 4
job_extra_directives: ["--constraint=a100"]
job_script_prologue:
  - module load cuda/12.4
  - source ~/venvs/wsiseg/bin/activate
local_directory: /scratch/dask
log_directory: {logs}
"""

SLURM_TOML = """\
partition = "gpu"
account = "pathology-lab"
cores = 8
memory = "32GiB"
processes = 1
gpus = 1
walltime = "04:00:00"
jobs = 4
job-extra-directives = ["--constraint=a100"]
job-script-prologue = ["module load cuda/12.4", "source ~/venvs/wsiseg/bin/activate"]
local-directory = "/scratch/dask"
log-directory = "{logs}"
"""


def test_slurm_job_script_carries_the_configs_directives(tmp_path: Path) -> None:
    pytest.importorskip("dask_jobqueue")
    logs = tmp_path / "logs"
    config_file = tmp_path / "slurm.yaml"
    config_file.write_text(SLURM_YAML.format(logs=logs))
    config = read_cluster_config(config_file)
    assert config.expected_workers == 4
    script = slurm_job_script(config)
    directives = [ln.removeprefix("#SBATCH ").strip() for ln in script.splitlines() if ln.startswith("#SBATCH")]
    assert "-p gpu" in directives
    assert "-A pathology-lab" in directives
    assert "--cpus-per-task=8" in directives
    assert "--mem=32G" in directives
    assert "-t 04:00:00" in directives
    assert "--gres=gpu:1" in directives
    assert "--constraint=a100" in directives
    assert f"-o {logs}/dask-worker-%J.out" in directives
    body = script.split("\n#SBATCH")[-1]
    assert "module load cuda/12.4\nsource ~/venvs/wsiseg/bin/activate\n" in body  # before the worker starts
    worker = next(ln for ln in script.splitlines() if "distributed.cli.dask_worker" in ln)
    assert "--nthreads 8" in worker and "--local-directory /scratch/dask" in worker


def test_a_toml_config_reads_like_the_yaml_one(tmp_path: Path) -> None:
    (tmp_path / "slurm.yaml").write_text(SLURM_YAML.format(logs="/x/logs"))
    (tmp_path / "slurm.toml").write_text(SLURM_TOML.format(logs="/x/logs"))
    yaml_config, toml_config = (read_cluster_config(tmp_path / f"slurm.{s}") for s in ("yaml", "toml"))
    assert yaml_config.cluster_kwargs() == toml_config.cluster_kwargs()
    adaptive = tmp_path / "adapt.yaml"
    adaptive.write_text("cores: 4\nmemory: 16GiB\nprocesses: 2\nadapt: {minimum: 0, maximum: 10}\n")
    assert read_cluster_config(adaptive).expected_workers == 20


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ("cores: 4\nmemory: 8GiB\nqueu: gpu\n", ["unknown key 'queu'", "queue"]),
        ("cores: 4\nmemory: 8GiB\nwalltime: 4:00:00\n", ["walltime must be a string", "quote it"]),
        ("cores: 4\nmemory: 8GiB\ngpus: 2\n", ["gpus must be 0 or 1", "jobs: N"]),
        ("memory: 8GiB\n", ["cores missing"]),
        ("cores: 4\nmemory: lots\n", ["memory must be an amount"]),
        ("cores: 4\nmemory: 8GiB\njobs: 2\nadapt: {minimum: 1, maximum: 3}\n", ["jobs or adapt, not both"]),
        ("cores: [4\n", ["not valid YAML"]),
    ],
)
def test_a_bad_cluster_config_is_one_line_naming_the_file(tmp_path: Path, text: str, names: list[str]) -> None:
    config_file = tmp_path / "slurm.yaml"
    config_file.write_text(text)
    with pytest.raises(ClusterConfigError) as err:
        read_cluster_config(config_file)
    message = str(err.value)
    assert "\n" not in message and str(config_file) in message
    for name in names:
        assert name in message


def test_a_missing_dask_jobqueue_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    config_file = tmp_path / "slurm.yaml"
    config_file.write_text("cores: 4\nmemory: 8GiB\n")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "dask_jobqueue" else real(name, *a))
    with pytest.raises(ClusterConfigError, match=r'pip install "wsiseg\[slurm\]"'):
        cluster_from_options("slurm", config_file)


def test_cluster_options_are_checked_before_anything_runs(
    slides: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("dask_jobqueue")
    config_file = tmp_path / "slurm.yaml"
    config_file.write_text("cores: 4\nmemory: 8GiB\n")
    out = tmp_path / "out"
    slurm = ["--cluster", "slurm", "--cluster-config", str(config_file)]
    no_sbatch = {
        "--cluster-config needs --cluster slurm": ["--cluster-config", str(config_file)],
        "--cluster slurm needs --cluster-config": ["--cluster", "slurm"],
        "sbatch not found; run wsiseg on a SLURM login node": slurm,
    }
    with_sbatch = {
        "--workers does not go with --cluster slurm": [*slurm, "--workers", "2"],
        "--scheduler does not go with --cluster slurm": [*slurm, "--scheduler", "synchronous"],
    }
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", str(bin_dir))  # no SLURM here
    _expect_usage_errors(no_sbatch, slides["a"], out)
    _fake_sbatch(bin_dir, "exit 1")  # a login node's sbatch, never called: the options fail first
    _expect_usage_errors(with_sbatch, slides["a"], out)


def test_a_job_script_slurm_refuses_stops_the_run_at_once_in_one_line(
    slides: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("dask_jobqueue")
    config_file = tmp_path / "slurm.yaml"
    config_file.write_text("queue: gpu-typo\ncores: 4\nmemory: 8GiB\nwalltime: '01:00:00'\n")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "sbatch-calls"
    _fake_sbatch(bin_dir, f"echo \"$@\" >> {calls}\n"  # SLURM's answer to a partition that does not exist
                 "echo 'sbatch: error: Batch job submission failed: Invalid partition name specified' >&2\nexit 1")
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    out = tmp_path / "out"
    t = time.monotonic()
    result = CliRunner().invoke(main, ["run", str(slides["a"]), "-o", str(out), *FAST,
                                       "--cluster", "slurm", "--cluster-config", str(config_file)])
    assert time.monotonic() - t < 60  # not left waiting for workers that never come
    assert result.exit_code == 1, result.output
    lines = _error_lines(result.stderr)
    assert len(lines) == 1, result.stderr
    assert "SLURM refuses the worker job" in lines[0] and "Invalid partition name specified" in lines[0]
    assert str(config_file) in lines[0]
    assert calls.read_text().split()[0] == "--test-only"  # validated, never submitted
    assert len(calls.read_text().splitlines()) == 1


def _fake_sbatch(bin_dir: Path, body: str) -> None:
    """An executable `sbatch` shell script in bin_dir running `body` (no SLURM here)."""
    fake = bin_dir / "sbatch"
    fake.write_text(f"#!/bin/sh\n{body}\n")
    fake.chmod(0o755)


def _expect_usage_errors(runs: dict[str, list[str]], slide: Path, out: Path) -> None:
    for expected, options in runs.items():
        result = CliRunner().invoke(main, ["run", str(slide), "-o", str(out), *FAST, *options])
        assert result.exit_code == 2, (expected, result.output)
        lines = _error_lines(result.stderr)
        assert len(lines) == 1 and expected in lines[0], (expected, result.stderr)
    assert not out.exists()  # a usage error: no log, no ledger


# ---------------------------------------------------------------- a disk that fills up


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs (needs root, or a container allowed to mount); unmounted afterwards."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root: run as root to check a full disk")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip()}): a full disk is not checked")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def _fill(disk: Path, leave_bytes: int) -> Path:
    filler = disk / "filler"
    free = shutil.disk_usage(disk).free
    with open(filler, "ab") as fh:
        fh.write(b"\0" * max(0, free - leave_bytes))
    return filler


def _outputs_of(out: Path, name: str) -> dict[str, bytes]:
    """Every file of the slide's outputs (the Zarr store's too), by path, with its bytes."""
    files = [p for p in sorted(out.rglob("*")) if p.is_file() and p.relative_to(out).parts[0].startswith(f"{name}.")]
    return {str(p.relative_to(out)): p.read_bytes() for p in files}


def test_a_full_disk_fails_the_slide_in_one_line_keeps_what_was_done_and_the_rerun_completes(
    slides: dict[str, Path], baseline: Path, small_disk: Path
) -> None:
    out = small_disk / "out"
    first = CliRunner().invoke(main, ["run", str(slides["a"]), "-o", str(out), "--scheduler", "synchronous", *FAST])
    assert first.exit_code == 0, first.output
    before = _outputs_of(out, "a")
    assert "a.geojson.gz" in before and "a.zarr/zarr.json" in before
    filler = _fill(small_disk, 40 * 1024)

    cmd = ["run", str(slides["a"]), str(slides["b"]), "-o", str(out), "--scheduler", "synchronous", *FAST]
    full = CliRunner().invoke(main, cmd)
    assert full.exit_code == 1
    lines = _error_lines(full.stderr)
    assert len(lines) == 1, full.stderr
    line = lines[0]
    assert line.startswith(f"error: {slides['b']}: no space left on ") and f"(mounted at {small_disk})" in line
    assert "free of 4.0 MiB" in line and "rerun the same command" in line
    # what was done stays as it was; nothing of the failed slide is left under an output name
    assert _outputs_of(out, "a") == before
    ledger = _ledger(out)
    assert ledger[str(slides["a"])]["state"] in ("done", "skipped")
    assert not list(out.glob("b.*"))

    filler.unlink()  # space freed: the same command completes
    rerun = CliRunner().invoke(main, cmd)
    assert rerun.exit_code == 0, rerun.output
    assert _ledger(out)[str(slides["b"])]["state"] == "done"
    _assert_same_nuclei(out, baseline, ["a", "b"])
    assert not list(out.glob("*.partial-*")) and not (out / ".wsiseg-work").exists()


def test_the_ledger_keeps_its_previous_file_when_the_disk_is_full(small_disk: Path) -> None:
    from wsiseg.cohort import Ledger

    slides = [Path(f"/slides/s{i}.svs") for i in range(3)]
    ledger = Ledger(small_disk, slides)
    ledger.mark(slides[0], "done", nuclei=10)
    saved = (small_disk / "wsiseg-ledger.json").read_bytes()
    _fill(small_disk, 0)
    ledger.mark(slides[1], "failed", reason="x" * 20_000)  # does not fit: no exception, old file kept
    assert (small_disk / "wsiseg-ledger.json").read_bytes() == saved
    assert not list(small_disk.glob("*.partial"))
    (small_disk / "filler").unlink()
    ledger.mark(slides[2], "done", nuclei=5)  # room again: every state is saved
    states = {k: v["state"] for k, v in json.loads((small_disk / "wsiseg-ledger.json").read_text())["slides"].items()}
    assert states == {str(slides[0]): "done", str(slides[1]): "failed", str(slides[2]): "done"}


def test_a_writer_on_a_full_disk_raises_one_line_naming_the_disk_and_leaves_nothing(small_disk: Path) -> None:
    from wsiseg.disk_space import DiskFullError
    from wsiseg.writers.zarr_store import ZarrWriter

    (small_disk / "out").mkdir()
    _fill(small_disk, 0)
    with pytest.raises(DiskFullError) as err:
        ZarrWriter(small_disk / "out" / "s.zarr", width=100, height=100, write_labels=False)
    message = str(err.value)
    assert "\n" not in message and message.startswith("no space left on ")
    assert f"(mounted at {small_disk})" in message and "free of 4.0 MiB" in message
    assert f"writing {small_disk / 'out' / 's.zarr'}" in message
    assert not list((small_disk / "out").iterdir())  # no partial store left behind


def test_a_future_cancelled_by_a_lost_connection_counts_as_a_lost_scheduler() -> None:
    # the client can hand this error over while its status still says "running" (reconnecting)
    from distributed.client import FutureCancelledError

    from wsiseg.scheduling import _cancelled_by_lost_connection

    assert _cancelled_by_lost_connection(FutureCancelledError("predict-1", "scheduler-connection-lost"))
    assert not _cancelled_by_lost_connection(FutureCancelledError("predict-1", "user-cancelled"))
    assert not _cancelled_by_lost_connection(ValueError("scheduler-connection-lost"))


@pytest.mark.parametrize("workers", [1, 2])
def test_local_workers_share_the_cpus_among_their_torch_threads(workers: int) -> None:
    import torch

    from wsiseg.scheduling import Runner, SchedulerConfig, worker_thread_env

    cpus = os.cpu_count() or 1
    expected = max(1, cpus // workers)
    assert worker_thread_env(workers)["OMP_NUM_THREADS"] == str(expected)
    with Runner(SchedulerConfig(workers=workers)) as runner:
        threads = runner._client.run(torch.get_num_threads)
    assert sorted(threads.values()) == [expected] * workers  # not Dask's default of 1 each
