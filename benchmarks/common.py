"""What the benchmark scripts share: cached synthetic slides, machine facts, a pipeline run's
figures and the JSON record they write to benchmarks/results/.

Imported by `run.py`, `gpu.py` and `cohort.py` (each run as a script, so this folder is on
sys.path).  Nothing here imports torch or Dask.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
#: default output folder of every benchmark (git-ignored)
RESULTS = HERE / "results"


def make_slide(
    size: int,
    folder: Path,
    seed: int = 0,
    *,
    mpp: float = 0.5,
    tissue_fraction: float = 0.9,
    tissue_pieces: int = 3,
) -> Path:
    """A synthetic size x size px SVS in `folder` (written once, then reused).

    mpp: µm per level-0 pixel (0.25 is a 40x scan).  tissue_fraction: share of the slide
    covered by tissue (1.0: tissue everywhere).  The file is written under a temporary name
    and renamed when complete, so an interrupted write is never taken for a cached slide.
    """
    from wsiseg.synthetic import make_nuclei, write_svs_like

    default = (mpp, tissue_fraction, tissue_pieces, seed) == (0.5, 0.9, 3, 0)
    name = f"synthetic-{size}"
    if not default:
        name += f"-{mpp:g}mpp-t{tissue_fraction:g}-p{tissue_pieces}-s{seed}"
    path = folder / f"{name}.svs"
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        spec = synthetic_spec(size, seed, mpp=mpp, tissue_fraction=tissue_fraction, tissue_pieces=tissue_pieces)
        partial = folder / f"{name}.partial"  # not a slide suffix: a folder run never picks it up
        t = time.perf_counter()
        write_svs_like(partial, spec, make_nuclei(spec))
        partial.replace(path)
        print(f"  wrote {path.name} in {time.perf_counter() - t:.1f}s", flush=True)
    return path


def synthetic_spec(
    size: int, seed: int = 0, *, mpp: float = 0.5, tissue_fraction: float = 0.9, tissue_pieces: int = 3
) -> Any:
    """The SyntheticSpec `make_slide` writes (its nuclei: `wsiseg.synthetic.make_nuclei(spec)`)."""
    from wsiseg.synthetic import SyntheticSpec

    return SyntheticSpec(
        width=size, height=size, mpp=mpp, seed=seed, tissue_fraction=tissue_fraction, tissue_pieces=tissue_pieces
    )


def machine_info() -> dict[str, Any]:
    """Python version, platform and CPU count of this machine."""
    return {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count()}


def pipeline_figures(report: dict[str, Any], wall_s: float) -> dict[str, Any]:
    """Throughput and stage figures of one `run_slide` from its report (`SlideResult.report_data`).

    wall_s: the run's wall time (s).  tiles: prompter + segmentor tiles.  stitch+write rate per
    core: nuclei per CPU second of the stitching threads and of writing (thread CPU time, so
    time spent waiting for the model's thread does not count; closing the writers at the end
    by its wall time); the `_wall` figure divides by their wall time instead, waits included.
    """
    counts = report["counts"]
    task = report["task_time_s"]
    timings = report["timings_s"]
    # closing the writers (after the last tile, nothing else running): its wall time is its CPU time
    closing = task.get("write_close", 0.0)
    post_write = task.get("post", 0.0) + task.get("write_wall", 0.0) + closing
    post_write_cpu = task.get("post_cpu", 0.0) + task.get("write_cpu", 0.0) + closing
    return {
        "wall_s": round(wall_s, 3),
        "prompter_tiles": counts["prompter_tiles"],
        "segmentor_tiles": counts["segmentor_tiles"],
        "nuclei": counts["nuclei"],
        "tiles_per_s": round((counts["prompter_tiles"] + counts["segmentor_tiles"]) / wall_s, 2),
        "nuclei_per_s": round(counts["nuclei"] / wall_s, 1),
        "stage_s": timings,
        "task_s": task,
        "model_fraction_of_wall": report["model_fraction_of_wall"],
        # the arithmetic the network ran at ("fp32"/"bf16"; None: a model without one)
        "precision": report["model"].get("precision"),
        "stitch_write_nuclei_per_s_per_core": round(counts["nuclei"] / max(post_write_cpu, 1e-9), 1),
        "stitch_write_nuclei_per_s_wall": round(counts["nuclei"] / max(post_write, 1e-9), 1),
    }


def write_record(record: dict[str, Any], out_dir: Path, prefix: str) -> Path:
    """Write `record` as `out_dir/PREFIX-YYYYmmdd-HHMMSS.json` (indented) and return the path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(record, indent=2))
    return path


def created() -> str:
    """The record's creation time, as run.py has always written it."""
    return time.strftime("%Y-%m-%dT%H:%M:%S")
