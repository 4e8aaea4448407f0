"""The cohort ledger: which slides of a run are done, failed (and why) or pending.

`OUT/wsiseg-ledger.json` is rewritten atomically after every slide, so an overnight run
that is killed still says how far it got; rerunning the same command skips the slides whose
outputs are complete and resumes a half-done slide from its checkpoint.

Output names (`output_names`): a slide's outputs are named after its file name without the
extension (`a/slide.svs` -> `slide.geojson.gz`, `slide.zarr`, ...).  Names never collide:
slides of one run that share a stem are all named with their extension as well
(`slide.svs`, `slide.tiff` -> `slide_svs`, `slide_tiff`), then with their folders relative to
the slides' common folder (`a/slide.svs`, `b/slide.svs` -> `a_slide_svs`, `b_slide_svs`); and a
name whose outputs in the output folder belong to another source file (its report records the
source's path) is not reused: the next of those forms is taken.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

from wsiseg.disk_space import disk_full_error, is_disk_full

log = logging.getLogger(__name__)

LEDGER_NAME = "wsiseg-ledger.json"
STATES = ("pending", "running", "done", "skipped", "failed")


class Ledger:
    """Slide states for one output folder; `mark` saves at once."""

    def __init__(self, out_dir: Path, slides: list[Path]) -> None:
        self.path = out_dir / LEDGER_NAME
        self.entries: dict[str, dict[str, Any]] = {}
        if self.path.exists():
            try:
                self.entries = json.loads(self.path.read_text()).get("slides", {})
            except (OSError, ValueError):
                self.entries = {}
        for slide in slides:
            entry = self.entries.setdefault(str(slide), {"state": "pending"})
            if entry["state"] in ("running", "failed"):
                entry["state"] = "pending"  # retried by this run
        self._save()

    def mark(self, slide: Path, state: str, **details: Any) -> None:
        if state not in STATES:
            raise ValueError(f"unknown ledger state {state!r}")
        self.entries[str(slide)] = {"state": state, "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **details}
        self._save()

    def counts(self) -> dict[str, int]:
        out = {s: 0 for s in STATES}
        for entry in self.entries.values():
            out[entry["state"]] += 1
        return out

    def _save(self) -> None:
        """Write the ledger atomically.  On a full disk the previous file stays as it was (a
        warning names the disk; the states are saved with the next `mark` that finds room)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".json.partial")
        try:
            tmp.write_text(json.dumps({"slides": self.entries, "counts": self.counts()}, indent=1))
            os.replace(tmp, self.path)
        except OSError as exc:
            if not is_disk_full(exc):
                raise
            tmp.unlink(missing_ok=True)
            log.warning("%s not updated: %s", self.path, disk_full_error(exc, tmp))


def slide_stem(path: Path) -> str:
    """A slide's file name without its extension (`.ome.tiff` counts as one extension)."""
    name = path.name
    for suffix in (".ome.tiff", ".ome.tif"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def output_names(slides: Sequence[Path], out_dir: Path) -> dict[Path, str]:
    """One output name per slide, unique within the run and against other sources' outputs
    already in out_dir (the rules are in the module docstring).

    Raises ValueError when no unique name exists for a slide (two paths to one file).
    """
    slides = [Path(s) for s in slides]
    resolved = [s.resolve() for s in slides]
    common = Path(os.path.commonpath([str(r.parent) for r in resolved])) if resolved else Path()
    forms = [_name_forms(s, r, common) for s, r in zip(slides, resolved)]
    per_form = [Counter(f[k].lower() for f in forms) for k in range(len(forms[0]))] if forms else []
    taken: set[str] = set()
    names: dict[Path, str] = {}
    for slide, source, options in zip(slides, resolved, forms):
        # the first form that no other slide of the run shares
        start = next((k for k, counts in enumerate(per_form) if counts[options[k].lower()] == 1), len(options) - 1)
        for name in options[start:]:
            if name.lower() in taken or outputs_of_other_source(out_dir, name, source):
                continue
            taken.add(name.lower())
            names[slide] = name
            break
        else:
            raise ValueError(
                f"{slide}: no free output name in {out_dir} (tried {', '.join(options[start:])}); "
                "give each slide once, or use another -o folder"
            )
    return names


def _name_forms(slide: Path, source: Path, common: Path) -> list[str]:
    stem = slide_stem(slide)
    ext = re.sub(r"[^A-Za-z0-9]+", "_", slide.name[len(stem):]).strip("_") or "noext"
    try:
        folders = source.parent.relative_to(common).parts
    except ValueError:
        folders = source.parent.parts[1:]
    with_folders = "_".join([*folders, stem, ext])
    digest = hashlib.sha256(str(source).encode()).hexdigest()[:8]
    return [stem, f"{stem}_{ext}", with_folders, f"{with_folders}_{digest}"]


def outputs_of_other_source(out_dir: Path, name: str, source: Path) -> bool:
    """True when out_dir/NAME.report.json records a source file other than `source`."""
    report = out_dir / f"{name}.report.json"
    if not report.is_file():
        return False
    try:
        data = json.loads(report.read_text())
    except (OSError, ValueError):
        return False
    recorded = (data.get("source") or {}).get("path") or data.get("slide")
    return recorded is not None and Path(recorded) != source


def reason_without_slide(reason: str, slide: str | os.PathLike[str]) -> str:
    """A failure reason shown beside its slide, without the slide's path or name repeated at its
    start ("a.svs: no reader could open it" -> "no reader could open it")."""
    path = Path(slide)
    for prefix in (str(slide), str(path.resolve()), path.name):
        if prefix and reason.startswith(f"{prefix}: "):
            return reason[len(prefix) + 2 :]
    return reason
