"""One-shot GPU benchmark: the learned default (wsiseg-tiny) and SAM ViT-B on a tissue-dense
40x region, network by network and end to end.

    python benchmarks/gpu.py                       # on a CUDA machine: at most 8 minutes
    python benchmarks/gpu.py --budget-s 240        # less time: steps that do not fit are skipped, and said so
    python benchmarks/gpu.py --allow-cpu --tiny    # every code path but CUDA itself, on the CPU, in seconds

Safe as the first command on a fresh GPU machine: nothing is downloaded (wsiseg-tiny ships with
wsiseg, SAM gets random weights, which is all a speed measurement needs), and without a CUDA
device it prints "no CUDA device" and exits 0.

A synthetic slide region (default 8192 x 8192 px at 0.25 µm/px, tissue everywhere) is written
once, then one child process runs the steps in order, each capped to a fixed amount of work:

- model steps: each network alone on a fixed number of tiles read from the region, in fp32,
  bf16 autocast, and bf16 + torch.compile.  wsiseg-tiny: its prompter's network on 512 px
  tiles at 0.5 µm/px, the points it finds, and the segmentor's watershed on the same maps (as
  the pipeline runs it).  SAM: the segmentor (encoder once per 256 px tile at 0.25 µm/px, mask
  decoder per prompt; the region's known nucleus centres as prompts, 1 negative each, decoded
  with and without it as PromptNucSeg does at 40x).
- pipeline steps: `run_slide` on a square of the region with `SchedulerConfig(gpus=1)` (and 2
  when two GPUs are visible), after a small warm-up run on the same Dask cluster.  SAM runs
  from a bundle written on the fly (untrained ViT-B segmentor, wsiseg-tiny's prompter network,
  0.25 µm/px).  Precision is each model's default (wsiseg-tiny "auto": bf16 on a GPU of
  compute capability 8.0 or later; SAM bf16 on CUDA).

Per step: tiles/s, nuclei/s, GPU busy fraction (CUDA events around the model calls for model
steps, NVML utilisation for pipeline steps), peak GPU memory, and the time projected for a
100,000 x 80,000 px slide with 40 % tissue.  The child is stopped when the time budget is
spent; steps it did not reach are listed as skipped.  Figures are printed and written as JSON
to benchmarks/results/gpu-<time>.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from common import RESULTS, created, machine_info, make_slide, write_record
from gpu_steps import SLIDE_PX, SLIDE_TISSUE_FRACTION, TINY, Settings

REPO = Path(__file__).resolve().parent.parent
#: seconds a step is expected to take on one H200, by (step, model family): a step is skipped
#: when less time is left (wall times of fp32/bf16 steps, compiling, and a pipeline run with its
#: cluster start and warm-up)
ESTIMATE_S = {("model", "tiny"): 15.0, ("model", "sam"): 20.0, ("compile", "tiny"): 45.0, ("compile", "sam"): 90.0,
              ("pipeline", "tiny"): 45.0, ("pipeline", "sam"): 90.0}
#: seconds the child may run past the budget before it is stopped, and left for the summary
GRACE_S = 20.0
RESULT_TAG = "@gpu-benchmark "
REQUIRED = ("torch", "safetensors", "segment_anything", "dask", "distributed", "zarr", "skimage", "scipy", "tifffile")


# --------------------------------------------------------------------------- parent


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--allow-cpu", action="store_true", help="without CUDA, run on the CPU (for testing)")
    p.add_argument("--tiny", action="store_true", help="a toy version of every step (seconds, for testing)")
    p.add_argument("--size", type=int, default=None, help="region side in px (default 8192; --tiny 512)")
    p.add_argument("--budget-s", type=float, default=None, help="time for the whole run (default 420 s)")
    p.add_argument("--batch-tiles", type=int, default=None, help="pipeline tiles per task (default 8, as the CLI)")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--keep", action="store_true", help="keep the pipeline outputs and the SAM bundle")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    _make_wsiseg_importable()
    if args.child:
        return _child(json.loads(Path(args.child).read_text()))

    t_start = time.time()
    try:
        import torch
    except ImportError:
        print("no CUDA device: torch is not installed; nothing measured")
        return 0
    cuda = torch.cuda.is_available()
    if not cuda and not args.allow_cpu:
        print("no CUDA device: nothing measured (torch sees no GPU; --allow-cpu runs a tiny CPU version for testing)")
        return 0
    missing = [m for m in REQUIRED if importlib.util.find_spec(m) is None]
    if missing:
        print(f"cannot run: missing Python packages {', '.join(missing)}; install wsiseg with its dependencies "
              "(`pip install -e .` in the repository; without network, bring them as wheels)", file=sys.stderr)
        return 1
    base = TINY if args.tiny else Settings()
    settings = replace(
        base,
        **{k: v for k, v in (("size_px", args.size), ("budget_s", args.budget_s), ("batch_tiles", args.batch_tiles))
           if v is not None},
    )
    device = "cuda" if cuda else "cpu"
    n_gpus = torch.cuda.device_count() if cuda else 0
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.out / "gpu-work"
    print(f"GPU benchmark on {device} ({n_gpus} GPUs), budget {settings.budget_s:.0f} s", flush=True)
    t = time.perf_counter()
    slide = make_slide(settings.size_px, args.out / "slides", mpp=settings.mpp, tissue_fraction=1.0, tissue_pieces=1)
    slide_s = time.perf_counter() - t

    steps = plan_steps(device, n_gpus, settings)
    runnable = [step for step in steps if "status" not in step]
    plan = {"steps": runnable, "settings": asdict(settings), "device": device, "slide": str(slide),
            "work": str(work), "deadline": t_start + settings.budget_s}
    work.mkdir(parents=True, exist_ok=True)
    plan_path = work / "plan.json"
    plan_path.write_text(json.dumps(plan))
    results, stop_reason = _run_child(plan_path, t_start + settings.budget_s + GRACE_S)
    for step in runnable:
        if step["id"] not in results:
            results[step["id"]] = {**step, "status": "skipped", "reason": f"not reached: {stop_reason}"}
            _print_step(results[step["id"]])
    for step in steps:
        if step.get("status") == "skipped":
            _print_step(step)
    ordered = [results.get(step["id"], step) for step in steps]
    record = {
        "created": created(),
        "machine": {**machine_info(), **_gpu_info(torch, n_gpus)},
        "device": device,
        "settings": asdict(settings),
        "slide": {"path": str(slide), "size_px": settings.size_px, "mpp": settings.mpp, "tissue_fraction": 1.0,
                  "write_s": round(slide_s, 2)},
        "projection": {"slide_px": list(SLIDE_PX), "tissue_fraction": SLIDE_TISSUE_FRACTION, "mpp": settings.mpp,
                       "model_steps": "the model's tiles on such a slide / measured tiles per s (the model alone)",
                       "pipeline_steps": "start-up (cluster + warm-up run) + measured wall x tissue area ratio"},
        "steps": ordered,
        "elapsed_s": round(time.time() - t_start, 1),
    }
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    print(f"done in {record['elapsed_s']} s; wrote {write_record(record, args.out, 'gpu')}")
    return 0


def plan_steps(device: str, n_gpus: int, s: Settings) -> list[dict[str, Any]]:
    """The steps, in the order they run; one that cannot run here carries status "skipped" and its reason.

    Order: the networks in fp32 and bf16, the pipeline on one GPU (the headline figures),
    then torch.compile, then two GPUs.  The steps' work is capped by `s`.
    """
    models = ("wsiseg-tiny", f"sam-{s.sam_variant}")
    steps: list[dict[str, Any]] = []

    def add(kind: str, model: str, *, mode: str = "", gpus: int = 0, reason: str | None = None) -> None:
        label = mode if kind == "model" else f"gpus={gpus}"
        step = {"id": f"{kind}:{model}:{label}", "kind": kind, "model": model, "mode": mode, "gpus": gpus}
        if reason:
            steps.append({**step, "status": "skipped", "reason": reason})
        else:
            family = "tiny" if model == "wsiseg-tiny" else "sam"
            steps.append({**step, "estimate_s": ESTIMATE_S["compile" if mode == "compile" else kind, family]})

    first_gpus = 1 if device == "cuda" else 0  # 0: the synchronous scheduler, in-process
    no_bf16 = None if device == "cuda" else (
        "bf16 autocast is measured on CUDA only (CPUs without AVX512-BF16 or AMX emulate it, slowly)"
    )
    for model in models:
        add("model", model, mode="fp32")
        add("model", model, mode="bf16", reason=no_bf16)
    for model in models:
        add("pipeline", model, gpus=first_gpus)
    no_compile = None if device == "cuda" else "torch.compile is measured on CUDA only (compiling on a CPU is too slow)"
    for model in models:
        add("model", model, mode="compile", reason=no_compile)
    for model in models:
        add("pipeline", model, gpus=2, reason=None if n_gpus >= 2 else f"needs 2 GPUs, {n_gpus} visible")
    return steps


def _run_child(plan_path: Path, kill_at: float) -> tuple[dict[str, dict[str, Any]], str]:
    """Run the steps in a child process (its own process group, stopped at `kill_at`), printing
    each result as it comes.  Returns the results by step id, and why any step was not reached."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(plan_path)]
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, start_new_session=True)
    stopped = threading.Event()

    def stop() -> None:
        stopped.set()
        try:
            os.killpg(child.pid, signal.SIGKILL)  # the child and its Dask workers
        except ProcessLookupError:
            pass

    watchdog = threading.Timer(max(1.0, kill_at - time.time()), stop)
    watchdog.start()
    results: dict[str, dict[str, Any]] = {}
    try:
        assert child.stdout is not None
        for line in child.stdout:
            if line.startswith(RESULT_TAG):
                result = json.loads(line[len(RESULT_TAG):])
                results[result["id"]] = result
                _print_step(result)
            else:
                print(line, end="", flush=True)
        child.wait()
    finally:
        watchdog.cancel()
        if child.poll() is None:  # interrupted: never leave the child and its workers running
            stop()
            child.wait()
    if stopped.is_set():
        return results, "the time budget ran out (the step in progress was stopped)"
    return results, f"the benchmark process ended with status {child.returncode} (its error is above)"


def _print_step(r: dict[str, Any]) -> None:
    head = f"  {r['kind']:<8} {r['model']:<12} {r['mode'] or 'gpus=' + str(r['gpus']):<8}"
    if r["status"] != "done":
        print(f"{head} {r['status']}: {r['reason']}", flush=True)
        return
    busy = r["gpu_busy_fraction"]
    mem = r["peak_memory_mb"]
    print(
        f"{head} {r['tiles_per_s']:>8.1f} tiles/s {r['nuclei_per_s']:>9.1f} nuclei/s  busy "
        f"{'?' if busy is None else f'{busy:.0%}'} ({r['busy_source']})  peak "
        f"{'?' if mem is None else f'{mem:.0f}'} MB ({r['memory_source']})  100k x 80k slide: "
        f"{r['projected_slide_s']:.0f} s",
        flush=True,
    )


def _gpu_info(torch: Any, n_gpus: int) -> dict[str, Any]:
    return {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gpus": [torch.cuda.get_device_name(i) for i in range(n_gpus)],
    }


def _make_wsiseg_importable() -> None:
    """Run from a checkout where wsiseg is not installed: put the repository on the path, for
    this process and (through PYTHONPATH) its children and their Dask workers."""
    if importlib.util.find_spec("wsiseg") is None:
        sys.path.insert(0, str(REPO))
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))


def _child(plan: dict[str, Any]) -> int:
    """The child process: run the planned steps in order, one result line each."""
    from gpu_steps import run_steps

    return run_steps(plan, RESULT_TAG)


if __name__ == "__main__":
    sys.exit(main())
