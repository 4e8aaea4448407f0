"""numba compilation as wsiseg uses it: nopython, without the GIL, cached on disk where it can be.

numba caches compiled code next to the module, else in the user's cache folder; where neither
is writable it refuses `cache=True` at import, so such functions compile once per process.
"""

from __future__ import annotations

from typing import Any, Callable

import numba as nb


def compiled(fn: Callable[..., Any]) -> Any:
    """`numba.njit(cache=True, nogil=True)`, or without the cache where no folder allows one."""
    try:
        return nb.njit(cache=True, nogil=True)(fn)
    except RuntimeError:  # numba: "cannot cache function ...: no locator available"
        return nb.njit(nogil=True)(fn)


def warm_up() -> None:
    """Load every compiled kernel of a run now (from numba's disk cache; compiled on a fresh
    install), on inputs of the types a run gives them, so the first tile and the first write
    do not wait for them.  wsiseg calls it in a background thread when a process loads its
    models."""
    import numpy as np

    from wsiseg.readers.scaled import resample_integer
    from wsiseg.stitching import warm_up as warm_stitching
    from wsiseg.writers.geojson_text import feature_texts, pieces
    from wsiseg.writers.simple_rings import certainly_valid

    warm_stitching()
    taps = np.zeros((1, 2), np.int64)
    resample_integer(np.zeros((1, 1, 3), np.uint8), taps, np.array([[3, 1]]), taps, np.array([[3, 1]]), 16)
    text, offsets = pieces(["{", "[", "]", "[", "(", "{", "}", ",", '"a":', ""])
    square = np.array([[0, 0], [0, 1], [1, 1], [1, 0], [0, 0]], np.float64)
    feature_texts(
        np.zeros((1, 16), np.uint8), square, np.array([0, 5], np.int64), np.array([0, 1], np.int64),
        np.zeros(1, np.int64), np.ones((1, 1), np.float64), np.zeros(1, np.int64), text, offsets, False,
    )
    certainly_valid(square, np.array([0, 5], np.int64), np.array([0, 1], np.int64))
