"""wsiseg.allocator: freed large blocks are reused (no fresh zero-filled pages), in a fresh process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

# allocates and frees a 32 MiB block five times; counts the minor page faults of the last four
_PROBE = """
import ctypes, json, resource
from wsiseg.allocator import keep_freed_memory
kept = keep_freed_memory()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
def touch():  # as a tensor library does: malloc, write every page, free (numpy would ask for huge pages)
    block = libc.malloc(32 << 20)
    ctypes.memset(block, 1, 32 << 20)
    libc.free(block)
touch()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    touch()
print(json.dumps({"kept": kept, "again": keep_freed_memory(), "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""


def _probe(switch: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "WSISEG_KEEP_FREED_MEMORY"}
    if switch is not None:
        env["WSISEG_KEEP_FREED_MEMORY"] = switch
    done = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_freed_large_arrays_are_reused_instead_of_mapped_afresh() -> None:
    kept = _probe(None)
    plain = _probe("0")
    assert kept["kept"] is True and kept["again"] is True
    assert plain["kept"] is False and plain["again"] is False
    pages = 4 * (32 << 20) // 4096  # what four fresh 32 MiB blocks fault in with 4 KiB pages
    assert plain["faults"] > pages // 2
    assert kept["faults"] < pages // 20


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_runs_of_a_network_keep_freed_memory_and_runs_of_classical_leave_the_allocator_alone() -> None:
    code = (
        "import json, sys; from wsiseg import allocator; from wsiseg.pipeline import RunConfig, load_run_models; "
        "load_run_models(RunConfig(model=sys.argv[1])); print(json.dumps(allocator._done))"
    )
    env = {k: v for k, v in os.environ.items() if k != "WSISEG_KEEP_FREED_MEMORY"}
    for model, expected in (("classical", []), ("wsiseg-tiny", [True])):
        done = subprocess.run([sys.executable, "-c", code, model], env=env, capture_output=True, text=True, check=True)
        assert json.loads(done.stdout.strip().splitlines()[-1]) == expected, model
