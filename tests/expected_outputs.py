"""The stored expected outputs of a small synthetic slide (classical model): produce and compare.

`tests/test_expected_outputs.py` runs the slide and compares the outputs with the files in
`tests/expected/`, byte for byte; a change to stitching, polygon tracing, measurements or the
writers that moves one coordinate fails it.  When an output change is intended, write the
files again and commit them with the change that explains it:

    python tests/expected_outputs.py

What is compared: the GeoJSON's features (each feature's random UUID replaced by a fixed
text, since ids are drawn afresh every run) and every column of the Zarr nucleus table plus
its level-0 label raster (stored as one compressed .npz).
"""

from __future__ import annotations

import gzip
import re
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


def main() -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        features, arrays = run_outputs(Path(tmp))
    HERE.mkdir(exist_ok=True)
    FEATURES_FILE.write_bytes(gzip.compress(features, mtime=0))
    np.savez_compressed(ZARR_FILE, **arrays)
    print(f"wrote {FEATURES_FILE} and {ZARR_FILE}: {len(arrays['area_px'])} nuclei", file=sys.stderr)


if __name__ == "__main__":
    main()
