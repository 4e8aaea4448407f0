"""`wsiseg run --log FILE`: the run's events as JSON lines, for machines.

One JSON object per line, appended (a rerun adds its own events after the earlier run's), each
flushed as it is written, so a killed run leaves only whole lines.  Every object has `time`
(ISO 8601, local time with its UTC offset, milliseconds), `event` and `slide` (the slide's path
as given, or null for the run's own events), then the event's fields:

- `run_start`: `command`, `version`, `out`, `slides` (how many), `parameters` (the run's
  result-deciding parameters, as the reports record them), `scheduler`, `overwrite`
- `cluster_start`: `dashboard` (the Dask dashboard's address, or null), `workers`
- `slide_start`: `index` (1-based position in the run), `total`, `output_name`
- `slide_skipped`: `reason` ("already done"), `report`
- `progress`: `stage`, `tiles_done`, `tiles_total`, `count`, `unit` ("points" for the
  prompter, "nuclei" for the segmentor); a stage's first and last batch, and at most one
  every `progress_every_s` (5 s) per slide between them
- `slide_done`: `nuclei`, `seconds`, `unreadable_tiles`, `outputs` (`geojson`, `zarr`,
  `report`, `report_html`)
- `slide_failed`: `reason` (the one line the terminal shows), `seconds`
- `run_interrupted`: `signal` ("SIGINT", "SIGTERM" or "SIGHUP"); `slide` is the slide under
  way (back to pending), or null
- `run_end`: `done`, `skipped`, `failed`, `pending` (slides of this run in each state),
  `exit_code`, `seconds`
"""

from __future__ import annotations

import json
import time
from datetime import datetime
from pathlib import Path
from typing import IO, Any

#: the least seconds between two `progress` events of one slide (a stage's ends excepted)
PROGRESS_EVERY_S = 5.0
#: what each stage's running count is (as the terminal's progress line)
STAGE_UNITS = {"prompter": "points", "segmentor": "nuclei"}


class EventLog:
    """Writes the run's events to `path` (module docstring); with `path` None it writes nothing.

    Raises OSError when the file cannot be opened for appending (a missing folder, no permission).
    """

    def __init__(self, path: Path | None, *, progress_every_s: float = PROGRESS_EVERY_S) -> None:
        self.path = path
        self.progress_every_s = progress_every_s
        self._file: IO[str] | None = None
        if path is not None:
            self._file = open(path, "a", encoding="utf-8", buffering=1)  # line-buffered: whole lines on disk
        self._last_progress: dict[str, tuple[str, float]] = {}  # slide -> (stage, monotonic time)

    def __enter__(self) -> EventLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def emit(self, event: str, slide: Path | str | None = None, **fields: Any) -> None:
        """Append one event; Paths in `fields` are written as strings."""
        if self._file is None:
            return
        record = {
            "time": datetime.now().astimezone().isoformat(timespec="milliseconds"),
            "event": event,
            "slide": None if slide is None else str(slide),
            **fields,
        }
        self._file.write(json.dumps(record, default=str, allow_nan=False) + "\n")

    def progress(self, slide: Path, stage: str, done: int, total: int, count: int) -> None:
        """A `progress` event, unless this slide had one less than `progress_every_s` ago in the
        same stage and this batch is not the stage's last."""
        if self._file is None:
            return
        now = time.monotonic()
        last = self._last_progress.get(str(slide))
        if last is not None and last[0] == stage and now - last[1] < self.progress_every_s and done < total:
            return
        self._last_progress[str(slide)] = (stage, now)
        self.emit("progress", slide, stage=stage, tiles_done=done, tiles_total=total, count=count,
                  unit=STAGE_UNITS.get(stage, "found"))
