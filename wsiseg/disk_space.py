"""A full disk in one line: which disk, how much is free, what to do.

A write that fails with ENOSPC (no space left on the device) or EDQUOT (disk quota exceeded)
is re-raised as `DiskFullError`, an OSError whose message names the file being written, the
filesystem (device and mount point) and its free and total space, e.g.

    no space left on /dev/sdb1 (mounted at /data): 12.0 KiB free of 2.0 GiB, writing
    /data/results/slide.zarr; free some space there (or use another -o folder) and rerun the
    same command: finished slides are kept

The writers (`wsiseg.writers`) decorate their writing methods with `names_full_disk`; the
cohort ledger keeps its previous file when a save finds the disk full; `wsiseg run` turns a
full disk met anywhere else in a slide (checkpoints, reports) into the same line, naming -o.
"""

from __future__ import annotations

import errno
import functools
import os
import shutil
from pathlib import Path
from typing import Any, Callable, TypeGuard, TypeVar

F = TypeVar("F", bound=Callable[..., Any])

#: errno values that mean "the disk (or the user's share of it) is full"
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


class DiskFullError(OSError):
    """A write found its disk full; the one-line message names the disk and its free space.
    `errno` is the original ENOSPC or EDQUOT."""


def is_disk_full(exc: BaseException) -> TypeGuard[OSError]:
    """True for an OSError that says the disk or the quota is full (DiskFullError included)."""
    return isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS


def disk_full_error(exc: OSError, path: str | os.PathLike[str] | None = None) -> DiskFullError:
    """`exc` (ENOSPC or EDQUOT) as a DiskFullError naming `path` (default: exc.filename), its
    filesystem and the space left there.  A DiskFullError is returned unchanged."""
    if isinstance(exc, DiskFullError):
        return exc
    target = Path(path if path is not None else exc.filename or ".")
    device, mount = filesystem_of(target)
    where = f"{device} (mounted at {mount})" if device and device != mount else mount
    try:
        usage = shutil.disk_usage(mount)
        space = f"{format_bytes(usage.free)} free of {format_bytes(usage.total)}"
    except OSError:
        space = "free space unknown"
    what = "disk quota exceeded on" if exc.errno == errno.EDQUOT else "no space left on"
    err = DiskFullError(
        f"{what} {where}: {space}, writing {target}; free some space there (or use another -o folder) "
        "and rerun the same command: finished slides are kept"
    )
    err.errno = exc.errno  # filename stays unset: OSError would print "[Errno 28] ..." instead of the message
    return err


def names_full_disk(method: F) -> F:
    """Decorate a writer method: a disk-full OSError becomes a DiskFullError naming `self.path`."""

    @functools.wraps(method)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except OSError as exc:
            if not is_disk_full(exc):
                raise
            raise disk_full_error(exc, getattr(self, "path", None)) from exc  # set by then, even in __init__

    return wrapper  # type: ignore[return-value]


def filesystem_of(path: Path) -> tuple[str, str]:
    """(device, mount point) of the filesystem holding `path` (which need not exist yet: its
    nearest existing folder counts).  The device is "" where the platform does not say."""
    folder = path.absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    folder = folder.resolve()
    mount = folder
    while not os.path.ismount(mount) and mount != mount.parent:
        mount = mount.parent
    device = ""
    try:
        import psutil

        for part in psutil.disk_partitions(all=True):
            if Path(part.mountpoint) == mount:
                device = part.device  # the last entry wins: the mount on top
    except (ImportError, OSError):
        pass
    return device, str(mount)


def format_bytes(n: int) -> str:
    """1536 -> '1.5 KiB' (binary units, as `df -h` counts)."""
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    value, i = float(n), 0
    while value >= 1024 and i < len(units) - 1:
        value /= 1024
        i += 1
    return f"{int(value)} B" if i == 0 else f"{value:.1f} {units[i]}"
