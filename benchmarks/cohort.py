"""Cohort benchmark: N small slides as one `wsiseg run FOLDER` versus N separate
`wsiseg run SLIDE` invocations, to show that start-up (Python and torch imports, model
loading, the Dask cluster's start and stop) is paid once per cohort, not once per slide.

    python benchmarks/cohort.py                             # 5 slides of 2048² px, wsiseg-tiny (a few minutes)
    python benchmarks/cohort.py --slides 2 --size 256 --model classical --workers 1   # quicker
    python benchmarks/cohort.py --slides 2 --size 256 --model classical --scheduler synchronous   # no Dask

Figures, printed and written as JSON to benchmarks/results/cohort-<time>.json:
- separate / cohort: wall time of the `wsiseg run` processes; the slides' own time (each
  report's timings_s.total, from opening the slide to its last output); and per slide, the
  rest: start-up overhead = (wall - slides' own time) / slides.
- startup_components_s: the pieces of that overhead, timed once in a fresh process (Python
  start with wsiseg's imports, `import torch` unless the model is "classical", model load,
  Dask LocalCluster start and stop).  A cohort pays them
  once; separate runs pay them once per slide.
A Dask worker loads its model at its first task, inside the first slide's own time, so the
cohort's advantage is, if anything, understated.
"""

from __future__ import annotations

import argparse
import importlib
import json
import shutil
import subprocess
import tempfile
import sys
import time
from pathlib import Path
from typing import Any

from common import RESULTS, created, machine_info, make_slide, write_record

#: `wsiseg` without relying on the console script being on PATH
WSISEG = [sys.executable, "-c", "from wsiseg.cli.main import main; main()"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--slides", type=int, default=5, help="slides in the cohort")
    p.add_argument("--size", type=int, default=2048, help="side of each synthetic slide in px (0.5 µm/px)")
    p.add_argument("--model", default="wsiseg-tiny")
    p.add_argument("--workers", type=int, default=2, help="LocalCluster workers of each run")
    p.add_argument("--scheduler", default=None,
                   help="as `wsiseg run --scheduler`: 'synchronous' (no Dask) or tcp://host:port "
                   "(default: a LocalCluster)")
    p.add_argument("--device", default="auto", choices=["cpu", "cuda", "auto"])
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.slides < 1 or args.size < 64 or args.workers < 1:
        p.error("--slides and --workers must be >= 1 and --size >= 64")
    if args.probe:
        print(json.dumps(probe(args.model, args.device, args.workers, args.scheduler)))
        return 0

    folder = args.out / "slides" / f"cohort-{args.size}-{args.slides}"
    slides = [make_slide(args.size, folder, seed=i) for i in range(args.slides)]
    work = args.out / "cohort-work"
    shutil.rmtree(work, ignore_errors=True)
    options = ["--model", args.model, "--workers", str(args.workers), "--device", args.device, "-q", "--overwrite"]
    if args.scheduler:
        options += ["--scheduler", args.scheduler]
    where = f"scheduler {args.scheduler}" if args.scheduler else f"{args.workers} workers"
    print(f"{args.slides} slides of {args.size}² px, model {args.model}, {where}", flush=True)

    runs = []
    for i, slide in enumerate(slides):
        wall = _wsiseg_run([str(slide)], work / f"separate-{i}", options)
        own = _slide_times(work / f"separate-{i}")[0]
        runs.append({"slide": slide.name, "wall_s": round(wall, 3), "slide_s": own, "overhead_s": round(wall - own, 3)})
    separate = _summary(sum(r["wall_s"] for r in runs), [r["slide_s"] for r in runs])
    separate["runs"] = runs
    wall = _wsiseg_run([str(folder)], work / "cohort", options)
    cohort = _summary(wall, _slide_times(work / "cohort"))
    if len(cohort["slides_s"]) != len(slides):
        raise SystemExit(f"the cohort run wrote {len(cohort['slides_s'])} reports for {len(slides)} slides; see {work}")

    t = time.perf_counter()
    probe_cmd = [sys.executable, __file__, "--probe", "--model", args.model, "--device", args.device,
                 "--workers", str(args.workers), *(["--scheduler", args.scheduler] if args.scheduler else [])]
    done = subprocess.run(probe_cmd, check=True, capture_output=True, text=True)
    parts = json.loads(done.stdout.strip().splitlines()[-1])
    components = {"python_start_s": round(max(time.perf_counter() - t - sum(parts.values()), 0.0), 4), **parts}
    once = sum(components.values())
    record = {
        "created": created(),
        "machine": machine_info(),
        "model": args.model,
        "device": args.device,
        "workers": args.workers,
        "scheduler": args.scheduler,
        "slides": args.slides,
        "size_px": args.size,
        "separate": separate,
        "cohort": cohort,
        "startup_components_s": {**components, "total_s": round(once, 4)},
        "startup_paid_s": {"cohort": round(once, 3), "separate": round(once * args.slides, 3)},
        "saved_s": round(separate["wall_s"] - cohort["wall_s"], 3),
    }
    _print(record)
    shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {write_record(record, args.out, 'cohort')}")
    return 0


def probe(model: str, device: str, workers: int, scheduler: str | None = None) -> dict[str, float]:
    """The start-up pieces, timed in this (fresh) process: torch import (0 for "classical",
    which runs without torch), model load, the Runner's start and stop (a LocalCluster of
    `workers`, or `scheduler`: nearly 0 for "synchronous"), in seconds."""
    torch_s = 0.0
    if model != "classical":
        t = time.perf_counter()
        importlib.import_module("torch")
        torch_s = time.perf_counter() - t
    from wsiseg.pipeline import RunConfig, load_run_models
    from wsiseg.scheduling import Runner, SchedulerConfig

    config = RunConfig(model=model, device=device, scheduler=SchedulerConfig(scheduler=scheduler, workers=workers))
    t = time.perf_counter()
    load_run_models(config)
    load_s = time.perf_counter() - t
    t = time.perf_counter()
    runner = Runner(config.scheduler).__enter__()
    start_s = time.perf_counter() - t
    t = time.perf_counter()
    runner.__exit__(None, None, None)
    stop_s = time.perf_counter() - t
    return {"torch_import_s": round(torch_s, 4), "model_load_s": round(load_s, 6),
            "dask_cluster_start_s": round(start_s, 6), "dask_cluster_stop_s": round(stop_s, 6)}


def _wsiseg_run(inputs: list[str], out: Path, options: list[str]) -> float:
    """Wall time (s) of one `wsiseg run INPUTS -o OUT OPTIONS` process; raises on failure."""
    t = time.perf_counter()
    # run outside the source tree, so the installed package is imported, not the checkout's folder
    done = subprocess.run([*WSISEG, "run", *inputs, "-o", str(out), *options], capture_output=True, text=True,
                          cwd=tempfile.gettempdir())
    wall = time.perf_counter() - t
    if done.returncode:
        raise SystemExit(f"wsiseg run {' '.join(inputs)} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    return wall


def _slide_times(out: Path) -> list[float]:
    """Each slide's own time (s) from the reports in `out`, in name order."""
    reports = sorted(out.glob("*.report.json"))
    return [float(json.loads(r.read_text())["timings_s"]["total"]) for r in reports]


def _summary(wall: float, own: list[float]) -> dict[str, Any]:
    n = max(len(own), 1)
    return {
        "wall_s": round(wall, 3),
        "slides_s": own,
        "slide_s": round(sum(own), 3),
        "per_slide_wall_s": round(wall / n, 3),
        "per_slide_overhead_s": round((wall - sum(own)) / n, 3),
    }


def _print(r: dict[str, Any]) -> None:
    n, sep, coh, comp = r["slides"], r["separate"], r["cohort"], r["startup_components_s"]
    print(f"  separate runs: {n} x wsiseg run SLIDE: {sep['wall_s']:.1f} s ({sep['per_slide_wall_s']:.1f} s a slide, "
          f"of which {sep['per_slide_overhead_s']:.1f} s start-up)")
    print(f"  one cohort:    wsiseg run FOLDER:    {coh['wall_s']:.1f} s ({coh['per_slide_wall_s']:.1f} s a slide, "
          f"of which {coh['per_slide_overhead_s']:.1f} s start-up)")
    print(f"  start-up, timed once: Python {comp['python_start_s']:.1f} s + torch import {comp['torch_import_s']:.1f} s"
          f" + model load {comp['model_load_s']:.2f} s + Dask start {comp['dask_cluster_start_s']:.1f} s"
          f" + stop {comp['dask_cluster_stop_s']:.1f} s = {comp['total_s']:.1f} s")
    print(f"  paid once by the cohort, {n} times ({r['startup_paid_s']['separate']:.1f} s) by separate runs; "
          f"the cohort saved {r['saved_s']:.1f} s")


if __name__ == "__main__":
    sys.exit(main())
