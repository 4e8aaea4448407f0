"""The progress of `wsiseg run` on the terminal: one slide's stages, or the whole cohort."""

from __future__ import annotations

import os
import sys
import time
from typing import IO

from wsiseg.cli.event_log import STAGE_UNITS


class Progress:
    """The run's progress on the terminal (stderr), updated in place.

    One slide: one line per stage: tiles done / total, what the stage has counted so far, the
    stage's ETA.  The prompter stage counts the points it found (before the score and tissue
    filters and point NMS: the report's `points_found`); the segmentor stage counts nuclei, and
    its last line's count is the report's `nuclei`.

    A cohort (`slides_total` > 1): one line for the whole run, e.g.
    `3/10 slides done, 1 failed | b.svs: segmentor 120/400 tiles, 5,123 nuclei | cohort ETA 41m05s`.
    Slides done counts the finished and the already-done ones.  The cohort's ETA is the seconds
    per tile so far (the wall time of the slides run, over the tiles of every stage they did)
    times the tiles left: the current slide's (a stage that has not started yet is taken to have
    as many tiles as the current one) and, for each slide not started yet, the mean of the
    finished slides' (slides that turn out to be already done make it an overestimate).
    Call `start_slide` and `end_slide` around each slide, and `clear` before writing anything
    else to the terminal.  When stderr is not a terminal, a cohort writes plain lines to
    `plain_stream` (stdout) instead: one as each slide starts and the status line every
    `plain_every_s` during a slide; a single slide writes nothing.  Disabled (-q): nothing.
    """

    #: what each stage's running count is
    UNITS = STAGE_UNITS
    #: a slide's tile stages in the order they run
    STAGES = ("prompter", "segmentor")

    def __init__(self, name: str = "", enabled: bool = True, stream: IO[str] | None = None, *,
                 slides_total: int = 1, plain_stream: IO[str] | None = None, plain_every_s: float = 60.0) -> None:
        self.name = name
        self.stream = stream if stream is not None else sys.stderr
        self.cohort = slides_total > 1
        tty = self.stream.isatty()
        self.enabled = enabled and tty
        self.plain = enabled and self.cohort and not tty
        self.plain_stream = plain_stream if plain_stream is not None else sys.stdout
        self.plain_every_s = plain_every_s
        self.slides_total = slides_total
        self.slides_done = 0  # finished or already done
        self.slides_failed = 0
        self.start = time.monotonic()
        self.stage_start: dict[str, float] = {}
        self.last = 0.0
        self._last_plain = self.start
        self._shown = 0  # characters of the unfinished line on the terminal
        self._stage = ""
        self._count = 0
        self._tiles_done: dict[str, int] = {}  # the current slide's, per stage
        self._tiles_total: dict[str, int] = {}
        self._slide_t0: float | None = None
        self._run_s = 0.0  # wall time of the slides run (done or failed) before the current one
        self._run_tiles = 0  # their tiles
        self._done_tiles = 0  # tiles of the finished slides (for the mean per slide)
        self._done_slides = 0

    def __call__(self, stage: str, done: int, total: int, count: int) -> None:
        now = time.monotonic()
        self._stage, self._count = stage, count
        self._tiles_done[stage], self._tiles_total[stage] = done, total
        t0 = self.stage_start.setdefault(stage, now)
        if self.plain:
            if now - self._last_plain >= self.plain_every_s:
                self._last_plain = now
                self._write_plain(self._cohort_line(now))
            return
        if not self.enabled or (now - self.last < 0.1 and done < total):
            return
        self.last = now
        if self.cohort:
            self._show(self._cohort_line(now))
            return
        frac = done / total if total else 1.0
        eta = (now - t0) / frac * (1 - frac) if frac > 0 else 0.0
        bar = "#" * int(24 * frac)
        unit = self.UNITS.get(stage, "found")
        line = f"{self.name[:28]:28s} {stage:9s} [{bar:24s}] {done}/{total} tiles  {count:,} {unit}  ETA {eta:5.0f}s"
        self._show(line)
        if done >= total:
            self.stream.write("\n")
            self.stream.flush()
            self._shown = 0

    def start_slide(self, name: str) -> None:
        """The next slide of the run starts (its position is the slides ended so far + 1)."""
        now = time.monotonic()
        self.name = name
        self._slide_t0 = now
        self._stage, self._count = "", 0
        self._tiles_done, self._tiles_total, self.stage_start = {}, {}, {}
        if self.plain:
            self._last_plain = now
            position = self.slides_done + self.slides_failed + 1
            self._write_plain(f"slide {position}/{self.slides_total}: {name} | {self._cohort_line(now, slide=False)}")
        elif self.enabled and self.cohort:
            self._show(self._cohort_line(now))

    def end_slide(self, state: str) -> None:
        """The current slide ended: state "done", "failed" or "skipped" (already done: it was not
        started, and counts neither time nor tiles).  Clears the terminal line."""
        if state not in ("done", "failed", "skipped"):
            raise ValueError(f"unknown slide state {state!r}")
        if state == "failed":
            self.slides_failed += 1
        else:
            self.slides_done += 1
        if state != "skipped" and self._slide_t0 is not None:
            tiles = sum(self._tiles_done.values())
            self._run_s += time.monotonic() - self._slide_t0
            self._run_tiles += tiles
            if state == "done" and tiles:
                self._done_tiles += tiles
                self._done_slides += 1
        self._slide_t0 = None
        self._stage, self._count = "", 0
        self._tiles_done, self._tiles_total = {}, {}
        self.clear()

    def eta_s(self, now: float | None = None) -> float | None:
        """Seconds until the cohort is done (class docstring); None before the first tile or
        while no finished slide says how many tiles a slide has."""
        now = time.monotonic() if now is None else now
        current = sum(self._tiles_done.values())
        tiles = self._run_tiles + current
        if tiles == 0:
            return None
        running = self._slide_t0 is not None
        per_tile_s = (self._run_s + (now - self._slide_t0 if self._slide_t0 is not None else 0.0)) / tiles
        expected = sum(self._tiles_total.values())
        if self._stage in self.STAGES:  # stages still to come: as many tiles as this one, until they start
            later = self.STAGES[self.STAGES.index(self._stage) + 1:]
            expected += sum(self._tiles_total[self._stage] for s in later if s not in self._tiles_total)
        pending = max(self.slides_total - self.slides_done - self.slides_failed - running, 0)
        if self._done_slides:
            per_slide = self._done_tiles / self._done_slides
        elif running and expected:
            per_slide = expected
        elif pending or running:  # a slide to run whose tiles nothing says yet
            return None
        else:
            per_slide = 0.0
        # the running slide before its first stage reports its tiles: as many as a finished slide
        running_left = max((expected or per_slide) - current, 0) if running else 0
        return per_tile_s * (running_left + pending * per_slide)

    def clear(self) -> None:
        """Erase the unfinished line, so that other output starts on a clean line."""
        if self._shown:
            self.stream.write("\r" + " " * self._shown + "\r")
            self.stream.flush()
            self._shown = 0

    def _cohort_line(self, now: float, slide: bool = True) -> str:
        parts = [f"{self.slides_done}/{self.slides_total} slides done"
                 + (f", {self.slides_failed} failed" if self.slides_failed else "")]
        if slide and self._slide_t0 is not None:
            if self._stage:
                stage = self._stage
                unit = self.UNITS.get(stage, "found")
                parts.append(f"{self.name[:28]}: {stage} {self._tiles_done[stage]}/{self._tiles_total[stage]} tiles, "
                             f"{self._count:,} {unit}")
            else:
                parts.append(f"{self.name[:28]}: starting")
        eta = self.eta_s(now)
        parts.append(f"cohort ETA {_duration(eta)}" if eta is not None else "cohort ETA unknown")
        return " | ".join(parts)

    def _show(self, line: str) -> None:
        """Replace the unfinished line by `line`, cut to the terminal's width (a wrapped line
        could not be replaced)."""
        try:
            width = os.get_terminal_size(self.stream.fileno()).columns
        except (AttributeError, OSError, ValueError):  # not a real terminal (a test's stream)
            width = 0
        if width:
            line = line[: width - 1]
        self.stream.write("\r" + line + " " * max(self._shown - len(line), 0))
        self.stream.flush()
        self._shown = len(line)

    def _write_plain(self, line: str) -> None:
        self.plain_stream.write(line + "\n")
        self.plain_stream.flush()


def _duration(seconds: float) -> str:
    """45s, 12m05s, 3h07m."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"
