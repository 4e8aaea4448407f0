"""Where the work runs: in this process, on a local Dask cluster, or on an existing scheduler.

`Runner.map_ordered(fn, items)` submits one task per item with at most `max_in_flight`
tasks outstanding and yields results in submission order, so memory stays bounded by the
window whatever the slide size, and downstream writers see a deterministic order.

A LocalCluster starts its dashboard on a free port (never a warning about 8787 being taken)
and, given `SchedulerConfig.worker_log`, its worker processes log to that file instead of the
terminal (`dask_setup`, Dask's preload hook, runs in each worker as it starts).

On an existing scheduler (`tcp://…`) or a SLURM cluster (`SchedulerConfig.cluster`, see
`wsiseg.cluster`), a scheduler that cannot be reached, or that goes away mid-run, raises
`SchedulerError` with one line saying how to resume, within Dask's connect timeout
(`distributed.comm.timeouts.connect`, 30 s by default): the client tries to reconnect that long.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Sequence, TypeVar

if TYPE_CHECKING:
    from wsiseg.cluster import SlurmConfig

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

#: environment variable that tells a local worker process where to log (see `dask_setup`)
WORKER_LOG_ENV = "WSISEG_WORKER_LOG"


class SchedulerError(RuntimeError):
    """The Dask scheduler cannot be reached, or went away mid-run; no slide can run without it.
    The message (one line) names the scheduler and how to resume."""


@dataclass(frozen=True)
class SchedulerConfig:
    """scheduler: None for a LocalCluster, "synchronous" for in-process, or a tcp:// address.

    workers: LocalCluster worker processes (default: the machine's cores).
    gpus: when > 0, the LocalCluster gets one extra single-threaded worker per GPU, with
        `CUDA_VISIBLE_DEVICES` set and a `GPU` resource that model tasks request, while reading
        and stitching request `CPU` (the other workers').  On an existing cluster, start GPU
        workers with `--resources GPU=1` and CPU workers with `--resources CPU=1`.
    worker_log: file the LocalCluster's worker processes append their log records to (Dask's
        warnings and task tracebacks included) instead of writing them to the terminal;
        None leaves Dask's own logging as it is.  Workers of an existing cluster log where
        that cluster says.
    cluster: SLURM jobs as workers (`wsiseg.cluster.SlurmConfig`): the scheduler runs in this
        process and the jobs are cancelled when the Runner closes.  Excludes `scheduler`,
        `workers` and `gpus` (the config file says how many jobs, processes and GPUs).
    """

    scheduler: str | None = None
    workers: int | None = None
    threads_per_worker: int = 1
    gpus: int = 0
    max_in_flight: int | None = None
    worker_log: Path | None = None
    cluster: SlurmConfig | None = None

    def __post_init__(self) -> None:
        if self.workers is not None and self.workers < 1:
            raise ValueError(f"--workers must be >= 1, got {self.workers}")
        if self.gpus < 0:
            raise ValueError(f"--gpus must be >= 0, got {self.gpus}")
        s = self.scheduler
        if s is not None and s != "synchronous" and "://" not in s:
            raise ValueError(f"--scheduler must be 'synchronous' or an address like tcp://host:8786, got {s!r}")
        if self.cluster is not None:
            for given, option in ((s is not None, "--scheduler"), (self.workers is not None, "--workers"),
                                  (self.gpus > 0, "--gpus")):
                if given:
                    raise ValueError(f"{option} does not go with --cluster slurm: the cluster config file sets "
                                     "the jobs, processes and GPUs")


class Runner:
    """Runs tasks; use as a context manager so a LocalCluster is shut down."""

    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self._client: Any = None
        self._cluster: Any = None
        self.n_workers = 1
        #: the Dask dashboard's address (None in-process or when Dask has none)
        self.dashboard: str | None = None

    def __enter__(self) -> Runner:
        cfg = self.config
        if cfg.scheduler == "synchronous":
            return self
        from dask.distributed import Client

        expected = 0
        if cfg.cluster is not None:
            from wsiseg.cluster import start_slurm_cluster

            try:
                self._cluster = start_slurm_cluster(cfg.cluster)
            except (ImportError, RuntimeError) as exc:
                raise SchedulerError(str(exc)) from exc
            self._client = Client(self._cluster)
            expected = cfg.cluster.expected_workers  # the jobs join while SLURM starts them
            log.info("SLURM cluster: %d jobs' workers requested; tasks wait for them", expected)
        elif cfg.scheduler is None:
            n = cfg.workers or max(1, os.cpu_count() or 1)
            with _worker_environment():
                self._cluster = self._local_cluster(n)
                if cfg.gpus:
                    self._add_gpu_workers(cfg.gpus)
            self._client = Client(self._cluster)
        else:
            try:
                self._client = Client(cfg.scheduler)  # waits distributed.comm.timeouts.connect
            except OSError as exc:
                raise SchedulerError(
                    f"cannot reach the Dask scheduler at {cfg.scheduler} ({' '.join(str(exc).split())}); "
                    "start it and its workers (docs/cluster.md) or check --scheduler"
                ) from exc
        self.n_workers = max(1, expected, len(self._client.scheduler_info().get("workers", {})))
        self.dashboard = getattr(self._client, "dashboard_link", None)
        log.info("Dask client %s with %d workers; dashboard %s", self._client, self.n_workers, self.dashboard)
        return self

    def _local_cluster(self, n: int) -> Any:
        from dask.distributed import LocalCluster

        cfg = self.config
        return LocalCluster(
            n_workers=n,
            threads_per_worker=cfg.threads_per_worker,
            processes=True,
            dashboard_address=":0",  # a free port: another cluster's dashboard on 8787 is no concern of ours
            silence_logs=logging.WARNING,
            resources={"CPU": 1} if cfg.gpus else None,
            **self._worker_logging(worker_thread_env(n)),
        )

    def _worker_logging(self, env: dict[str, str] | None = None) -> dict[str, Any]:
        """Nanny options that send a worker's log records to `worker_log` (see `dask_setup`),
        and keep Dask's slow-disk notice (`QUIET_DASK_WARNINGS`) off the terminal: a worker
        warns before its logging is set up, straight to the terminal."""
        env = dict(env or {})
        env["PYTHONWARNINGS"] = ",".join(filter(None, [os.environ.get("PYTHONWARNINGS"), *QUIET_DASK_WARNINGS]))
        if self.config.worker_log is None:
            return {"env": env} if env else {}
        env[WORKER_LOG_ENV] = str(Path(self.config.worker_log).resolve())
        return {"env": env, "preload": [__name__]}

    def _add_gpu_workers(self, gpus: int) -> None:
        # One worker per GPU, each seeing only its own device; model tasks ask for resources={"GPU": 1}.
        from dask.distributed import Nanny

        for gpu in range(gpus):
            self._cluster.worker_spec[f"gpu-{gpu}"] = {
                "cls": Nanny,
                "options": {
                    "nthreads": 1,
                    "resources": {"GPU": 1},
                    **self._worker_logging({"CUDA_VISIBLE_DEVICES": str(gpu)}),
                },
            }
        self._cluster.scale(len(self._cluster.worker_spec))
        self._cluster.sync(self._cluster._correct_state)

    def __exit__(self, *exc: object) -> None:
        if self._client is not None:
            self._client.close()
        if self._cluster is not None:
            self._cluster.close()

    @property
    def distributed(self) -> bool:
        return self._client is not None

    def map_ordered(self, fn: Callable[..., R], items: Iterable[T], *args: Any) -> Iterator[R]:
        """fn(item, *args) for each item, results yielded in item order, bounded in flight."""
        return self.map_chain(items, [Stage(fn)], *args)

    def map_chain(self, items: Iterable[Any], stages: Sequence[Stage], *args: Any) -> Iterator[Any]:
        """For each item, stages[-1](... stages[0](item, *args) ..., *args), yielded in item order.

        On a cluster every stage is its own task, placed by its resources (e.g. reading and
        stitching on CPU workers, the model on GPU workers), so stages of different batches
        overlap; at most `max_in_flight` items are in the pipeline at once.  In this process
        (synchronous) reading and stitching run in threads beside the model (`_in_process`).
        """
        if self._client is None:
            yield from _in_process(items, stages, args)
            return
        window = self.config.max_in_flight or 2 * self.n_workers + 1
        pending: deque[Any] = deque()
        try:
            scattered = [self._client.scatter(a, broadcast=True) if _is_large(a) else a for a in args]
            for item in items:
                fut = item
                for stage in stages:
                    fut = self._client.submit(stage.fn, fut, *scattered, pure=False, resources=self._resources(stage))
                pending.append(fut)
                if len(pending) >= window:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        except Exception as exc:
            if self.scheduler_lost() or _cancelled_by_lost_connection(exc) or self._lost_soon_after(exc):
                raise self._lost_error() from exc
            raise
        finally:
            if not self.scheduler_lost():
                for fut in pending:
                    fut.cancel()

    def scheduler_lost(self) -> bool:
        """True once the Dask client has given up on its scheduler (it closes itself after
        trying to reconnect for distributed.comm.timeouts.connect)."""
        return self._client is not None and self._client.status in ("closing", "closed")

    def _lost_soon_after(self, exc: BaseException, wait_s: float = 1.0) -> bool:
        """True when a connection error (OSError, e.g. Dask's CommClosedError while fetching a
        result) is followed within `wait_s` by the client reconnecting to its scheduler or
        giving up on it: the error reached us before the client's status changed."""
        if not isinstance(exc, OSError) or self._client is None:
            return False
        deadline = time.monotonic() + wait_s
        while True:
            if self._client.status in ("connecting", "closing", "closed"):
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)

    def _lost_error(self) -> SchedulerError:
        import dask
        from dask.utils import parse_timedelta

        address = self.config.scheduler
        where = f"the Dask scheduler at {address}" if address else "the Dask scheduler"
        fix = "start the scheduler and its workers again and " if address else ""
        timeout = parse_timedelta(dask.config.get("distributed.comm.timeouts.connect"), "s")
        return SchedulerError(
            f"lost {where} mid-run (no answer for {timeout:g} s); {fix}rerun the same command: "
            "finished slides are kept and the interrupted one resumes"
        )

    def _resources(self, stage: Stage) -> dict[str, float] | None:
        if not self.config.gpus:
            return None
        return {"GPU": 1} if stage.model else {"CPU": 1}


def _in_process(items: Iterable[Any], stages: Sequence[Stage], args: Sequence[Any]) -> Iterator[Any]:
    """`map_chain` in this process, with the CPU stages beside the model: the stages before the
    first model stage (reading) run one item ahead in a thread, and those after the last model
    stage (stitching) run in another thread while the model takes the next item.  Each item's
    stages are the same calls in the same order as one after the other, so results are equal;
    at most one item waits on each side.  When an item fails (or the run is interrupted) in its
    model stage, the item before it is finished and yielded first, as one after the other would
    have.  Without a model stage: one after the other."""
    def run(value: Any, chain: Sequence[Stage]) -> Any:
        for stage in chain:
            value = stage.fn(value, *args)
        return value

    model_at = [i for i, stage in enumerate(stages) if stage.model]
    if not model_at:
        for item in items:
            yield run(item, stages)
        return
    from concurrent.futures import Future, ThreadPoolExecutor

    before, middle, after = stages[: model_at[0]], stages[model_at[0] : model_at[-1] + 1], stages[model_at[-1] + 1 :]

    with ThreadPoolExecutor(1, thread_name_prefix="wsiseg-read") as reading, \
            ThreadPoolExecutor(1, thread_name_prefix="wsiseg-post") as posting:
        read_next: Future[Any] | None = None
        posted: Future[Any] | None = None
        try:
            iterator = iter(items)
            nxt = next(iterator, _END)
            while nxt is not _END:
                current = reading.submit(run, nxt, before) if read_next is None else read_next
                nxt = next(iterator, _END)
                read_next = reading.submit(run, nxt, before) if nxt is not _END else None
                try:
                    value = run(current.result(), middle)
                except BaseException:  # an interrupt or a failed item: the item before is handed on first
                    if posted is not None:
                        finished, posted = posted, None
                        yield finished.result()
                    raise
                if posted is not None:
                    yield posted.result()
                posted = posting.submit(run, value, after)
            if posted is not None:
                yield posted.result()
                posted = None
        finally:
            for future in (read_next, posted):
                if future is not None:
                    future.cancel()


_END = object()


def _cancelled_by_lost_connection(exc: BaseException) -> bool:
    """True for a future the client cancelled because its scheduler connection dropped: such an
    error can reach us before the client's status leaves "running" (it is still reconnecting)."""
    from distributed.client import FutureCancelledError

    return isinstance(exc, FutureCancelledError) and "connection-lost" in str(exc.reason)


@dataclass(frozen=True)
class Stage:
    """One step of a chained task; `model` steps go to GPU workers when there are any."""

    fn: Callable[..., Any]
    model: bool = False


#: Python warning filters for Dask notices that are no concern of a wsiseg user (Dask warns when
#: creating its scratch folder takes over a second, e.g. on a busy disk).
QUIET_DASK_WARNINGS = ("ignore:Creating scratch directories is taking a surprisingly long time",)


def worker_thread_env(n_workers: int, cpus: int | None = None) -> dict[str, str]:
    """Environment giving each of `n_workers` local worker processes an equal share of the CPUs
    for the numerical libraries' thread pools (torch, OpenMP, BLAS).

    Without it Dask's nanny sets OMP_NUM_THREADS=1 (its `distributed.nanny.pre-spawn-environ`),
    so a single worker on a 16-core machine runs the network on one core; with one pool per
    core in every worker, the workers would oversubscribe the CPUs instead.
    """
    share = max(1, (cpus or os.cpu_count() or 1) // max(1, n_workers))
    return {name: str(share) for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}


@contextmanager
def _worker_environment() -> Iterator[None]:
    """Spawn local workers without Dask's default MALLOC_TRIM_THRESHOLD_=65536: with it, glibc
    returns memory to the OS after every large temporary, and the many short-lived numpy arrays
    of tile processing run about 1.8x slower (measured: benchmarks/README.md)."""
    import dask

    environ = dict(dask.config.get("distributed.nanny.pre-spawn-environ", {}))
    environ.pop("MALLOC_TRIM_THRESHOLD_", None)
    with dask.config.set({"distributed.nanny.pre-spawn-environ": environ}):
        yield


def dask_setup(worker: Any) -> None:
    """Dask's preload hook, run in each local worker process as it starts: when
    WORKER_LOG_ENV names a file, the process's log records (Dask's own, wsiseg's, Python
    warnings) go there instead of to the terminal."""
    path = os.environ.get(WORKER_LOG_ENV)
    if path:
        log_to_file(Path(path), f"worker {os.getpid()}")


def log_to_file(path: Path, who: str) -> None:
    """Send this process's log records to `path` (appended) and none to stderr: drop the
    stderr handlers of the root and "distributed" loggers (Dask adds its own), let
    "distributed" propagate, and route Python warnings through logging."""
    handler = logging.FileHandler(path, delay=True)
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s %(name)s [{who}]: %(message)s"))
    for name in (None, "distributed"):
        logger = logging.getLogger(name)
        for h in list(logger.handlers):
            if isinstance(h, logging.StreamHandler) and getattr(h, "stream", None) in (sys.stderr, sys.__stderr__):
                logger.removeHandler(h)
    logging.getLogger("distributed").propagate = True
    logging.getLogger("distributed").setLevel(logging.WARNING)  # not every connection and plugin
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    logging.captureWarnings(True)


def _is_large(obj: Any) -> bool:
    """Objects worth scattering once instead of shipping with every task (e.g. the prompt set)."""
    return hasattr(obj, "nbytes_estimate") and obj.nbytes_estimate() > 1_000_000
