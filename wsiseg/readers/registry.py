"""Reader backends: registration, discovery and `open_slide` with fallback.

A backend is a SlideReader class registered with `@register_backend(name, extensions,
priority, requires=..., claims=..., install=...)`.  `open_slide` picks the backends
registered for the file's extension, tries them from the highest priority down and returns
the first reader that opens the file; when none does, one UnsupportedSlideError names the
file and every backend tried with its reason.  A backend whose `claims(path)` is true for
a file (e.g. OME-TIFF, recognised by content) is the only one tried for it: a general TIFF
reader would silently read the wrong image of such a file.

Before any backend runs, a TIFF's first image must hold 8-bit grey or RGB(A) pixels
(`tiff_inspection.check_tiff_pixels`); a folder of DICOM files is one slide.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

import numpy as np

from wsiseg.readers.base import MPP_RANGE, NotBrightfieldError, SlideError, SlideReader, UnsupportedSlideError
from wsiseg.readers.tiff_inspection import check_tiff_pixels

logger = logging.getLogger(__name__)


class ReaderFactory(Protocol):
    """What a registered backend class is: called with the path and an optional mpp override."""

    def __call__(self, path: Path, *, mpp: float | None = None) -> SlideReader: ...


@dataclass(frozen=True)
class Backend:
    """A registered reader backend.

    extensions: lower-case suffixes with the dot (".svs").  priority: higher is tried first.
    requires: modules that must import for the backend to work (its library).
    claims: a content test; files it accepts are read by this backend only.
    install: what to `pip install` when the library is missing.
    """

    name: str
    extensions: tuple[str, ...]
    priority: int
    requires: tuple[str, ...]
    factory: ReaderFactory
    claims: Callable[[Path], bool] | None = None
    install: str = ""

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("a reader backend needs a name")
        bad = [e for e in self.extensions if not e.startswith(".") or e != e.lower()]
        if bad:
            raise ValueError(f"backend {self.name!r}: extensions must be lower-case with a dot, got {bad}")

    def unavailable_reason(self) -> str | None:
        """None when every required module imports, else why not (one line)."""
        for module in self.requires:
            reason = _import_error(module)
            if reason is not None:
                return f"cannot import {module} ({reason})"
        return None

    @property
    def available(self) -> bool:
        return self.unavailable_reason() is None


@dataclass(frozen=True)
class BackendStatus:
    """One line of `wsiseg info`: a backend, whether it works here, and its library version."""

    name: str
    extensions: tuple[str, ...]
    priority: int
    available: bool
    detail: str


#: Registered backends by name.
BACKENDS: dict[str, Backend] = {}

_T = TypeVar("_T")


def register_backend(
    name: str,
    extensions: tuple[str, ...],
    priority: int,
    *,
    requires: tuple[str, ...] = (),
    claims: Callable[[Path], bool] | None = None,
    install: str = "",
) -> Callable[[_T], _T]:
    """Class decorator: register a SlideReader class as backend `name`."""

    def decorate(cls: _T) -> _T:
        if name in BACKENDS:
            raise ValueError(f"reader backend {name!r} is already registered")
        BACKENDS[name] = Backend(
            name, tuple(extensions), int(priority), tuple(requires), cls, claims, install  # type: ignore[arg-type]
        )
        return cls

    return decorate


@functools.cache
def _import_error(module: str) -> str | None:
    try:
        importlib.import_module(module)
    except Exception as exc:  # a missing shared library raises OSError, not ImportError
        return _one_line(exc)
    return None


def list_backends() -> list[BackendStatus]:
    """Every registered backend, highest priority first, with availability and version."""
    rows = []
    for backend in sorted(BACKENDS.values(), key=lambda b: -b.priority):
        reason = backend.unavailable_reason()
        detail = reason or ", ".join(_module_version(m) for m in backend.requires)
        rows.append(BackendStatus(backend.name, backend.extensions, backend.priority, reason is None, detail))
    return rows


def _module_version(module: str) -> str:
    mod = importlib.import_module(module)
    version = vars(mod).get("__version__", "?")
    library = vars(mod).get("__library_version__")  # openslide's C library
    return f"{module} {version}" + (f" (library {library})" if library else "")


def supported_extensions() -> list[str]:
    """Every extension some registered backend claims, sorted."""
    return sorted({e for b in BACKENDS.values() for e in b.extensions})


def candidate_backends(path: Path, backend: str | None = None) -> list[Backend]:
    """Backends to try for `path`, in order: the named one, or those for its extension."""
    if backend is not None:
        if backend not in BACKENDS:
            raise ValueError(f"unknown reader backend {backend!r}; choose one of {sorted(BACKENDS)}")
        return [BACKENDS[backend]]
    suffix = path.suffix.lower()
    found = sorted((b for b in BACKENDS.values() if suffix in b.extensions), key=lambda b: -b.priority)
    claimed = [b for b in found if b.claims is not None and _claims(b, path)]
    if claimed:
        return claimed
    return [b for b in found if b.claims is None]  # stable: registration order breaks ties


def _claims(backend: Backend, path: Path) -> bool:
    try:
        return bool(backend.claims(path))  # type: ignore[misc]
    except Exception:
        logger.debug("%s: %s content test failed", path, backend.name, exc_info=True)
        return False


#: Extension of the files a DICOM whole-slide folder holds (one file per level or tile set).
DICOM_SUFFIX = ".dcm"


def dicom_folder_file(folder: Path) -> Path | None:
    """The file to open for a folder of DICOM instances (one series = one slide), or None.

    OpenSlide opens a DICOM whole-slide image from any one of its instances and finds the
    rest in the same folder.
    """
    try:
        files = sorted(q for q in folder.iterdir() if q.is_file() and q.suffix.lower() == DICOM_SUFFIX)
    except OSError:
        return None
    return files[0] if files else None


def open_slide(path: str | os.PathLike[str], *, mpp: float | None = None, backend: str | None = None) -> SlideReader:
    """Open a slide with the first backend that can read it.

    mpp: micrometres per level-0 pixel, overriding (or supplying) the file's value.
    backend: force one backend by name instead of choosing by extension.
    A slide without mpp opens fine (properties.mpp is None); stages that need it call
    `require_mpp`.  Raises SlideError (missing, directory, empty, truncated) or
    UnsupportedSlideError (no backend could open it), each one line naming the file.
    """
    path = Path(path)
    if mpp is not None:
        lo, hi = MPP_RANGE
        if not lo <= float(mpp) <= hi:
            raise ValueError(
                f"--mpp {mpp} is outside {lo}-{hi} micrometres per pixel; give the scan resolution, e.g. 0.25"
            )
        mpp = float(mpp)
    if not path.exists():
        raise SlideError(f"{path}: no such file; check the path")
    if path.is_dir():
        instance = dicom_folder_file(path)
        if instance is None:
            raise SlideError(
                f"{path}: is a directory without DICOM (.dcm) files, not a slide; pass one slide file "
                "(an MRXS slide is the .mrxs file beside its folder)"
            )
        return open_slide(instance, mpp=mpp, backend=backend)
    candidates = candidate_backends(path, backend)
    if not candidates:
        kind = path.suffix or "(no extension)"
        raise UnsupportedSlideError(
            f"{path}: unsupported file type {kind}; supported: {' '.join(supported_extensions())} "
            "(convert it to a pyramidal TIFF)"
        )
    size = path.stat().st_size
    if size == 0:
        raise SlideError(f"{path}: file is empty (0 bytes); copy it again")
    span = tiff_data_end(path)
    if span is not None and span > size:
        raise SlideError(
            f"{path}: file is truncated ({size} bytes, its TIFF structure needs at least {span}); copy it again"
        )
    check_tiff_pixels(path)
    if all(c.unavailable_reason() is not None for c in candidates):
        installs = sorted({c.install for c in candidates if c.install})
        reasons = "; ".join(f"{c.name}: {c.unavailable_reason()}" for c in candidates)
        hint = f"install {' or '.join(installs)}" if installs else "install a reader for it"
        kind = path.suffix or "these"
        raise UnsupportedSlideError(f"{path}: no installed reader opens {kind} files ({reasons}); {hint}")
    tried: list[str] = []
    for candidate in candidates:
        reason = candidate.unavailable_reason()
        if reason is not None:
            tried.append(f"{candidate.name}: {reason}")
            continue
        try:
            reader = candidate.factory(path, mpp=mpp)
        except (MemoryError, NotBrightfieldError):  # the file's pixels, not the backend, are the problem
            raise
        except Exception as exc:
            logger.debug("%s: backend %s failed", path, candidate.name, exc_info=True)
            tried.append(f"{candidate.name}: {_one_line(exc)}")
            continue
        if tried:
            logger.info("%s: opened with %s after %s", path, candidate.name, "; ".join(tried))
        return reader
    raise UnsupportedSlideError(
        f"{path}: no reader could open it ({'; '.join(tried)}); check that it is a complete slide in a supported format"
    )


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 160 else text[:157] + "..."


# TIFF field types whose values can hold strip/tile offsets and byte counts.
_TIFF_INTS = {3: "H", 4: "I", 13: "I", 16: "Q", 18: "Q"}
_OFFSET_TAGS, _COUNT_TAGS, _SUBIFD_TAG = (273, 324), (279, 325), 330


def tiff_data_end(path: Path) -> int | None:
    """The byte position a TIFF file must reach to hold every IFD and image block.

    Follows the IFD chain (and SubIFDs) reading only tags.  Returns None when the file is
    not a TIFF or its structure is too odd to judge (never a false "truncated").
    """
    with open(path, "rb") as fh:
        head = fh.read(16)
        if head[:2] not in (b"II", b"MM"):
            return None
        e = "<" if head[:2] == b"II" else ">"
        version = struct.unpack(e + "H", head[2:4])[0]
        if version == 42:
            big, first = False, struct.unpack(e + "I", head[4:8])[0]
        elif version == 43 and len(head) == 16:
            big, first = True, struct.unpack(e + "Q", head[8:16])[0]
        else:
            return None
        count_fmt, ptr_fmt, entry_size = ("Q", "Q", 20) if big else ("H", "I", 12)
        ptr_size = 8 if big else 4
        end, pending, seen = 16 if big else 8, [first], set[int]()
        while pending:
            ifd = pending.pop()
            if ifd == 0 or ifd in seen:
                continue
            if len(seen) > 100_000:
                return None
            seen.add(ifd)
            fh.seek(ifd)
            raw = fh.read(8 if big else 2)
            if len(raw) < (8 if big else 2):
                return max(end, ifd + len(raw) + 1)
            n = struct.unpack(e + count_fmt, raw)[0]
            if n == 0 or n > 4096:
                return None
            body = fh.read(n * entry_size + ptr_size)
            ifd_end = ifd + len(raw) + n * entry_size + ptr_size
            end = max(end, ifd_end)
            if len(body) < n * entry_size + ptr_size:
                return end
            values: dict[int, np.ndarray] = {}
            for k in range(n):
                entry = body[k * entry_size : (k + 1) * entry_size]
                tag, typ = struct.unpack(e + "HH", entry[:4])
                if tag not in _OFFSET_TAGS + _COUNT_TAGS + (_SUBIFD_TAG,) or typ not in _TIFF_INTS:
                    continue
                count = struct.unpack(e + ("Q" if big else "I"), entry[4 : 4 + ptr_size])[0]
                dtype = np.dtype(e + _TIFF_INTS[typ])
                nbytes = count * dtype.itemsize
                field = entry[4 + ptr_size :]
                if nbytes <= ptr_size:
                    data = field[:nbytes]
                else:
                    where = struct.unpack(e + ptr_fmt, field)[0]
                    end = max(end, where + nbytes)
                    fh.seek(where)
                    data = fh.read(nbytes)
                    if len(data) < nbytes:
                        return end
                values[tag] = np.frombuffer(data, dtype).astype(np.uint64)
            for off_tag, cnt_tag in zip(_OFFSET_TAGS, _COUNT_TAGS):
                offsets, counts = values.get(off_tag), values.get(cnt_tag)
                if offsets is not None and counts is not None and len(offsets) == len(counts) and len(offsets):
                    end = max(end, int((offsets + counts).max()))
            pending.extend(int(v) for v in values.get(_SUBIFD_TAG, ()))
            pending.append(struct.unpack(e + ptr_fmt, body[n * entry_size :])[0])
        return end
