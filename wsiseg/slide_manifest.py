"""Cohort manifests: a CSV file listing slides, with per-slide overrides.

The header row names the columns: `path` (required), and optionally `mpp` (µm per level-0
pixel, replacing the file's), `roi` (a GeoJSON region file, as `--roi`) and `output_name`
(the name of the slide's outputs).  Relative paths are relative to the CSV file's folder.
Blank rows are skipped; anything else that cannot be used is a `ManifestError` naming the
file, the row (as a spreadsheet numbers it: the header is row 1) and the fix.

`wsiseg check` and `wsiseg run` read manifests through `expand_inputs`; a run applies a row's
mpp and roi with `entry_config` and its output_name with `requested_output_names`.
"""

from __future__ import annotations

import csv
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from wsiseg.pipeline import RunConfig

MANIFEST_COLUMNS = ("path", "mpp", "roi", "output_name")
_OUTPUT_NAME = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]*$")


class ManifestError(ValueError):
    """A manifest CSV cannot be used; the message names the file, the row and the fix."""


@dataclass(frozen=True)
class SlideEntry:
    """One slide of a cohort, with its per-slide overrides (None: the command's own).

    origin: where it was listed ("cohort.csv, row 3"), None for slides given directly.
    """

    path: Path
    mpp: float | None = None
    roi: Path | None = None
    output_name: str | None = None
    origin: str | None = None


def is_manifest(item: str | Path) -> bool:
    """Whether a command-line input is a manifest (a `.csv` file name)."""
    return str(item).lower().endswith(".csv")


def read_manifest(csv_path: Path) -> list[SlideEntry]:
    """The slides a manifest CSV lists, in row order (format in the module docstring).

    Raises ManifestError (one line: file, row, fix) for a missing file, no `path` column, an
    unknown column, an empty path, an mpp that is not a plausible number, a missing roi file,
    an unsafe or repeated output_name, or a slide listed twice.
    """
    from wsiseg.readers.base import MPP_RANGE

    csv_path = Path(csv_path)
    try:
        text = csv_path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{csv_path}: cannot read the manifest ({exc}); give a UTF-8 CSV file") from exc
    reader = csv.reader(text.splitlines())
    header = [h.strip().lower() for h in next(reader, [])]
    if "path" not in header:
        raise ManifestError(
            f"{csv_path}, row 1: no 'path' column; the first row must name the columns, e.g. "
            f"{','.join(MANIFEST_COLUMNS)}"
        )
    unknown = [h for h in header if h not in MANIFEST_COLUMNS]
    if unknown:
        raise ManifestError(
            f"{csv_path}, row 1: unknown column {unknown[0]!r}; the columns are {', '.join(MANIFEST_COLUMNS)}"
        )
    base = csv_path.parent
    entries: list[SlideEntry] = []
    seen_paths: dict[Path, int] = {}
    seen_names: dict[str, int] = {}
    for fields in reader:
        row = reader.line_num
        where = f"{csv_path}, row {row}"
        if not any(f.strip() for f in fields):
            continue
        if len(fields) > len(header):
            raise ManifestError(
                f"{where}: {len(fields)} fields but the header names {len(header)}; quote paths that hold commas"
            )
        values = {h: (fields[i].strip() if i < len(fields) else "") for i, h in enumerate(header)}
        if not values["path"]:
            raise ManifestError(f"{where}: the path is empty; give the slide's file (relative to {base})")
        path = _relative_to(values["path"], base)
        key = path.resolve()
        if key in seen_paths:
            raise ManifestError(f"{where}: {path} is listed twice (also row {seen_paths[key]}); list each slide once")
        seen_paths[key] = row
        mpp = None
        if values.get("mpp"):
            try:
                mpp = float(values["mpp"])
            except ValueError:
                mpp = math.nan
            lo, hi = MPP_RANGE
            if not (math.isfinite(mpp) and lo <= mpp <= hi):
                raise ManifestError(
                    f"{where}: mpp {values['mpp']!r} is not a resolution; give micrometres per pixel between "
                    f"{lo} and {hi} (e.g. 0.25 for 40x, 0.5 for 20x) or leave it empty"
                )
        roi = None
        if values.get("roi"):
            roi = _relative_to(values["roi"], base)
            if not roi.is_file():
                raise ManifestError(f"{where}: roi file {roi} not found; give a GeoJSON file (relative to {base})")
        name = values.get("output_name") or None
        if name is not None:
            if not _OUTPUT_NAME.match(name):
                raise ManifestError(
                    f"{where}: output_name {name!r} is not a plain file name; use letters, digits, '.', '_' and '-'"
                )
            if name.lower() in seen_names:
                raise ManifestError(
                    f"{where}: output_name {name!r} is also row {seen_names[name.lower()]}'s; give each slide its own"
                )
            seen_names[name.lower()] = row
        entries.append(SlideEntry(path, mpp, roi, name, where))
    if not entries:
        raise ManifestError(f"{csv_path}: lists no slides; add one row per slide below the header")
    return entries


def _relative_to(value: str, base: Path) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else base / path


def expand_inputs(inputs: Sequence[str], expand: Callable[[tuple[str, ...]], list[Path]]) -> list[SlideEntry]:
    """Command-line inputs -> slides: manifests (`.csv`) are read, everything else goes through
    `expand` (the command's folder expansion), in the order given.  Raises ManifestError."""
    entries: list[SlideEntry] = []
    for item in inputs:
        if is_manifest(item):
            if not Path(item).is_file():
                raise ManifestError(f"{item}: no such manifest; check the path")
            entries.extend(read_manifest(Path(item)))
        else:
            entries.extend(SlideEntry(p) for p in expand((item,)))
    return entries


def entry_config(config: RunConfig, entry: SlideEntry | None) -> RunConfig:
    """`config` with a manifest row's mpp and roi in place of the command's (`config` itself
    for a slide without overrides)."""
    if entry is None or (entry.mpp is None and entry.roi is None):
        return config
    return replace(config, mpp=entry.mpp if entry.mpp is not None else config.mpp,
                   roi=entry.roi if entry.roi is not None else config.roi)


def requested_output_names(names: dict[Path, str], entries: Sequence[SlideEntry], out_dir: Path) -> dict[Path, str]:
    """`names` (from `wsiseg.cohort.output_names`) with each manifest `output_name` in place of
    its slide's automatic name, under the same rules: unique within the run (ignoring case)
    and not a name whose outputs in out_dir belong to another source file.

    Raises ManifestError naming the row and the fix when a requested name breaks a rule.
    """
    from wsiseg.cohort import outputs_of_other_source

    requested = {e.path: e for e in entries if e.output_name and e.path in names}
    if not requested:
        return names
    final = dict(names)
    for slide, entry in requested.items():
        final[slide] = str(entry.output_name)
    for slide, entry in requested.items():
        name = final[slide]
        clash = next((other for other, n in final.items() if other != slide and n.lower() == name.lower()), None)
        if clash is not None:
            raise ManifestError(f"{entry.origin}: output_name {name!r} is also {clash}'s output name; choose another")
        if outputs_of_other_source(out_dir, name, slide.resolve()):
            raise ManifestError(
                f"{entry.origin}: {out_dir / name}.* are another slide's outputs; "
                "choose another output_name or -o folder"
            )
    return final
