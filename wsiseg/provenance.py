"""What a run records about itself: provenance for the Zarr store, and the per-slide report."""

from __future__ import annotations

import time
import uuid
from contextlib import suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from wsiseg._version import __version__
from wsiseg.models.protocols import NucleusClass, Prompter, Segmentor
from wsiseg.workers import network_precision
from wsiseg.writers.report import UNREADABLE_TILES_KEY

if TYPE_CHECKING:
    from wsiseg.pipeline import RunConfig


def model_sha256(model: str | None) -> str | None:
    """The sha256 of a bundle's manifest (which lists the sha256 of every weight file), or None
    for the built-in model and raw checkpoints."""
    if model is None:
        return None
    from wsiseg.models.bundles import open_bundle
    from wsiseg.models.cache import resolve_model

    try:
        target = resolve_model(model)
        if target == "classical" or Path(target).is_file():
            return None
        return str(open_bundle(target).sha256)
    except (ValueError, OSError, LookupError):
        return None


def build_provenance(
    slide_path: Path, props: Any, slide_mpp: float, scale: float, config: RunConfig,
    segmentor: Segmentor, prompter: Prompter | None, classes: Sequence[NucleusClass],
) -> dict[str, Any]:
    """Root attributes of the Zarr store: tool, source slide, frame, model, classes, parameters."""
    bounds = props.bounds_l0
    return {
        "format_version": 1,
        "tool": "wsiseg",
        "version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "run_id": str(uuid.uuid4()),
        "source": {
            "path": str(slide_path.resolve()),
            "file_size": slide_path.stat().st_size,
            "reader": props.reader,
            "vendor": props.vendor,
            "width": props.size_l0[0],
            "height": props.size_l0[1],
            "mpp": slide_mpp,
            "objective_power": props.objective_power,
            "bounds": list(bounds) if bounds else None,
        },
        "coordinate_frame": {
            "space": "level0_pixels",
            "origin": "openslide_level0_top_left",
            "y_axis": "down",
            "pixel_convention": "edge",
            "qupath_offset": [bounds[0], bounds[1]] if bounds else [0, 0],
        },
        "model": {
            "segmentor": getattr(segmentor, "name", type(segmentor).__name__),
            "prompter": getattr(prompter, "name", None) if prompter else None,
            "sha256": model_sha256(config.model),
            "prompter_sha256": model_sha256(config.prompter),
            "mpp": segmentor.mpp,
            "working_scale": scale,
            # the arithmetic the dense-map network ran at ("fp32"/"bf16"), None for other models
            "precision": network_precision(prompter, segmentor),
        },
        "classes": [{"id": c.id, "name": c.name, "color": list(c.color)} for c in classes],
        "parameters": config.parameters(),
    }


def build_report(
    slide_path: Path, props: Any, config: RunConfig, segmentor: Segmentor, prompter: Prompter | None,
    scale: float, work: dict[str, float], wall_s: float, counts: dict[str, int],
    *, unreadable_tiles: Sequence[dict[str, Any]] = (),
) -> dict[str, Any]:
    """The per-slide report: counts, task times, the model's share of wall time, parameters.

    unreadable_tiles: tiles the slide file could not decode, read as background
    (--on-bad-tile skip), as dicts level, x_l0, y_l0, width_l0, height_l0 (level-0 px), reason;
    listed under `unreadable_tiles` (always present, empty for an undamaged slide).
    """
    workers = counts["workers"]
    st = slide_path.stat()
    return {
        "slide": str(slide_path),
        "source": {"path": str(slide_path.resolve()), "size_bytes": st.st_size, "mtime_ns": st.st_mtime_ns},
        "wsiseg_version": __version__,
        "reader": props.reader,
        "vendor": props.vendor,
        "size_l0": list(props.size_l0),
        "mpp": props.mpp[0] if props.mpp else config.mpp,
        # the resolution the file states (None: none, or an implausible one); differs from mpp under --mpp
        "file_mpp": float(props.file_mpp[0]) if getattr(props, "file_mpp", None) else None,
        "model": {
            "segmentor": getattr(segmentor, "name", "?"),
            "prompter": getattr(prompter, "name", None) if prompter else "file",
            "mpp": segmentor.mpp,
            "working_scale": scale,
            # the arithmetic the dense-map network ran at ("fp32"/"bf16"), None for other models
            "precision": network_precision(prompter, segmentor),
            # the score a prompt needed: --min-score, else the prompter's own threshold (None: none)
            "min_score": config.min_score if config.min_score is not None else getattr(prompter, "min_score", None),
        },
        "counts": {k: v for k, v in counts.items() if k != "workers"},
        "task_time_s": {k: round(v, 4) for k, v in work.items()},
        "workers": workers,
        # share of the workers' wall time spent inside the model (1.0 = the model never waits)
        "model_fraction_of_wall": round(work.get("model", 0.0) / max(wall_s * workers, 1e-9), 4),
        UNREADABLE_TILES_KEY: [dict(t) for t in unreadable_tiles],
        "parameters": config.parameters(),
    }


def model_version(role: str, name: str) -> dict[str, Any]:
    """Role, name, version and sha256 of a model the run named (None where it is not a bundle)."""
    from wsiseg.models.bundles import open_bundle
    from wsiseg.models.cache import resolve_model

    entry: dict[str, Any] = {"role": role, "name": name, "version": None, "sha256": None}
    with suppress(ValueError, OSError, LookupError):  # not a bundle: no version, no sha256
        target = resolve_model(name)
        if target != "classical" and not Path(target).is_file():
            bundle = open_bundle(target)
            entry.update(version=bundle.manifest.version, sha256=bundle.sha256)
    return entry
