"""The epoch loop every `wsiseg train` mode shares: seeded, resumable, logged, early-stopped.

A mode supplies a `TrainingTask` (its model, optimiser, batches, one step, validation and
export); `fit` runs the epochs.  Reproducibility: epoch e draws its batches from
`numpy.random.default_rng([seed, e])` and seeds torch with the same pair, so the batches and
the loss curve of a run resumed after epoch e are those of an uninterrupted run.

Files in the work folder (`out_dir`):
- `checkpoint.pt`  model, optimiser and scheduler state, epoch, history; written after every
  epoch (atomically: a kill never leaves a half-written checkpoint); read by `resume=True`.
- `best.pt`        the model state of the best validation epoch (when validating).
- `metrics.csv`, `metrics.json`  one row per epoch: mean losses, validation metrics, time.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
BEST = "best.pt"


class TrainingError(RuntimeError):
    """A training run cannot start or continue; the message says why and what to do."""


@dataclass(frozen=True)
class LoopConfig:
    """epochs: how many; steps_per_epoch: optimiser steps per epoch; seed: the run's seed;
    validate_every: epochs between validations (0: never); monitor: the validation metric to
    maximise; patience: stop after this many validations without improvement (None: never);
    keep: which model the bundle gets, "last" or "best" (best needs validation)."""

    epochs: int
    steps_per_epoch: int
    seed: int = 0
    validate_every: int = 1
    monitor: str = "pq"
    patience: int | None = None
    keep: str = "last"

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.steps_per_epoch < 1:
            raise ValueError(f"epochs and steps_per_epoch must be >= 1, got {self.epochs}, {self.steps_per_epoch}")
        if self.validate_every < 0:
            raise ValueError(f"validate_every must be >= 0, got {self.validate_every}")
        if self.patience is not None and self.patience < 1:
            raise ValueError(f"patience must be >= 1 or None, got {self.patience}")
        if self.keep not in ("last", "best"):
            raise ValueError(f"keep must be 'last' or 'best', got {self.keep!r}")
        if self.keep == "best" and self.validate_every == 0:
            raise ValueError("keep='best' needs validation (validate_every >= 1)")


class TrainingTask(Protocol):
    """What a training mode gives the loop."""

    model: Any  # torch.nn.Module
    optimizer: Any  # torch.optim.Optimizer
    scheduler: Any  # a torch LR scheduler stepped once per step, or None

    def batches(self, epoch: int, rng: np.random.Generator, steps: int) -> Iterator[Any]:
        """`steps` training batches of one epoch, drawn from rng."""
        ...

    def step(self, batch: Any) -> dict[str, float]:
        """One forward/backward/optimiser step; returns the losses (floats, key "loss" first)."""
        ...

    def validate(self, epoch: int, work_dir: Path) -> dict[str, float]:
        """Validation metrics (e.g. pq, aji, f1_detection) of the current model."""
        ...

    def export(self, out_dir: Path, state: dict[str, Any], history: list[dict[str, Any]]) -> Path:
        """Write a bundle of the model with `state` (a state dict) to out_dir; returns its path."""
        ...


@dataclass
class FitResult:
    bundle: Path
    history: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int | None = None
    stopped_early: bool = False


def _atomic_save(obj: Any, path: Path) -> None:
    import torch

    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _plain(settings: dict[str, Any]) -> dict[str, Any]:
    """settings as JSON values (tuples become lists), so they survive the checkpoint unchanged."""
    return json.loads(json.dumps(settings, default=str))


def _row_text(row: dict[str, Any]) -> str:
    """One epoch's metrics row as "loss 0.7287, fg_bce 0.1887, ..., lr 0.00062, train_s 158"."""
    parts = []
    for key, value in row.items():
        if key == "epoch":
            continue
        if isinstance(value, float):
            text = f"{value:.0f}" if key.endswith("_s") else f"{value:.3g}" if key == "lr" else f"{value:.4f}"
        else:
            text = str(value)
        parts.append(f"{key} {text}")
    return ", ".join(parts)


def _write_logs(out_dir: Path, history: list[dict[str, Any]]) -> None:
    (out_dir / "metrics.json").write_text(json.dumps(history, indent=1) + "\n", encoding="utf-8")
    keys: list[str] = []
    for row in history:
        keys.extend(k for k in row if k not in keys)
    with open(out_dir / "metrics.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys)
        writer.writeheader()
        writer.writerows(history)


class _Bar:
    """One updating stderr line: epoch, step, mean loss, ETA of the run."""

    def __init__(self, enabled: bool, total_steps: int, done_steps: int) -> None:
        self.enabled = enabled
        self.total = total_steps
        self.start_done = done_steps
        self.t0 = time.monotonic()
        self.last = 0.0

    def update(self, epoch: int, epochs: int, step: int, steps: int, done: int, loss: float) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self.last < 0.5 and step < steps:
            return
        self.last = now
        rate = (done - self.start_done) / max(now - self.t0, 1e-9)
        eta = (self.total - done) / rate if rate > 0 else math.inf
        eta_text = f"{eta / 60:5.1f} min" if math.isfinite(eta) else "  ?  "
        sys.stderr.write(f"\repoch {epoch + 1}/{epochs} step {step}/{steps} loss {loss:.4f} ETA {eta_text} ")
        if step >= steps:
            sys.stderr.write("\n")
        sys.stderr.flush()


def fit(
    task: TrainingTask,
    out_dir: Path,
    config: LoopConfig,
    *,
    resume: bool = False,
    progress: bool = True,
    stop_after_epochs: int | None = None,
    settings: dict[str, Any] | None = None,
) -> FitResult:
    """Train `task` for config.epochs and write its bundle to `out_dir / "bundle"`.

    resume: continue from out_dir/checkpoint.pt (an error when there is none); without it an
    existing checkpoint is an error, so a finished or half-done run is never overwritten by
    accident.  stop_after_epochs: return after this many epochs of this call (for tests and
    time-boxed sessions); the run is then resumable.  settings: the run's options (JSON-ready),
    stored in the checkpoint; resuming with other settings is refused, since the weights would
    no longer match the recipe that names them.
    Raises TrainingError for a missing or unexpected checkpoint, or changed settings.
    """
    import torch

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = out_dir / CHECKPOINT
    history: list[dict[str, Any]] = []
    start_epoch = 0
    best: float = -math.inf
    best_epoch: int | None = None
    since_best = 0
    if resume:
        if not ckpt_path.is_file():
            raise TrainingError(f"{ckpt_path} does not exist: nothing to resume (run without --resume)")
        state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        stored = state.get("settings")
        if settings is not None and stored is not None and stored != _plain(settings):
            changed = sorted(k for k in set(stored) | set(_plain(settings)) if stored.get(k) != _plain(settings).get(k))
            detail = ", ".join(f"{k}: {stored.get(k)!r} in the run, {_plain(settings).get(k)!r} now" for k in changed[:6])
            raise TrainingError(f"{out_dir} was trained with other settings ({detail}); resume with the run's options")
        task.model.load_state_dict(state["model"])
        task.optimizer.load_state_dict(state["optimizer"])
        if task.scheduler is not None and state.get("scheduler") is not None:
            task.scheduler.load_state_dict(state["scheduler"])
        start_epoch = int(state["epoch"])
        history = list(state["history"])
        best = float(state["best"])
        best_epoch = state["best_epoch"]
        since_best = int(state["since_best"])
        log.info("resuming %s after epoch %d", out_dir, start_epoch)
    elif ckpt_path.exists():
        raise TrainingError(
            f"{out_dir} already holds a training run ({CHECKPOINT}); pass --resume to continue it "
            "or choose another output folder"
        )

    total_steps = config.epochs * config.steps_per_epoch
    bar = _Bar(progress and sys.stderr.isatty(), total_steps, start_epoch * config.steps_per_epoch)
    stopped_early = False
    epochs_run = 0
    for epoch in range(start_epoch, config.epochs):
        if stop_after_epochs is not None and epochs_run >= stop_after_epochs:
            break
        t0 = time.perf_counter()
        rng = np.random.default_rng([config.seed, epoch])
        torch.manual_seed(config.seed * 100_003 + epoch)
        task.model.train()
        sums: dict[str, float] = {}
        n = 0
        for n, batch in enumerate(task.batches(epoch, rng, config.steps_per_epoch), start=1):
            losses = task.step(batch)
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            if not math.isfinite(losses.get("loss", 0.0)):
                raise TrainingError(f"loss became {losses.get('loss')} at epoch {epoch + 1}, step {n}; lower the learning rate")
            bar.update(epoch, config.epochs, n, config.steps_per_epoch, epoch * config.steps_per_epoch + n,
                       sums.get("loss", 0.0) / n)
        row: dict[str, Any] = {"epoch": epoch + 1, **{k: round(v / max(n, 1), 6) for k, v in sums.items()}}
        row["lr"] = float(task.optimizer.param_groups[0]["lr"])
        row["train_s"] = round(time.perf_counter() - t0, 2)
        validate = config.validate_every and ((epoch + 1) % config.validate_every == 0 or epoch + 1 == config.epochs)
        if validate:
            tv = time.perf_counter()
            task.model.eval()
            metrics = task.validate(epoch, out_dir)
            row.update({f"val_{k}": v for k, v in metrics.items()})
            row["val_s"] = round(time.perf_counter() - tv, 2)
            score = float(metrics.get(config.monitor, -math.inf))
            if score > best:
                best, best_epoch, since_best = score, epoch + 1, 0
                _atomic_save({k: v.detach().cpu() for k, v in task.model.state_dict().items()}, out_dir / BEST)
            else:
                since_best += 1
        history.append(row)
        log.info("epoch %d/%d: %s", epoch + 1, config.epochs, _row_text(row))
        _atomic_save(
            {
                "model": task.model.state_dict(),
                "optimizer": task.optimizer.state_dict(),
                "scheduler": task.scheduler.state_dict() if task.scheduler is not None else None,
                "epoch": epoch + 1,
                "history": history,
                "best": best,
                "best_epoch": best_epoch,
                "since_best": since_best,
                "settings": _plain(settings) if settings is not None else None,
            },
            ckpt_path,
        )
        _write_logs(out_dir, history)
        epochs_run += 1
        if config.patience is not None and since_best >= config.patience:
            stopped_early = True
            log.info("early stop after epoch %d: no %s gain in %d validations", epoch + 1, config.monitor, since_best)
            break

    finished = stopped_early or (history and history[-1]["epoch"] >= config.epochs)
    if not finished:
        return FitResult(out_dir / "bundle", history, best_epoch, stopped_early=False)
    if config.keep == "best" and (out_dir / BEST).is_file():
        state = torch.load(out_dir / BEST, map_location="cpu", weights_only=True)
    else:
        state = {k: v.detach().cpu() for k, v in task.model.state_dict().items()}
    bundle = task.export(out_dir / "bundle", state, history)
    return FitResult(bundle, history, best_epoch, stopped_early)
