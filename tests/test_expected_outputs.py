"""Outputs byte-identical to the stored expected ones (see tests/expected_outputs.py)."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from expected_outputs import FEATURES_FILE, ZARR_FILE, write_outputs

REGENERATE = "if the change is intended, run `python tests/expected_outputs.py` and commit tests/expected/"


def test_outputs_equal_the_stored_expected_outputs_byte_for_byte(tmp_path: Path) -> None:
    features_file, arrays_file = write_outputs(tmp_path / "got", tmp_path / "run")
    features = gzip.decompress(features_file.read_bytes())
    with np.load(arrays_file) as got_arrays:
        arrays = {name: got_arrays[name] for name in got_arrays.files}
    expected_features = gzip.decompress(FEATURES_FILE.read_bytes())
    assert len(arrays["area_px"]) > 50  # a slide with seams and enough nuclei to matter
    if features != expected_features:
        got, want = features.decode().splitlines(), expected_features.decode().splitlines()
        first = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
        raise AssertionError(
            f"GeoJSON features differ from {FEATURES_FILE.name} ({len(got)} lines vs {len(want)}); first at line "
            f"{first}:\n  got  {got[first][:200] if first < len(got) else '<end>'}\n"
            f"  want {want[first][:200] if first < len(want) else '<end>'}\n{REGENERATE}"
        )
    with np.load(ZARR_FILE) as stored:
        assert sorted(stored.files) == sorted(arrays), REGENERATE
        for name in stored.files:
            got, want = arrays[name], stored[name]
            assert got.dtype == want.dtype and got.shape == want.shape, f"Zarr {name}: {got.dtype}{got.shape} " \
                f"vs stored {want.dtype}{want.shape}; {REGENERATE}"
            assert got.tobytes() == want.tobytes(), f"Zarr {name} differs from {ZARR_FILE.name}; {REGENERATE}"
