"""Per-slide checkpoints, so a killed run resumes mid-slide without duplicates or gaps.

A run keeps `OUT/.wsiseg-work/<stem>-<key>/`, where the key hashes everything that decides
the result (slide file, size, modification time, parameters, model).  It holds the global
prompt set once the prompter stage is done, and every finished segmentor batch in order
(`batch-000000.npz`, ...).  Batches reach the writers in order and are saved before they are
written, so the saved ones are always a prefix: a resumed run reloads that prefix, computes
the rest, and rewrites the outputs from scratch.  The folder is removed after a complete run,
and so are the partial outputs (`<output>.partial-<hex>`) a killed attempt left beside the
outputs (`remove_partial_outputs`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from wsiseg.models.protocols import PointSet
from wsiseg.nuclei import NucleusTable

log = logging.getLogger(__name__)

WORK_DIR = ".wsiseg-work"
_TABLE_FIELDS = ("coords", "ring_offsets", "geom_offsets", "centroid_l0", "bbox_l0", "class_id", "area_px",
                 "touches_edge")


def checkpoint_key(slide: Path, decisive: dict[str, Any]) -> str:
    """A short hash of the slide file's identity and the parameters that decide the result."""
    st = slide.stat()
    blob = json.dumps({"slide": str(slide.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
                       **decisive}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class SlideCheckpoint:
    """The work folder of one slide run (see the module docstring)."""

    def __init__(self, out_dir: Path, stem: str, key: str) -> None:
        self.folder = out_dir / WORK_DIR / f"{stem}-{key}"

    # -- the global prompt set -------------------------------------------------------------

    def load_prompts(self) -> tuple[PointSet, dict[str, int]] | None:
        path = self.folder / "prompts.npz"
        if not path.exists():
            return None
        with np.load(path) as data:
            points = PointSet(data["xy"], data["score"], data["class_id"])
            counts = json.loads(str(data["counts"]))
        return points, counts

    def save_prompts(self, points: PointSet, counts: dict[str, int]) -> None:
        self._save("prompts.npz", xy=points.xy, score=points.score, class_id=points.class_id,
                   counts=np.array(json.dumps(counts)))

    # -- segmentor batches -----------------------------------------------------------------

    def saved_batches(self) -> int:
        """How many batches, from the first, are saved without a gap."""
        n = 0
        while (self.folder / _batch_name(n)).exists():
            n += 1
        return n

    def load_batch(self, index: int) -> tuple[NucleusTable, dict[str, float]]:
        with np.load(self.folder / _batch_name(index)) as data:
            fields = {f: data[f] for f in _TABLE_FIELDS}
            measurements = {k[2:]: data[k] for k in data.files if k.startswith("m.")}
            times = json.loads(str(data["times"]))
        table = NucleusTable(measurements=measurements, **fields)
        return table, times

    def save_batch(self, index: int, table: NucleusTable, times: dict[str, float]) -> None:
        arrays = {f: getattr(table, f) for f in _TABLE_FIELDS}
        arrays.update({f"m.{k}": v for k, v in table.measurements.items()})
        self._save(_batch_name(index), times=np.array(json.dumps(times)), **arrays)

    # -- housekeeping ----------------------------------------------------------------------

    def clear(self) -> None:
        """Remove the folder (and the work root when nothing else is in it)."""
        shutil.rmtree(self.folder, ignore_errors=True)
        try:
            self.folder.parent.rmdir()
        except OSError:
            pass

    def _save(self, name: str, **arrays: Any) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / f".{name}.partial.npz"
        np.savez(tmp, **arrays)
        os.replace(tmp, self.folder / name)  # atomic: a file is either whole or absent


def _batch_name(index: int) -> str:
    return f"batch-{index:06d}.npz"


def remove_partial_outputs(outputs: Iterable[Path], *, before: float | None = None) -> list[Path]:
    """Delete what killed runs left of these outputs: the writers' temporary
    `<output name>.partial-<hex>` files and folders beside each output, last modified before
    `before` (epoch seconds, default now), so a writer still busy in another process keeps its
    own.  Nothing else is touched: not another slide's partials (their names differ before
    `.partial-`), not the outputs.  Returns the removed paths.
    """
    cutoff = time.time() if before is None else before
    removed: list[Path] = []
    for output in outputs:
        pattern = re.compile(re.escape(output.name) + r"\.partial-[0-9a-f]+")
        try:
            siblings = list(output.parent.iterdir())
        except OSError:
            continue
        for path in siblings:
            if not pattern.fullmatch(path.name):
                continue
            try:
                if path.lstat().st_mtime >= cutoff:
                    continue
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink()
            except OSError as exc:
                log.warning("could not remove %s left by an interrupted run: %s", path, exc)
                continue
            removed.append(path)
    if removed:
        log.info("removed %d partial outputs of interrupted runs: %s", len(removed), ", ".join(p.name for p in removed))
    return removed
