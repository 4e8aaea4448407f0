"""Validation of a model being trained: its current weights as a bundle, run by `wsiseg.evaluation`.

The bundle goes to `work_dir/validation/bundle` (rewritten every validation) and each
validation image runs through `wsiseg.pipeline.run_slide`, exactly as `wsiseg run` would,
with the companion model the mode names (a prompter for a segmentor, a segmentor for a
prompter).  Metrics are the means over images of `wsiseg.metrics` (PQ, AJI, F1, ...).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from wsiseg.training.loop import TrainingError

if TYPE_CHECKING:
    from wsiseg.datasets.item import NucleusItem

#: The mean metrics validation reports (keys of `EvalReport.mean`).
METRICS: tuple[str, ...] = ("pq", "dq", "sq", "aji", "dice", "f1_detection", "precision", "recall")


@dataclass(frozen=True)
class ValidationRun:
    """How the validation bundle is combined with another model.

    role: "segmentor" (the trained bundle is `--model`, `companion` its `--prompter`) or
        "prompter" (the trained bundle is `--prompter`, `companion` the `--model`).
    tile_size_px, overlap_px: the run's tiles (a SAM bundle fixes the tile size).
    device: the run's device ("cpu" or "cuda").
    """

    role: str
    companion: str
    tile_size_px: int = 256
    overlap_px: int = 64
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.role not in ("segmentor", "prompter"):
            raise ValueError(f"role must be 'segmentor' or 'prompter', got {self.role!r}")


def validate_bundle(
    write_bundle: Callable[[Path], Path],
    items: list[NucleusItem],
    work_dir: Path,
    epoch: int,
    run: ValidationRun | None,
) -> dict[str, float]:
    """Write the current model with `write_bundle(folder) -> bundle path`, evaluate it on
    `items` (with `run`'s companion, or alone at its own tile size when `run` is None: a
    bundle with both components), write the per-image `eval.csv` / `eval.json` to
    `work_dir/validation/epoch-NNN/`, and return the METRICS means (rounded to 4 decimals;
    NaN where undefined)."""
    from wsiseg.evaluation import evaluate
    from wsiseg.pipeline import RunConfig

    if not items:
        return {}
    bundle = write_bundle(work_dir / "validation" / "bundle")
    config = None
    model = str(bundle)
    if run is not None:
        if run.role == "prompter":
            model = run.companion
        config = RunConfig(
            model=model, prompter=run.companion if run.role == "segmentor" else str(bundle), tissue_detection=False,
            tile_size_px=run.tile_size_px, overlap_px=run.overlap_px, device=run.device,
        )
    out = work_dir / "validation" / f"epoch-{epoch + 1:03d}"
    report = evaluate(model, items, out_dir=out, config=config, overlays=False)
    report.write(out)
    return {k: round(float(report.mean[k]), 4) for k in METRICS if k in report.mean}


def overlap_for(tile_size_px: int) -> int:
    """The validation tile overlap: 64 px (PromptNucSeg's), at most a quarter of the tile, even."""
    return min(64, tile_size_px // 4) // 2 * 2


def prompter_validation_run(segmentor: str, device: str) -> ValidationRun:
    """The ValidationRun of a prompter bundle run with `segmentor` on `device` ("cpu" or
    "cuda"): tiles of the segmentor's size (`companion_tile_size`), overlap `overlap_for`."""
    tile = companion_tile_size(segmentor)
    return ValidationRun("prompter", segmentor, tile_size_px=tile, overlap_px=overlap_for(tile), device=device)


def companion_tile_size(segmentor: str) -> int:
    """The tile size a validation run with `segmentor` needs: a SAM bundle's input size, else 256."""
    from wsiseg.models.bundles import BundleError, open_bundle
    from wsiseg.models.cache import ModelNotFoundError, resolve_model

    if segmentor == "classical":
        return 256
    try:
        target = resolve_model(segmentor)
        if target == "classical" or (target.is_file() and target.suffix.lower() in (".pth", ".pt")):
            return 256
        return open_bundle(target).manifest.input_size or 256
    except (BundleError, ModelNotFoundError) as exc:
        raise TrainingError(f"--val-segmentor {segmentor}: {exc}") from exc
