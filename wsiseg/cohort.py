"""The cohort ledger: which slides of a run are done, failed (and why) or pending.

`OUT/wsiseg-ledger.json` is rewritten atomically after every slide, so an overnight run
that is killed still says how far it got; rerunning the same command skips the slides whose
outputs are complete and resumes a half-done slide from its checkpoint.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

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
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".json.partial")
        tmp.write_text(json.dumps({"slides": self.entries, "counts": self.counts()}, indent=1))
        os.replace(tmp, self.path)
