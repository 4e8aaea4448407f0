"""Compiled (numba) kernel of `wsiseg.readers.scaled.resample_integer`, in a module of its own
so that opening a slide does not load numba; it loads with the first resampled read."""

from __future__ import annotations

import numpy as np

from wsiseg.compiled import compiled


@compiled
def dyadic_sums(
    patch: np.ndarray, ix: np.ndarray, mx: np.ndarray, iy: np.ndarray, my: np.ndarray, shift: int
) -> np.ndarray:  # pragma: no cover - compiled
    """(h, w, 3) uint8: sum over taps of mx * my * patch pixel, divided by 2**shift and rounded
    half to even; along x first, then y, in int64 (exact: every partial sum is an integer)."""
    rows = np.empty((patch.shape[0], ix.shape[0], 3), np.int64)
    for r in range(patch.shape[0]):
        for j in range(ix.shape[0]):
            for c in range(3):
                total = 0
                for t in range(ix.shape[1]):
                    total += mx[j, t] * patch[r, ix[j, t], c]
                rows[r, j, c] = total
    out = np.empty((iy.shape[0], ix.shape[0], 3), np.uint8)
    half = (1 << shift) >> 1
    for i in range(iy.shape[0]):
        for j in range(ix.shape[0]):
            for c in range(3):
                total = 0
                for t in range(iy.shape[1]):
                    total += my[i, t] * rows[iy[i, t], j, c]
                if shift > 0:
                    # round half to even: floor((total + k/2 - 1 + [floor(total / k) is odd]) / k)
                    total = (total + half - 1 + ((total >> shift) & 1)) >> shift
                out[i, j, c] = total
    return out
