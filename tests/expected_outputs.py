"""The stored expected outputs of a small synthetic slide (classical model): produce and compare.

`tests/test_expected_outputs.py` runs the slide and compares the outputs with the files in
`tests/expected/`, byte for byte; a change to stitching, polygon tracing, measurements or the
writers that moves one coordinate fails it.  When an output change is intended, write the
files again and commit them with the change that explains it:

    python tests/expected_outputs.py

The slide is run in a child process whose NumPy and OpenCV use only their baseline CPU
instructions (`baseline_cpu_env`): their float32 kernels for log, exp and sums differ in the
last bit between machines with and without AVX2 or AVX-512, and the stored bytes must not
depend on the machine that runs the tests.

What is compared: the GeoJSON's features (each feature's random UUID replaced by a fixed
text, since ids are drawn afresh every run) and every column of the Zarr nucleus table plus
its level-0 label raster (stored as one compressed .npz).
"""

from __future__ import annotations

import gzip
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent / "expected"
NAME = "classical-small"
FEATURES_FILE = HERE / f"{NAME}.features.txt.gz"
ZARR_FILE = HERE / f"{NAME}.zarr.npz"
_ID = re.compile(r'"id":"[0-9a-f-]{36}"')


def expected_slide(folder: Path) -> Path:
    """The small slide (700 x 600 px at 0.5 µm/px, losslessly compressed so every decoder gives
    the same pixels), written into folder."""
    from wsiseg.synthetic import SyntheticSpec, write_svs_like

    spec = SyntheticSpec(width=700, height=600, mpp=0.5, seed=11, tissue_fraction=0.8, touching_fraction=0.15)
    path = folder / "expected-small.svs"
    write_svs_like(path, spec, compression="deflate")
    return path


def run_outputs(folder: Path) -> tuple[bytes, dict[str, np.ndarray]]:
    """Run the classical model on the slide in-process (tile 256 px, so it has seams) and return
    (features text, Zarr arrays by name)."""
    from wsiseg.pipeline import RunConfig, run_slide
    from wsiseg.scheduling import SchedulerConfig

    slide = expected_slide(folder)
    config = RunConfig(model="classical", tile_size_px=256, scheduler=SchedulerConfig(scheduler="synchronous"))
    result = run_slide(slide, folder / "out", config)
    return features_text(result.geojson), zarr_arrays(result.zarr)


def features_text(geojson: Path) -> bytes:
    """The GeoJSON's feature lines, ids replaced (the header names the source path and version)."""
    text = gzip.decompress(geojson.read_bytes()).decode()
    start = text.index('"features":[')
    return _ID.sub('"id":"-"', text[start:]).encode()


def zarr_arrays(zarr_path: Path) -> dict[str, np.ndarray]:
    """Every column of the nucleus table and the level-0 label raster."""
    from wsiseg.writers.zarr_store import open_nuclei

    store = open_nuclei(zarr_path)
    table = store.table()
    arrays: dict[str, Any] = {
        "coords": table.coords, "ring_offsets": table.ring_offsets, "geom_offsets": table.geom_offsets,
        "centroid_l0": table.centroid_l0, "bbox_l0": table.bbox_l0, "class_id": table.class_id,
        "area_px": table.area_px, "touches_edge": table.touches_edge,
        **{f"measurement_{k}": v for k, v in table.measurements.items()},
        "labels_l0": np.asarray(store.labels(0)[...]),
    }
    return {k: np.asarray(v) for k, v in arrays.items()}


def baseline_cpu_env() -> dict[str, str]:
    """os.environ plus the settings that turn off every optional CPU feature NumPy and OpenCV
    were built to dispatch to (NPY_DISABLE_CPU_FEATURES, OPENCV_CPU_DISABLE), whether or not
    this machine has it (OpenCV notes the ones it lacks on stderr)."""
    import cv2
    from numpy._core._multiarray_umath import __cpu_dispatch__

    numpy_extra = list(__cpu_dispatch__)
    # OpenCV's line: baseline features plain, dispatched ones starred (unavailable ones end in "?")
    opencv_extra = [f[1:].rstrip("?") for f in cv2.getCPUFeaturesLine().split() if f.startswith("*")]
    return {**os.environ, "NPY_DISABLE_CPU_FEATURES": " ".join(numpy_extra),
            "OPENCV_CPU_DISABLE": ",".join(opencv_extra)}


def write_outputs(folder: Path, run_folder: Path) -> tuple[Path, Path]:
    """Run the slide in a child process with baseline CPU features; write the features text
    (gzip) and the Zarr arrays (npz) into folder; returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    run_folder.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, __file__, "--child", str(folder), str(run_folder)],
                   env=baseline_cpu_env(), check=True)
    return folder / FEATURES_FILE.name, folder / ZARR_FILE.name


def _child(folder: Path, run_folder: Path) -> None:
    features, arrays = run_outputs(run_folder)
    (folder / FEATURES_FILE.name).write_bytes(gzip.compress(features, mtime=0))
    np.savez_compressed(folder / ZARR_FILE.name, **arrays)


def main() -> None:
    import tempfile

    if sys.argv[1:2] == ["--child"]:
        _child(Path(sys.argv[2]), Path(sys.argv[3]))
        return
    with tempfile.TemporaryDirectory() as tmp:
        features, arrays = write_outputs(HERE, Path(tmp))
    with np.load(arrays) as stored:
        print(f"wrote {features} and {arrays}: {len(stored['area_px'])} nuclei", file=sys.stderr)


if __name__ == "__main__":
    main()
