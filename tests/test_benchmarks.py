"""The benchmark scripts run end to end on the CPU and write the figures they promise.

Timing is never asserted (a busy machine makes any speed relation flaky); these tests check
that every code path runs and that the JSON records hold positive numbers where they must.
The GPU benchmark's CUDA-only steps (bf16, torch.compile, GPU pipelines) run only on a GPU.
"""

from __future__ import annotations

import importlib
import json
import sys
import time
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import numpy as np
import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture
def bench(monkeypatch: pytest.MonkeyPatch) -> Any:
    """import_module for the scripts in benchmarks/ (which import each other as top-level modules)."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))

    def load(name: str) -> ModuleType:
        return importlib.import_module(name)

    return load


@pytest.fixture
def no_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def _record(folder: Path, prefix: str) -> dict[str, Any]:
    found = sorted(folder.glob(f"{prefix}-*.json"))
    assert len(found) == 1, f"expected one {prefix} record in {folder}, found {found}"
    return json.loads(found[0].read_text())


def test_gpu_benchmark_without_cuda_prints_no_cuda_device_and_exits_zero(
    bench: Any, no_cuda: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    gpu = bench("gpu")
    assert gpu.main(["--out", str(tmp_path)]) == 0
    assert "no CUDA device" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []  # nothing generated, nothing measured


def test_gpu_benchmark_on_cpu_runs_each_step_and_records_positive_figures(
    bench: Any, no_cuda: None, tmp_path: Path
) -> None:
    gpu = bench("gpu")
    assert gpu.main(["--allow-cpu", "--tiny", "--budget-s", "3600", "--out", str(tmp_path)]) == 0  # every step
    record = _record(tmp_path, "gpu")
    steps = {s["id"]: s for s in record["steps"]}
    done = {i for i, s in steps.items() if s["status"] == "done"}
    assert done == {"model:wsiseg-tiny:fp32", "model:sam-vit_test:fp32",
                    "pipeline:wsiseg-tiny:gpus=0", "pipeline:sam-vit_test:gpus=0"}, steps
    for i in done:
        s = steps[i]
        for key in ("tiles_per_s", "gpu_busy_fraction", "peak_memory_mb", "projected_slide_s", "wall_s"):
            assert s[key] > 0, (i, key, s[key])
        assert s["gpu_busy_fraction"] <= 1.0
        assert s["nuclei_per_s"] >= 0
    assert steps["model:wsiseg-tiny:fp32"]["nuclei_per_s"] > 0  # the learned model finds the synthetic nuclei
    assert steps["pipeline:wsiseg-tiny:gpus=0"]["nuclei"] > 0
    # what cannot run on a CPU is listed with its reason, not dropped
    for mode in ("bf16", "compile"):
        assert "CUDA only" in steps[f"model:wsiseg-tiny:{mode}"]["reason"]
    assert "2 GPUs" in steps["pipeline:sam-vit_test:gpus=2"]["reason"]
    assert record["projection"]["slide_px"] == [100_000, 80_000]
    assert not (tmp_path / "gpu-work").exists()  # pipeline outputs and the SAM bundle are removed


def test_gpu_benchmark_skips_steps_the_time_budget_cannot_hold(bench: Any, no_cuda: None, tmp_path: Path) -> None:
    gpu = bench("gpu")
    assert gpu.main(["--allow-cpu", "--tiny", "--budget-s", "0.01", "--out", str(tmp_path)]) == 0
    steps = _record(tmp_path, "gpu")["steps"]
    assert len(steps) == 10
    assert all(s["status"] == "skipped" for s in steps)
    assert any("time budget" in s["reason"] for s in steps)


@pytest.mark.parametrize("n_gpus", [1, 2])
def test_gpu_plan_runs_compile_on_cuda_and_two_gpu_pipelines_only_with_two_gpus(bench: Any, n_gpus: int) -> None:
    gpu = bench("gpu")
    steps = {s["id"]: s for s in gpu.plan_steps("cuda", n_gpus, gpu.Settings())}
    assert "status" not in steps["model:sam-vit_b:compile"] and "status" not in steps["model:sam-vit_b:bf16"]
    assert "status" not in steps["pipeline:sam-vit_b:gpus=1"]
    assert ("status" in steps["pipeline:sam-vit_b:gpus=2"]) == (n_gpus < 2)
    order = list(steps)
    assert order.index("pipeline:sam-vit_b:gpus=1") < order.index("model:sam-vit_b:compile")  # headline first


def test_benchmark_prompts_take_the_nearest_other_points_as_negatives(bench: Any) -> None:
    steps = bench("gpu_steps")
    xy = np.array([[10.0, 10.0], [12.0, 10.0], [40.0, 40.0]])
    batch = steps.prompt_batch(xy, 1, reach_px=8.0)
    assert batch.labels.tolist() == [[1, 0], [1, 0], [1, -1]]  # the far point has no neighbour in reach
    assert batch.points[0, 1].tolist() == [12.0, 10.0] and batch.points[1, 1].tolist() == [10.0, 10.0]


def test_cohort_benchmark_records_startup_overhead_per_slide_for_both_ways(bench: Any, tmp_path: Path) -> None:
    cohort = bench("cohort")
    # no Dask cluster here (each of the four processes would spend seconds starting one): the
    # scheduler is the CLI's option, passed through; the benchmark's default is a LocalCluster
    args = ["--slides", "2", "--size", "256", "--model", "classical", "--scheduler", "synchronous", "--device", "cpu"]
    assert cohort.main([*args, "--out", str(tmp_path)]) == 0
    record = _record(tmp_path, "cohort")
    for way in ("separate", "cohort"):
        r = record[way]
        assert len(r["slides_s"]) == 2
        for key in ("wall_s", "slide_s", "per_slide_wall_s", "per_slide_overhead_s"):
            assert r[key] > 0, (way, key, r[key])
    assert len(record["separate"]["runs"]) == 2
    parts = record["startup_components_s"]
    for key in ("python_start_s", "model_load_s", "total_s"):
        assert parts[key] > 0, (key, parts[key])
    assert parts["dask_cluster_start_s"] >= 0 and parts["dask_cluster_stop_s"] >= 0
    assert parts["torch_import_s"] == 0.0  # the classical model runs without torch
    # each figure is rounded to the millisecond on its own, so the two may differ by one unit of rounding
    assert record["startup_paid_s"]["separate"] == pytest.approx(2 * record["startup_paid_s"]["cohort"], abs=2e-3)
    assert not (tmp_path / "cohort-work").exists()


def test_nvml_sampler_reports_mean_utilisation_and_memory_rise(bench: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    steps = bench("gpu_steps")
    readings = iter([30, 50, 70] + [70] * 1000)
    used = iter([2**30] + [3 * 2**30] * 1000)  # 1 GiB before the block, 3 GiB during it
    fake = SimpleNamespace(
        nvmlInit=lambda: None,
        nvmlShutdown=lambda: None,
        nvmlDeviceGetHandleByIndex=lambda i: i,
        nvmlDeviceGetUtilizationRates=lambda h: SimpleNamespace(gpu=next(readings)),
        nvmlDeviceGetMemoryInfo=lambda h: SimpleNamespace(used=next(used)),
    )
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    with steps.NvmlSampler(1, period_s=0.001) as sampler:
        time.sleep(0.05)
    assert 0.3 <= sampler.busy_fraction() <= 0.7
    assert sampler.peak_memory_mb() == 2048.0
    with steps.NvmlSampler(0) as nothing:  # no GPU asked for: no figures
        pass
    assert nothing.busy_fraction() is None and nothing.peak_memory_mb() is None
