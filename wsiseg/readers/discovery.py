"""Which slides a folder holds: `find_slides` walks it, subfolders included.

A slide is a file with an extension some reader backend claims, except where a format spreads
one slide over several files:
* a folder holding DICOM instances (.dcm) is one slide (the folder), not one per file;
* MIRAX: `NAME.mrxs` is the slide and the folder `NAME/` beside it (Slidedat.ini, Data*.dat)
  its data, never searched;
* Hamamatsu VMS/VMU: the JPEG/map files the .vms/.vmu lists are its parts, not slides.
Hidden folders (`.wsiseg-work`), Zarr stores and the folders in `exclude` (the output
folder) are skipped.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from wsiseg.readers.registry import DICOM_SUFFIX, supported_extensions

_VMS_SUFFIXES = (".vms", ".vmu")


def _vms_parts(vms: Path) -> set[str]:
    """File names a Hamamatsu .vms/.vmu lists as its image, map and optimisation files."""
    names: set[str] = set()
    try:
        lines = vms.read_text(errors="replace").splitlines()
    except OSError:
        return names
    for line in lines:
        key, sep, value = line.partition("=")
        if sep and key.strip().lower().startswith(("imagefile", "mapfile", "optimisationfile", "macroimage")):
            names.add(value.strip())
    return names


def find_slides(folder: str | os.PathLike[str], *, exclude: Iterable[str | os.PathLike[str]] = ()) -> list[Path]:
    """Every slide under `folder`, sorted by path (see the module docstring for the rules).

    Returns folders for DICOM slides and files otherwise; `open_slide` opens both.
    """
    root = Path(folder)
    suffixes = set(supported_extensions()) - {DICOM_SUFFIX}
    skip = {Path(p).resolve() for p in exclude}
    found: list[Path] = []
    for here, dirs, files in os.walk(root):
        base = Path(here)
        if any(f.lower().endswith(DICOM_SUFFIX) for f in files):
            found.append(base)
        companions = {Path(f).stem for f in files if f.lower().endswith(".mrxs")}
        parts: set[str] = set()
        for f in files:
            if f.lower().endswith(_VMS_SUFFIXES):
                parts |= _vms_parts(base / f)
        dirs[:] = sorted(
            d for d in dirs
            if not d.startswith(".") and not d.lower().endswith(".zarr") and d not in companions
            and (base / d).resolve() not in skip
        )  # fmt: skip
        found.extend(
            base / f for f in files if Path(f).suffix.lower() in suffixes and f not in parts and not f.startswith(".")
        )
    return sorted(found)
