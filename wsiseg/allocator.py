"""glibc's allocator set to keep freed memory for reuse in a process that runs a network.

By default glibc serves each allocation above its mmap threshold (128 KiB, adapting up to
32 MiB) with a fresh `mmap` and returns it to the system when freed.  A model run allocates the
same large arrays tile after tile (a 1152² tile's activations are 42 MB each in wsiseg-tiny's
UNet), so every tile starts on fresh pages that the kernel must zero on first touch (minor
page faults).  Raising the mmap and trim thresholds (`mallopt(3)`: M_MMAP_THRESHOLD,
M_TRIM_THRESHOLD) keeps freed blocks in the heap for the next tile instead.

Measured on the 2-core build machine (wsiseg-tiny's network on one 1152² tile, fp32): 0.51-0.55 s
-> 0.37-0.39 s per tile, minor page faults 75-94 k -> 1-4 k, system time 0.24 s -> 0.01 s.  Peak RSS is higher by what is kept:
about 100 MB in that test, 1.09 -> 1.17-1.30 GB for wsiseg-tiny on the 4096² benchmark slide
(benchmarks/README.md).

Who calls it: the worker-side model loader when a run's models include a network (not for
`classical`, whose NumPy arrays gained nothing: its 32768² benchmark slide peaked at 748 MB with
the setting against 569 MB without), and `wsiseg train`.  Results are bit-identical: only where memory comes from changes.

Dask's nanny starts its workers with MALLOC_TRIM_THRESHOLD_=65536 (its setting
`distributed.nanny.pre-spawn-environ`), to hand freed memory back; a worker that loads a network
overrides it for itself, so its memory beyond what Dask manages stays at the few hundred MB kept.
Other C libraries (macOS, musl) are left as they are.  WSISEG_KEEP_FREED_MEMORY=0 in the
environment turns it off (e.g. to give memory back between tiles on a crowded node).
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys

log = logging.getLogger(__name__)

#: mallopt(3) parameter numbers, from glibc's <malloc.h>
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
#: allocations up to this size come from the heap and are reused after free; the heap's free
#: top is trimmed beyond twice it.  A 1152² tile's largest activation in wsiseg-tiny is 42 MB,
#: a batch of 8 tiles' maps 127 MB, a training step's on 8 crops of 512 px 67 MB: the 4096²
#: benchmark slide took 45-47 s with 256 MiB against 49-52 s with 64 MiB, and a training step
#: 2.89 s against 3.72 s (4.38 s as glibc has it).
MMAP_THRESHOLD_BYTES = 256 << 20
ENV_SWITCH = "WSISEG_KEEP_FREED_MEMORY"

_done: list[bool] = []


def keep_freed_memory() -> bool:
    """Set glibc's mmap threshold to `MMAP_THRESHOLD_BYTES` and its trim threshold to twice that,
    for this process (once: the first call decides, later calls do nothing).

    Returns True when the settings are in force.  Off on other platforms or C libraries, and
    when the environment variable WSISEG_KEEP_FREED_MEMORY is "0".  Never raises.
    """
    if _done:
        return _done[0]
    _done.append(_set_thresholds())
    return _done[0]


def _set_thresholds() -> bool:
    if os.environ.get(ENV_SWITCH, "1").strip() == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
        gnu_get_libc_version = libc.gnu_get_libc_version  # glibc only (musl's mallopt does nothing)
    except (OSError, AttributeError):
        return False
    gnu_get_libc_version.restype = ctypes.c_char_p
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(mallopt(M_TRIM_THRESHOLD, 2 * MMAP_THRESHOLD_BYTES))
    log.debug("glibc %s: keep freed memory for reuse: %s", gnu_get_libc_version().decode(), ok)
    return ok
