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
