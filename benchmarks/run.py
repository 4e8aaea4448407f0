"""Pipeline benchmark on generated slides: throughput, stage times, model share, peak memory.

    python benchmarks/run.py                         # 4096² and 8192² slides (a few minutes)
    python benchmarks/run.py --sizes 8192 32768      # the memory budget check: flat peak RSS (long)
    python benchmarks/run.py --model BUNDLE --tile-size 256 --workers 2

Each slide size runs in a fresh child process (so peak RSS is that run's own), first with the
synchronous scheduler (peak RSS of one process doing everything), then, with --workers N > 0,
on a LocalCluster for throughput.  A bare tile-decode loop (OpenSlide read_region over every
level-0 tile) on the same slide gives the reading baseline.  Figures are printed and written
as JSON to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import HERE, created, machine_info, make_slide, pipeline_figures, write_record


def bare_decode(slide: Path, tile: int = 256) -> dict[str, float]:
    """Read every level-0 tile with OpenSlide directly: the floor for any reader."""
    import numpy as np
    import openslide

    s = openslide.OpenSlide(str(slide))
    w, h = s.dimensions
    n = 0
    t = time.perf_counter()
    for y in range(0, h, tile):
        for x in range(0, w, tile):
            np.asarray(s.read_region((x, y), 0, (tile, tile)))[..., :3]
            n += 1
    dt = time.perf_counter() - t
    return {"tiles": n, "seconds": round(dt, 3), "tiles_per_s": round(n / dt, 1)}


def wsiseg_read(slide: Path, tile: int = 256) -> dict[str, float]:
    """The same tiles through wsiseg's reader at the classical model's mpp (no model)."""
    from wsiseg.readers import open_slide
    from wsiseg.readers.scaled import ScaledSlide

    scaled = ScaledSlide(open_slide(slide), 0.5)
    w, h = scaled.size_px
    n = 0
    t = time.perf_counter()
    for y in range(0, h, tile):
        for x in range(0, w, tile):
            scaled.read(x, y, tile, tile)
            n += 1
    dt = time.perf_counter() - t
    return {"tiles": n, "seconds": round(dt, 3), "tiles_per_s": round(n / dt, 1)}


def child(slide: Path, out: Path, args: argparse.Namespace, workers: int) -> dict[str, Any]:
    """One pipeline run in this process; returns the figures."""
    from wsiseg.pipeline import RunConfig, run_slide
    from wsiseg.scheduling import SchedulerConfig

    sched = SchedulerConfig(scheduler="synchronous") if workers == 0 else SchedulerConfig(workers=workers)
    config = RunConfig(
        model=args.model, prompter=args.prompter, tile_size_px=args.tile_size, overlap_px=args.overlap, scheduler=sched,
        batch_tiles=args.batch_tiles, device=args.device, tta=args.tta, precision=args.precision,
    )
    t = time.perf_counter()
    result = run_slide(slide, out, config)
    wall = time.perf_counter() - t
    return {
        "workers": workers,
        **pipeline_figures(result.report_data, wall),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[4096, 8192])
    p.add_argument("--model", default="classical")
    p.add_argument("--prompter", default=None, help="prompter to pair with a segmentor-only bundle")
    p.add_argument("--tile-size", type=int, default=None, help="model px (default: the model's own)")
    p.add_argument("--overlap", type=int, default=64)
    p.add_argument("--batch-tiles", type=int, default=8)
    p.add_argument("--workers", type=int, default=2, help="LocalCluster workers for the throughput run (0: skip)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--tta", action="store_true", help="test-time augmentation (wsiseg-tiny-type models; wsiseg run --tta)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default=None,
                   help="network arithmetic (wsiseg-tiny-type models; wsiseg run --precision; default: the model's)")
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument("--child", nargs=3, metavar=("SLIDE", "OUT", "WORKERS"), help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.child:
        slide, out, workers = Path(args.child[0]), Path(args.child[1]), int(args.child[2])
        print(json.dumps(child(slide, out, args, workers)))
        return

    args.out.mkdir(parents=True, exist_ok=True)
    slides_dir = args.out / "slides"
    slides_dir.mkdir(exist_ok=True)
    record: dict[str, Any] = {
        "created": created(),
        "machine": machine_info(),
        "model": args.model,
        "prompter": args.prompter,
        "tile_size": args.tile_size,
        "tta": args.tta,
        "precision": args.precision,
        "runs": [],
    }
    for size in args.sizes:
        print(f"slide {size}x{size}", flush=True)
        slide = make_slide(size, slides_dir)
        entry: dict[str, Any] = {"size": size, "file_mb": round(slide.stat().st_size / 2**20, 1)}
        read_px = args.tile_size or 256
        bare_decode(slide, read_px)  # warm the file cache, so neither loop pays for the disk
        entry["bare_decode"] = max((bare_decode(slide, read_px) for _ in range(2)), key=lambda r: r["tiles_per_s"])
        entry["wsiseg_read"] = max((wsiseg_read(slide, read_px) for _ in range(2)), key=lambda r: r["tiles_per_s"])
        entry["read_vs_bare"] = round(entry["wsiseg_read"]["tiles_per_s"] / entry["bare_decode"]["tiles_per_s"], 3)
        for workers in ([0, args.workers] if args.workers else [0]):
            cmd = [sys.executable, __file__, "--model", args.model,
                   *(["--tile-size", str(args.tile_size)] if args.tile_size else []),
                   *(["--prompter", args.prompter] if args.prompter else []),
                   "--overlap", str(args.overlap), "--batch-tiles", str(args.batch_tiles), "--device", args.device,
                   *(["--tta"] if args.tta else []),
                   *(["--precision", args.precision] if args.precision else []),
                   "--child", str(slide), str(args.out / f"run-{size}-{workers}"), str(workers)]
            done = subprocess.run(cmd, check=True, capture_output=True, text=True)
            entry["synchronous" if workers == 0 else f"dask_{workers}_workers"] = json.loads(
                done.stdout.strip().splitlines()[-1]
            )
        record["runs"].append(entry)
        sync = entry["synchronous"]
        print(
            f"  bare decode {entry['bare_decode']['tiles_per_s']} tiles/s, wsiseg read {entry['wsiseg_read']['tiles_per_s']}"
            f" ({entry['read_vs_bare']:.0%})\n  synchronous: {sync['wall_s']} s, {sync['nuclei']} nuclei, "
            f"{sync['nuclei_per_s']} nuclei/s, model {sync['model_fraction_of_wall']:.0%} of wall, "
            f"stitch+write {sync['stitch_write_nuclei_per_s_per_core']} nuclei/s/core, peak RSS {sync['peak_rss_mb']} MB",
            flush=True,
        )
        for key, run in entry.items():
            if key.startswith("dask_"):
                print(f"  {key}: {run['wall_s']} s, {run['tiles_per_s']} tiles/s, {run['nuclei_per_s']} nuclei/s")
    print(f"wrote {write_record(record, args.out, 'bench')}")


if __name__ == "__main__":
    main()
