"""Dask workers as SLURM jobs: the cluster config file and dask-jobqueue's SLURMCluster.

`wsiseg run --cluster slurm --cluster-config slurm.yaml` reads a YAML or TOML file with these
keys (`-` and `_` are the same; `partition` is another name for `queue`):

    queue                 SLURM partition                          #SBATCH -p
    account               account charged                          #SBATCH -A
    cores                 CPU cores per job (required)             #SBATCH --cpus-per-task
    memory                memory per job, e.g. "32GiB" (required)  #SBATCH --mem
    processes             Dask worker processes per job (default 1; they share cores and memory)
    gpus                  GPUs per job, 0 or 1 (default 0)         #SBATCH --gres=gpu:N
    walltime              "HH:MM:SS" or "D-HH:MM:SS"                #SBATCH -t
    jobs                  how many jobs to start (default 1), or
    adapt                 {minimum, maximum}: jobs started and stopped with the load
    job_extra_directives  more #SBATCH lines, e.g. ["--constraint=a100"]
    job_script_prologue   shell lines run before the worker, e.g. ["source ~/wsiseg/bin/activate"]
    local_directory       node-local scratch for the workers' spill files
    log_directory         where each job's stdout/stderr go
    interface             network interface of the scheduler and workers (e.g. ib0)
    python                the interpreter on the nodes (default: the one running wsiseg)

Keys not given fall back to Dask's own jobqueue configuration (`~/.config/dask/jobqueue.yaml`).
Each job runs `processes` workers; a job with a GPU runs its model on it (`--device auto`).
dask-jobqueue is an optional dependency (`pip install "wsiseg[slurm]"`), imported only here,
only when a SLURM cluster starts.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

#: the one line shown when dask-jobqueue is missing
SLURM_EXTRA_MISSING = "--cluster slurm needs dask-jobqueue: pip install \"wsiseg[slurm]\""
NO_SBATCH = "--cluster slurm: sbatch not found; run wsiseg on a SLURM login node (where sbatch works)"
CLUSTER_KINDS = ("slurm",)

_WALLTIME = re.compile(r"^(\d+-)?\d{1,3}:\d{2}(:\d{2})?$")
_ALIASES = {"partition": "queue"}
_LIST_KEYS = ("job_extra_directives", "job_script_prologue")
_STR_KEYS = ("queue", "account", "walltime", "memory", "local_directory", "log_directory", "interface", "python")
_INT_KEYS = ("cores", "processes", "gpus", "jobs")


class ClusterConfigError(ValueError):
    """A cluster config file or option that cannot be used; the message names the file and the fix."""


@dataclass(frozen=True)
class AdaptRange:
    """Jobs kept between `minimum` and `maximum`, started and stopped with the load."""

    minimum: int
    maximum: int

    def __post_init__(self) -> None:
        if not 0 <= self.minimum <= self.maximum or self.maximum < 1:
            raise ValueError(f"adapt needs 0 <= minimum <= maximum and maximum >= 1, got {self.minimum}..{self.maximum}")


@dataclass(frozen=True)
class SlurmConfig:
    """What each SLURM job asks for and how many run (keys in the module docstring).

    memory: per job, in a form Dask parses ("32GiB", "64 GB").  walltime: "HH:MM:SS",
    "MM:SS" or "D-HH:MM:SS".  jobs and adapt exclude each other; neither means one job.
    source: the file this came from (named in errors).
    """

    cores: int
    memory: str
    queue: str | None = None
    account: str | None = None
    processes: int = 1
    gpus: int = 0
    walltime: str | None = None
    jobs: int | None = None
    adapt: AdaptRange | None = None
    job_extra_directives: tuple[str, ...] = ()
    job_script_prologue: tuple[str, ...] = ()
    local_directory: str | None = None
    log_directory: str | None = None
    interface: str | None = None
    python: str | None = None
    source: Path | None = None

    def __post_init__(self) -> None:
        from dask.utils import parse_bytes

        where = f"{self.source}: " if self.source else ""
        if self.cores < 1:
            raise ValueError(f"{where}cores must be >= 1, got {self.cores}")
        if not 1 <= self.processes <= self.cores:
            raise ValueError(f"{where}processes must be between 1 and cores ({self.cores}), got {self.processes}")
        if self.gpus not in (0, 1):
            raise ValueError(
                f"{where}gpus must be 0 or 1 per job (a worker runs its model on one GPU), got {self.gpus}; "
                "for more GPUs start more jobs (jobs: N)"
            )
        try:
            if parse_bytes(self.memory) <= 0:
                raise ValueError
        except (ValueError, TypeError):
            raise ValueError(f"{where}memory must be an amount like \"32GiB\", got {self.memory!r}") from None
        if self.walltime is not None and not _WALLTIME.match(self.walltime):
            raise ValueError(f"{where}walltime must be \"HH:MM:SS\" or \"D-HH:MM:SS\", got {self.walltime!r}")
        if self.jobs is not None and self.adapt is not None:
            raise ValueError(f"{where}give jobs or adapt, not both")
        if self.jobs is not None and self.jobs < 1:
            raise ValueError(f"{where}jobs must be >= 1, got {self.jobs}")

    @property
    def expected_workers(self) -> int:
        """Dask workers once every job runs (adapt: at its maximum)."""
        jobs = self.adapt.maximum if self.adapt is not None else (self.jobs or 1)
        return jobs * self.processes

    def cluster_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of dask_jobqueue.SLURMCluster (None values left out, so Dask's
        jobqueue config fills them)."""
        gres = [f"--gres=gpu:{self.gpus}"] if self.gpus else []
        kwargs: dict[str, Any] = {
            "queue": self.queue,
            "account": self.account,
            "cores": self.cores,
            "memory": self.memory,
            "processes": self.processes,
            "walltime": self.walltime,
            "job_extra_directives": [*self.job_extra_directives, *gres],
            "job_script_prologue": list(self.job_script_prologue),
            "local_directory": self.local_directory,
            "log_directory": self.log_directory,
            "interface": self.interface,
            "python": self.python,
            # a free port for the dashboard: another user's on 8787 is no concern of ours
            "scheduler_options": {"dashboard_address": ":0"},
        }
        return {k: v for k, v in kwargs.items() if v is not None}


def read_cluster_config(path: str | Path) -> SlurmConfig:
    """The SlurmConfig in a YAML (.yaml, .yml) or TOML (.toml) file.

    Raises ClusterConfigError (one line naming the file and the fix) for an unreadable file,
    an unknown key, a value of the wrong type, or a value out of range.
    """
    path = Path(path)
    data = _load_mapping(path)
    values: dict[str, Any] = {}
    for raw_key, value in data.items():
        key = _ALIASES.get(str(raw_key).replace("-", "_"), str(raw_key).replace("-", "_"))
        if key in values:
            raise ClusterConfigError(f"{path}: {raw_key!r} given twice (queue and partition are one key)")
        values[key] = _checked_value(path, key, value)
    missing = [k for k in ("cores", "memory") if k not in values]
    if missing:
        raise ClusterConfigError(f"{path}: {' and '.join(missing)} missing; give the cores and memory of one job")
    try:
        return SlurmConfig(**values, source=path)
    except ValueError as exc:
        raise ClusterConfigError(str(exc)) from None


def cluster_from_options(kind: str | None, config_file: str | Path | None) -> SlurmConfig | None:
    """The cluster of `--cluster KIND --cluster-config FILE` (None without either), checked up
    front: both options together, a usable file, dask-jobqueue installed, sbatch on the PATH.

    Raises ClusterConfigError with one line naming the option and the fix.
    """
    if kind is None and config_file is None:
        return None
    if kind is None:
        raise ClusterConfigError("--cluster-config needs --cluster slurm")
    if kind not in CLUSTER_KINDS:
        raise ClusterConfigError(f"--cluster must be one of {', '.join(CLUSTER_KINDS)}, got {kind!r}")
    if config_file is None:
        raise ClusterConfigError("--cluster slurm needs --cluster-config FILE (YAML or TOML; see docs/cluster.md)")
    config = read_cluster_config(config_file)
    if importlib.util.find_spec("dask_jobqueue") is None:
        raise ClusterConfigError(SLURM_EXTRA_MISSING)
    if shutil.which("sbatch") is None:
        raise ClusterConfigError(NO_SBATCH)
    return config


def slurm_cluster(config: SlurmConfig) -> Any:
    """A dask_jobqueue.SLURMCluster for `config`, its scheduler running in this process and no
    job submitted yet (`start_slurm_cluster` submits them; `.job_script()` shows each job's
    script).  Raises ImportError naming the extra when dask-jobqueue is missing."""
    try:
        from dask_jobqueue import SLURMCluster
    except ImportError as exc:
        raise ImportError(SLURM_EXTRA_MISSING) from exc
    return SLURMCluster(**config.cluster_kwargs())


def start_slurm_cluster(config: SlurmConfig) -> Any:
    """`slurm_cluster(config)` with its jobs submitted: `jobs` of them, or adaptive between
    `adapt.minimum` and `adapt.maximum`.  Workers join as SLURM starts the jobs; tasks wait
    for them.  Raises RuntimeError (one line) when `sbatch` is not on the PATH or refuses the
    job script (`sbatch --test-only`: a wrong partition, account or limit), so such a run stops
    at once instead of waiting for workers that never come."""
    if shutil.which("sbatch") is None:
        raise RuntimeError(NO_SBATCH)
    cluster = slurm_cluster(config)
    try:
        _test_submission(str(cluster.job_script()), config)
    except RuntimeError:
        cluster.close()
        raise
    if config.adapt is not None:
        cluster.adapt(minimum_jobs=config.adapt.minimum, maximum_jobs=config.adapt.maximum)
    else:
        cluster.scale(jobs=config.jobs or 1)
    return cluster


#: seconds `sbatch --test-only` may take (the controller answers within a few seconds)
SBATCH_TEST_TIMEOUT_S = 60


def _test_submission(script: str, config: SlurmConfig) -> None:
    """Ask SLURM to validate one job's script without submitting it (`sbatch --test-only`).

    Raises RuntimeError with sbatch's own reason (e.g. "invalid partition specified") and the
    config file to fix.
    """
    import subprocess
    import tempfile

    where = f" in {config.source}" if config.source else ""
    with tempfile.NamedTemporaryFile("w", suffix=".sh", prefix="wsiseg-job-", delete=False) as fh:
        fh.write(script)
    try:
        done = subprocess.run(["sbatch", "--test-only", fh.name], capture_output=True, text=True,
                              timeout=SBATCH_TEST_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"--cluster slurm: sbatch --test-only gave no answer in {SBATCH_TEST_TIMEOUT_S} s; "
                           "check that the SLURM controller is up (sinfo)") from None
    finally:
        Path(fh.name).unlink(missing_ok=True)
    if done.returncode != 0:
        said = " ".join((done.stderr or done.stdout).split()) or f"exit code {done.returncode}"
        raise RuntimeError(f"--cluster slurm: SLURM refuses the worker job ({said}); fix the queue, account, "
                           f"cores, memory, gpus or walltime{where} (docs/cluster.md)")


def slurm_job_script(config: SlurmConfig) -> str:
    """The batch script each SLURM job of `config` would run (nothing is submitted)."""
    cluster = slurm_cluster(config)
    try:
        return str(cluster.job_script())
    finally:
        cluster.close()


def _load_mapping(path: Path) -> Mapping[str, Any]:
    suffix = path.suffix.lower()
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ClusterConfigError(f"{path}: cannot read the cluster config ({exc.strerror or exc})") from None
    try:
        if suffix in (".yaml", ".yml"):
            import yaml  # PyYAML comes with Dask

            data = yaml.safe_load(text)
        elif suffix == ".toml":
            data = _toml_loads(text)
        else:
            raise ClusterConfigError(f"{path}: a cluster config must be YAML (.yaml, .yml) or TOML (.toml)")
    except ClusterConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - the parser's own error, in one line
        detail = " ".join(str(exc).split())
        raise ClusterConfigError(f"{path}: not valid {suffix[1:].upper()} ({detail})") from None
    if not isinstance(data, Mapping):
        raise ClusterConfigError(f"{path}: expected keys such as cores, memory, queue (see docs/cluster.md)")
    return data


def _toml_loads(text: str) -> Any:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        try:
            import tomli as tomllib
        except ImportError:
            raise ClusterConfigError("a TOML cluster config needs Python 3.11 or `pip install tomli`; "
                                     "or write it as YAML") from None
    return tomllib.loads(text)


def _checked_value(path: Path, key: str, value: Any) -> Any:
    """A config value of the right type for `key` (lists as tuples, adapt as AdaptRange)."""
    if key in _LIST_KEYS:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ClusterConfigError(f"{path}: {key} must be a list of strings, got {value!r}")
        return tuple(value)
    if key in _INT_KEYS:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ClusterConfigError(f"{path}: {key} must be a whole number, got {value!r}")
        return value
    if key in _STR_KEYS:
        if not isinstance(value, str):
            hint = " (quote it, e.g. \"04:00:00\")" if key == "walltime" else ""
            raise ClusterConfigError(f"{path}: {key} must be a string{hint}, got {value!r}")
        return value
    if key == "adapt":
        if not isinstance(value, Mapping) or set(value) != {"minimum", "maximum"}:
            raise ClusterConfigError(f"{path}: adapt must have minimum and maximum (jobs), got {value!r}")
        try:
            return AdaptRange(int(value["minimum"]), int(value["maximum"]))
        except (TypeError, ValueError) as exc:
            raise ClusterConfigError(f"{path}: {exc}") from None
    known = sorted([*_LIST_KEYS, *_INT_KEYS, *_STR_KEYS, "adapt", *_ALIASES])
    raise ClusterConfigError(f"{path}: unknown key {key!r}; the keys are {', '.join(known)}")
