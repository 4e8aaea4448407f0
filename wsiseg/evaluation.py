"""Evaluation: run a model on every image of a labelled dataset and score it against the truth.

Each image goes through exactly the path of `wsiseg run image.png --mpp X`: the RGB pixels are
written losslessly as a PNG, `wsiseg.pipeline.run_slide` runs on it with `RunConfig(mpp=item.mpp)`
(tissue detection off by default: dataset images are crops of tissue), the predicted instances
are read back from the run's Zarr store onto the truth's pixel grid and scored with
`wsiseg.metrics.score_instances`.  The mean over images is the mean of the per-image metrics
(as the nucleus-segmentation papers report PQ and AJI), not a metric of pooled matches.

    >>> report = evaluate("classical", open_dataset("monuseg/", split="val"), out_dir=Path("eval"))  # doctest: +SKIP
    >>> report.mean["pq"], report.write(Path("eval"))  # doctest: +SKIP

Runs happen in a temporary folder under `out_dir`, removed afterwards unless `keep_runs`.
"""

from __future__ import annotations

import csv
import json
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

if TYPE_CHECKING:
    from wsiseg.datasets.item import NucleusItem
    from wsiseg.pipeline import RunConfig
    from wsiseg.scheduling import SchedulerConfig

__all__ = ["TABLE_COLUMNS", "Comparison", "EvalReport", "evaluate", "model_label"]

log = logging.getLogger(__name__)

#: The per-image columns shown first (and printed by `wsiseg eval`); the rest of the scores follow.
TABLE_COLUMNS: tuple[str, ...] = ("name", "n_true", "n_pred", "pq", "aji", "dice", "f1_detection", "time_s")
#: Mean metrics whose difference between models a comparison reports.
DELTA_METRICS: tuple[str, ...] = ("pq", "aji", "dice", "f1_detection")

EvalProgress = Callable[[str, int, int], None]
"""progress(image name, images done, images in all), called after each image is scored."""


@dataclass
class EvalReport:
    """The scores of one model on one dataset.

    per_image: one dict per image, in dataset order: name, n_true, n_pred, the metrics of
        `wsiseg.metrics.InstanceScores.to_dict()`, mpp (µm/px) and time_s (wall seconds of the run).
    mean: `wsiseg.metrics.mean_scores` of the images: every ratio metric averaged over the
        images where it is defined, counts (n_true, n_pred, tp, ...) summed; plus n_images and
        time_s (mean seconds per image).
    parameters: the run parameters (`RunConfig.parameters()`; mpp is per image) plus radius_um.
    """

    model: str
    label: str
    model_sha256: str | None
    prompter_sha256: str | None
    dataset: str | None
    split: str | None
    parameters: dict[str, Any]
    per_image: list[dict[str, Any]]
    mean: dict[str, Any]
    overlays: list[Path] = field(default_factory=list)
    runs_dir: Path | None = None
    #: the arithmetic the model's network ran at ("fp32"/"bf16", from the first run's provenance; None: no network)
    network_precision: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: model, label, sha256s, network_precision, dataset, split, parameters,
        per_image, mean (NaN -> None)."""
        from wsiseg.writers.report import jsonable

        return jsonable({
            "model": self.model,
            "label": self.label,
            "model_sha256": self.model_sha256,
            "prompter_sha256": self.prompter_sha256,
            "network_precision": self.network_precision,
            "dataset": self.dataset,
            "split": self.split,
            "parameters": self.parameters,
            "per_image": self.per_image,
            "mean": self.mean,
            "runs_dir": self.runs_dir,
        })

    def columns(self) -> list[str]:
        """CSV columns: TABLE_COLUMNS, then every other per-image key in first-seen order."""
        cols = list(TABLE_COLUMNS)
        for row in self.per_image:
            cols.extend(k for k in row if k not in cols)
        return cols

    def rows(self) -> list[dict[str, Any]]:
        """The per-image rows, then the mean as a row named "mean"."""
        return [*self.per_image, {**self.mean, "name": "mean"}]

    def write(self, out_dir: Path | str) -> tuple[Path, Path]:
        """Write `eval.csv` (the rows of `rows()`) and `eval.json` into out_dir; returns their paths."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        return (_write_csv(out_dir / "eval.csv", self.columns(), self.rows()),
                _write_json(out_dir / "eval.json", self.to_dict()))


@dataclass
class Comparison:
    """Several models' reports on the same images, side by side (the first is the reference)."""

    reports: list[EvalReport]

    def __post_init__(self) -> None:
        if not self.reports:
            raise ValueError("a comparison needs at least one report")
        names = [[row["name"] for row in r.per_image] for r in self.reports]
        if any(n != names[0] for n in names):
            raise ValueError("compared reports must cover the same images in the same order")
        labels = [r.label for r in self.reports]
        if len(set(labels)) != len(labels):
            raise ValueError(f"compared models need distinct labels, got {labels}")

    def delta(self) -> dict[str, dict[str, float | None]]:
        """label -> {metric: its mean minus the first model's mean} for DELTA_METRICS."""
        ref = self.reports[0].mean
        out: dict[str, dict[str, float | None]] = {}
        for report in self.reports[1:]:
            out[report.label] = {m: _difference(report.mean.get(m), ref.get(m)) for m in DELTA_METRICS}
        return out

    def columns(self) -> list[str]:
        """Wide CSV columns: name, n_true, then `metric[label]` for every other column of each model."""
        cols = ["name", "n_true"]
        for report in self.reports:
            cols.extend(f"{c}[{report.label}]" for c in report.columns() if c not in ("name", "n_true"))
        return cols

    def rows(self) -> list[dict[str, Any]]:
        """One wide row per image, then the row named "mean"."""
        out = []
        n = len(self.reports[0].per_image)
        for index in range(n + 1):
            row: dict[str, Any] = {}
            for report in self.reports:
                source = report.per_image[index] if index < n else {**report.mean, "name": "mean"}
                row.setdefault("name", source["name"])
                row.setdefault("n_true", source.get("n_true"))
                row.update({f"{k}[{report.label}]": v for k, v in source.items() if k not in ("name", "n_true")})
            out.append(row)
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: dataset, split, reference label, each model's report, and the deltas of the means."""
        from wsiseg.writers.report import jsonable

        first = self.reports[0]
        return jsonable({
            "dataset": first.dataset,
            "split": first.split,
            "reference": first.label,
            "models": [r.to_dict() for r in self.reports],
            "delta_mean": self.delta(),
        })

    def write(self, out_dir: Path | str) -> tuple[Path, Path]:
        """Write the wide `eval.csv` and `eval.json` (every model) into out_dir; returns their paths."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        return (_write_csv(out_dir / "eval.csv", self.columns(), self.rows()),
                _write_json(out_dir / "eval.json", self.to_dict()))


def model_label(model: str | Path) -> str:
    """A short name for a model in tables and file names: a cached model's name, a bundle
    folder's name, a file's stem ("classical" stays "classical")."""
    text = str(model)
    path = Path(text)
    if path.suffix.lower() in (".zip", ".pth", ".pt", ".safetensors"):
        return path.stem
    if path.name == "bundle" and path.parent.name:  # `wsiseg train -o RUN` writes RUN/bundle
        return path.parent.name
    return path.name or text


def evaluate(
    model: str | Path,
    dataset: Sequence[NucleusItem],
    *,
    out_dir: Path | str,
    config: RunConfig | None = None,
    overlays: bool = True,
    progress: EvalProgress | None = None,
    scheduler: SchedulerConfig | str | None = "synchronous",
    keep_runs: bool = False,
    label: str | None = None,
    dataset_name: str | None = None,
    split: str | None = None,
    radius_um: float = 3.0,
) -> EvalReport:
    """Run `model` on every image of `dataset` (as `wsiseg run` would) and score each image.

    model: a model name, a bundle folder/zip (prompter and segmentor, or a segmentor with
        `config.prompter`), or "classical"; it replaces `config.model`.
    config: the run's parameters (tile size, overlap, device, prompter, ...); default
        `RunConfig(tissue_detection=False)`.  Its mpp is replaced by each image's mpp and its
        scheduler by `scheduler`; it may not name a prompts file or an ROI (those belong to one slide).
    scheduler: "synchronous" (in this process, the default), None (a local Dask cluster), a
        scheduler address, or a SchedulerConfig; one Runner serves every image.
    overlays: write `out_dir/overlays/<image name>.png` (or `<name>.<label>.png` when `label`
        is given): true outlines green, predicted magenta, both white.
    label: the model's short name in comparisons and overlay names (default: none, so overlay
        files are named by image only; the report's label then defaults to `model_label(model)`).
    dataset_name, split: recorded in the report (default: the dataset's `name` or `root`
        attribute when it has one; the split all images carry, else "all").
    radius_um: detection-matching radius passed to `score_instances`.

    Raises ValueError for an empty dataset, duplicate image names or a config naming a
    prompts file or ROI; errors of a run (bad model, bad image) propagate unchanged.
    """
    from wsiseg.metrics import mean_scores
    from wsiseg.pipeline import RunConfig
    from wsiseg.scheduling import Runner, SchedulerConfig

    n = len(dataset)
    if n == 0:
        where = f"dataset {dataset_name}" if dataset_name else "the dataset"
        raise ValueError(f"{where} has no images to evaluate; check its path and the split")
    base = config if config is not None else RunConfig(tissue_detection=False)
    if base.prompts_file is not None or base.roi is not None:
        raise ValueError("evaluation runs every image whole: remove the prompts file / ROI from the run config")
    sched = scheduler if isinstance(scheduler, SchedulerConfig) else SchedulerConfig(scheduler=scheduler)
    base = replace(base, model=str(model), scheduler=sched, write_labels=True)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"{'' if keep_runs else '.'}runs-{label or model_label(model)}-", dir=out_dir))
    per_image: list[dict[str, Any]] = []
    scores_list: list[Any] = []
    overlay_paths: list[Path] = []
    record: tuple[str | None, str | None, str | None] = (None, None, None)
    seen: set[str] = set()
    splits: set[str | None] = set()
    models = (base.model, base.prompter)
    _forget_models(models)  # a bundle rewritten since its last use (training) is loaded afresh
    try:
        with Runner(sched) as runner:
            for index in range(n):
                item = dataset[index]
                if item.name in seen:
                    raise ValueError(f"dataset has two images named {item.name!r}; image names must be unique")
                seen.add(item.name)
                splits.add(item.split)
                row, scores, prediction, zarr_path = _run_and_score(item, work, replace(base, mpp=item.mpp),
                                                                    runner, radius_um)
                if index == 0:
                    record = _model_record(zarr_path)
                per_image.append(row)
                scores_list.append(scores)
                if overlays:
                    from wsiseg.evaluation_overlay import write_overlay

                    name = f"{item.name}.{label}.png" if label else f"{item.name}.png"
                    path = out_dir / "overlays" / name
                    overlay_paths.append(write_overlay(path, item.image, item.labels, prediction))
                log.info("%s: %d true, %d predicted, PQ %.4f", item.name, scores.n_true, scores.n_pred, scores.pq)
                if progress is not None:
                    progress(item.name, index + 1, n)
    finally:
        _forget_models(models)
        if not keep_runs:
            shutil.rmtree(work, ignore_errors=True)
    mean: dict[str, Any] = dict(mean_scores(scores_list))
    for key, value in mean.items():  # summed counts read as integers, like the per-image counts
        if isinstance(per_image[0].get(key), int) and float(value).is_integer():
            mean[key] = int(value)
    mean["n_images"] = n
    mean["time_s"] = round(float(np.mean([r["time_s"] for r in per_image])), 4)
    parameters = {**base.parameters(), "mpp": "per image", "radius_um": radius_um}
    return EvalReport(
        model=str(model),
        label=label or model_label(model),
        model_sha256=record[0],
        prompter_sha256=record[1],
        network_precision=record[2],
        dataset=dataset_name if dataset_name is not None else _dataset_attribute(dataset, "name", "root"),
        split=split if split is not None else _split_of(splits),
        parameters=parameters,
        per_image=per_image,
        mean=mean,
        overlays=overlay_paths,
        runs_dir=work if keep_runs else None,
    )


# --------------------------------------------------------------------------- helpers


def _run_and_score(
    item: NucleusItem, work: Path, config: RunConfig, runner: Any, radius_um: float
) -> tuple[dict[str, Any], Any, np.ndarray, Path]:
    """Run one image as `wsiseg run IMAGE.png --mpp X` would, into `work/runs`, and score it:
    (table row, InstanceScores, (H, W) predicted instance map on the truth's grid, the run's Zarr store)."""
    from wsiseg.instances_io import load_instances
    from wsiseg.metrics import score_instances
    from wsiseg.pipeline import run_slide

    image_path = _write_image(work / "images", item)
    t0 = time.perf_counter()
    try:
        result = run_slide(image_path, work / "runs", config, runner=runner)
    finally:
        _forget_slide(image_path)
    elapsed = time.perf_counter() - t0
    prediction = load_instances(result.zarr, shape=item.labels.shape)
    scores = score_instances(prediction, item.labels, mpp=item.mpp, radius_um=radius_um)
    return _row(item, scores.to_dict(), elapsed), scores, prediction, result.zarr


def _write_image(folder: Path, item: NucleusItem) -> Path:
    """The item's RGB pixels as a lossless PNG named after it (PNG carries no mpp: the run gets it)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{item.name}.png"
    Image.fromarray(np.ascontiguousarray(item.image)).save(path, compress_level=1)
    return path


def _row(item: NucleusItem, scores: dict[str, Any], elapsed: float) -> dict[str, Any]:
    row: dict[str, Any] = {"name": item.name}
    row.update({k: scores.get(k) for k in TABLE_COLUMNS[1:-1]})
    row["time_s"] = round(elapsed, 4)
    row.update({k: v for k, v in scores.items() if k not in row})
    row["mpp"] = item.mpp
    return row


def _model_record(zarr_path: Path) -> tuple[str | None, str | None, str | None]:
    """(model sha256, prompter sha256, network precision) from the run's provenance (None where
    it records none)."""
    from wsiseg.writers.zarr_store import open_nuclei

    model = open_nuclei(zarr_path).attrs.get("model", {})
    return model.get("sha256"), model.get("prompter_sha256"), model.get("precision")


def _forget_slide(path: Path) -> None:
    """Drop this process's cached reader of `path` (each evaluated image is read by one run only)."""
    from wsiseg.workers import WORKER_CACHE

    for key in [k for k in WORKER_CACHE if k[0] == "slide" and getattr(k[1], "path", None) == path]:
        del WORKER_CACHE[key]


def _forget_models(names: Sequence[str | None]) -> None:
    """Drop this process's cached models built from `names` (so a rewritten bundle reloads and
    a trainer does not keep a second copy of its model in memory)."""
    from wsiseg.workers import WORKER_CACHE

    wanted = {n for n in names if n is not None}
    for key in [k for k in WORKER_CACHE if k[0] == "models"]:
        spec = key[1]
        if getattr(spec, "model", None) in wanted or getattr(spec, "prompter", None) in wanted:
            del WORKER_CACHE[key]


def _dataset_attribute(dataset: Any, *names: str) -> str | None:
    """The first of the dataset's attributes `names` that is a string or a path, else None."""
    for name in names:
        value = getattr(dataset, name, None)
        if isinstance(value, (str, Path)):
            return str(value)
    return None


def _split_of(splits: set[str | None]) -> str:
    """The split the evaluated images share ("all" when they come from several or none)."""
    only = next(iter(splits)) if len(splits) == 1 else None
    return only or "all"


def _difference(a: Any, b: Any) -> float | None:
    if a is None or b is None:
        return None
    value = float(a) - float(b)
    return value if np.isfinite(value) else None


def _write_csv(path: Path, columns: list[str], rows: list[dict[str, Any]]) -> Path:
    from wsiseg.writers.report import jsonable

    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if v is None else v) for k, v in jsonable(row).items()})
    return path


def _write_json(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(json.dumps(data, indent=2, allow_nan=False) + "\n")
    return path
