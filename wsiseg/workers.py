"""What a worker process keeps between tasks: models and open slides, built once each.

Tasks carry specs (names and paths, cheap to ship), not models or readers; `spec.load()` /
`spec.open()` build the object on first use in a process and reuse it afterwards.

Slides are read through `GuardedReader`, which turns a tile the file's decoder cannot read
into one line naming the file, pyramid level and tile box, or (``on_bad_tile="skip"``) paints
it as background and records it for the report.
"""

from __future__ import annotations

import logging
import math
import pickle
import threading
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal

import numpy as np

from wsiseg.models.protocols import Prompter, Segmentor
from wsiseg.readers.base import SlideError

log = logging.getLogger(__name__)

BadTilePolicy = Literal["fail", "skip"]
#: what a run does with a tile the slide file cannot decode: stop with one line, or paint it as background
BAD_TILE_POLICIES: tuple[BadTilePolicy, ...] = ("fail", "skip")
#: read grid (level px) for locating a damaged tile when the file does not say its tile size
DEFAULT_TILE_GRID_PX = 256
#: key of the damaged tiles (BadTile.as_dict() each) in a task's times and in the run's counts
BAD_TILES_KEY = "unreadable_tiles"


@dataclass(frozen=True)
class ModelSpec:
    """How a worker builds the models: names/paths, not objects (cheap to ship)."""

    model: str
    prompter: str | None
    device: str
    k_negatives: int | None
    prompter_options: tuple[tuple[str, Any], ...] = ()
    #: test-time augmentation (--tta): for the segmentor, and for the prompter where it takes it
    tta: bool = False
    #: --precision of the dense-map networks among the models (None: each bundle's own); the run
    #: replaces "auto" by what it resolved to where it started (`pipeline.load_run_models`), so
    #: every worker runs the same arithmetic
    precision: str | None = None

    def load(self) -> tuple[Prompter | None, Segmentor]:
        key = ("models", self)
        if key not in WORKER_CACHE:
            WORKER_CACHE[key] = _load_models(self)
        return WORKER_CACHE[key]


def _warm_kernels() -> None:
    try:
        from wsiseg.compiled import warm_up

        warm_up()
    except Exception:  # the first real tile meets (and reports) the same problem
        log.debug("loading the compiled kernels in advance failed", exc_info=True)


def _load_models(spec: ModelSpec) -> tuple[Prompter | None, Segmentor]:
    from wsiseg.allocator import keep_freed_memory
    from wsiseg.models import check_network_options, has_prompter, load_prompter, load_segmentor, takes_tta

    # the compiled stitching and writing kernels load beside the model (needed once masks exist)
    threading.Thread(target=_warm_kernels, name="wsiseg-warm-up", daemon=True).start()

    if spec.model != "classical" or (spec.prompter or "classical") != "classical":
        keep_freed_memory()  # a network's tile after tile the same large tensors: reuse them (wsiseg.allocator)
    prompter_name = spec.prompter or spec.model
    brings_prompter = spec.prompter is not None or has_prompter(spec.model)
    check_network_options(spec.model, spec.prompter, precision=spec.precision)
    segmentor = load_segmentor(spec.model, device=spec.device, k_negatives=spec.k_negatives, tta=spec.tta,
                               precision=spec.precision if takes_tta(spec.model, "segmentor") else None)
    if not brings_prompter:
        return None, segmentor  # a segmentor-only model: prompts come from --prompter or --prompts
    options = dict(spec.prompter_options)
    if (spec.tta or spec.precision is not None) and takes_tta(prompter_name, "prompter"):
        if spec.tta:
            options["tta"] = True
        if spec.precision is not None:
            options["precision"] = spec.precision
    prompter = load_prompter(prompter_name, device=spec.device, **options)
    if abs(prompter.mpp - segmentor.mpp) > 0.02 * segmentor.mpp:
        from wsiseg.models.classical import ClassicalPrompter, ClassicalSegmentor

        # the classical models' sizes are in µm: they adapt to a learned partner's resolution
        if isinstance(prompter, ClassicalPrompter):
            prompter = replace(prompter, mpp=segmentor.mpp)
        elif isinstance(segmentor, ClassicalSegmentor):
            segmentor = replace(segmentor, mpp=prompter.mpp)
        else:
            raise ValueError(
                f"prompter {prompter_name!r} works at {prompter.mpp} µm/px but segmentor {spec.model!r} at "
                f"{segmentor.mpp} µm/px; use models made for the same resolution"
            )
    return prompter, segmentor


def network_precision(prompter: Prompter | None, segmentor: Segmentor) -> str | None:
    """The arithmetic ("fp32"/"bf16") of the run's dense-map network (the segmentor's, else the
    prompter's); None when neither has one."""
    return getattr(segmentor, "precision", None) or getattr(prompter, "precision", None)


WORKER_CACHE: dict[Any, Any] = {}


@dataclass(frozen=True)
class SlideSpec:
    """How a worker opens the slide at the working mpp."""

    path: Path
    mpp_override: float | None
    target_mpp: float
    on_bad_tile: BadTilePolicy = "fail"

    def open(self) -> Any:
        """The slide as a ScaledSlide over a GuardedReader (see `on_bad_tile`)."""
        key = ("slide", self)
        if key not in WORKER_CACHE:
            from wsiseg.readers import open_slide
            from wsiseg.readers.scaled import ScaledSlide

            reader = GuardedReader(open_slide(self.path, mpp=self.mpp_override), self.on_bad_tile)
            WORKER_CACHE[key] = ScaledSlide(reader, self.target_mpp)
        return WORKER_CACHE[key]


# --------------------------------------------------------------------------- damaged tiles


class DamagedSlideError(SlideError):
    """A tile of the slide file cannot be decoded; the message names the file, level and region."""


@dataclass(frozen=True)
class BadTile:
    """One tile of a pyramid level that could not be decoded.

    level: pyramid level.  x_l0, y_l0, width_l0, height_l0: the tile's box in level-0 px
    (clipped to the level's image).  reason: the decoder's message, on one line.
    """

    level: int
    x_l0: int
    y_l0: int
    width_l0: int
    height_l0: int
    reason: str

    def region_text(self) -> str:
        return f"level {self.level}, region x={self.x_l0} y={self.y_l0} {self.width_l0}x{self.height_l0} (level-0 px)"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def unique_bad_tiles(tiles: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Damaged tiles (BadTile.as_dict() each) once each, as several workers may meet one;
    sorted by level, then y, then x."""
    unique = {(t["level"], t["x_l0"], t["y_l0"]): t for t in tiles}
    return [unique[k] for k in sorted(unique, key=lambda k: (k[0], k[2], k[1]))]


class GuardedReader:
    """A slide reader whose unreadable tiles are named, or painted as background.

    Wraps any SlideReader.  When a read fails inside the file's decoder, the region is read
    again tile by tile (the level's tile grid, `DEFAULT_TILE_GRID_PX` when the file does not
    say) to find the damaged tiles.  on_bad_tile "fail": raise DamagedSlideError naming the
    file, level and tile box.  "skip": those tiles read as white (background, as outside the
    slide) and are recorded; `take_bad_tiles()` returns the ones found since its last call.
    A failure that no single tile reproduces is re-raised as it is.  After a failure the
    wrapped reader is reopened (OpenSlide refuses every read after its first error).
    Pickles by the wrapped reader (by path): a worker process reopens the file.
    """

    def __init__(self, reader: Any, on_bad_tile: BadTilePolicy = "fail") -> None:
        if on_bad_tile not in BAD_TILE_POLICIES:
            raise ValueError(f"--on-bad-tile must be one of {BAD_TILE_POLICIES}, got {on_bad_tile!r}")
        self._inner = reader
        self.on_bad_tile = on_bad_tile
        self._known: dict[tuple[int, int, int], BadTile] = {}  # (level, column, row) -> tile
        self._new: list[BadTile] = []

    @property
    def properties(self) -> Any:
        return self._inner.properties

    @property
    def path(self) -> Path:
        return Path(self._inner.properties.path)

    def read_region(self, location_l0: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """As SlideReader.read_region: (h, w, 3) uint8 RGB; damaged tiles per `on_bad_tile`."""
        w, h = int(size[0]), int(size[1])
        props = self._inner.properties
        if w <= 0 or h <= 0 or not 0 <= level < props.level_count:
            return self._inner.read_region(location_l0, level, size)  # the reader's own errors and empty reads
        first: Exception | None = None
        if not self._hits_known(location_l0, level, (w, h)):
            try:
                return self._inner.read_region(location_l0, level, size)
            except (SlideError, MemoryError):
                raise  # not a decoding failure: unsupported pixels, out of memory
            except Exception as exc:  # noqa: BLE001 - decoders raise many types; located below
                first = exc
                self._reopen()
        return self._read_by_tile(location_l0, level, (w, h), first)

    def thumbnail(self, max_size: int) -> tuple[np.ndarray, float]:
        from wsiseg.readers.scaled import read_thumbnail

        return read_thumbnail(self, max_size)  # reads through read_region, so through the guard

    def take_bad_tiles(self) -> list[BadTile]:
        """The damaged tiles found since the last call (each once per reader)."""
        new, self._new = self._new, []
        return new

    def close(self) -> None:
        self._inner.close()

    def __getstate__(self) -> dict[str, Any]:
        return {"reader": self._inner, "on_bad_tile": self.on_bad_tile}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["reader"], state["on_bad_tile"])  # type: ignore[misc]

    def __repr__(self) -> str:
        return f"GuardedReader({self._inner!r}, on_bad_tile={self.on_bad_tile!r})"

    # -- internals -------------------------------------------------------------------------

    def _grid(self, level: int) -> tuple[int, int]:
        extra = getattr(self._inner.properties, "extra", {}) or {}
        sizes = []
        for axis in ("width", "height"):
            value = next((v for k, v in extra.items() if k.endswith(f".level[{level}].tile-{axis}")), None)
            try:
                sizes.append(max(16, int(value)) if value is not None else DEFAULT_TILE_GRID_PX)
            except ValueError:
                sizes.append(DEFAULT_TILE_GRID_PX)
        return sizes[0], sizes[1]

    def _blocks(
        self, location_l0: tuple[int, int], level: int, size: tuple[int, int]
    ) -> Iterator[tuple[int, int, int, int, int, int]]:
        """(column, row, ox0, oy0, ox1, oy1): grid tiles covering the region, with the part of
        the output (px) each covers."""
        props = self._inner.properties
        ds = float(props.level_downsamples[level])
        tw, th = self._grid(level)
        rx, ry = location_l0[0] / ds, location_l0[1] / ds  # region origin in level px
        w, h = size
        for row in range(math.floor(ry / th), math.floor((ry + h - 1) / th) + 1):
            oy0, oy1 = max(0, round(row * th - ry)), min(h, round((row + 1) * th - ry))
            for col in range(math.floor(rx / tw), math.floor((rx + w - 1) / tw) + 1):
                ox0, ox1 = max(0, round(col * tw - rx)), min(w, round((col + 1) * tw - rx))
                if ox1 > ox0 and oy1 > oy0:
                    yield col, row, ox0, oy0, ox1, oy1

    def _hits_known(self, location_l0: tuple[int, int], level: int, size: tuple[int, int]) -> bool:
        if not self._known:
            return False
        return any((level, col, row) in self._known for col, row, *_ in self._blocks(location_l0, level, size))

    def _read_by_tile(
        self, location_l0: tuple[int, int], level: int, size: tuple[int, int], first: Exception | None
    ) -> np.ndarray:
        ds = float(self._inner.properties.level_downsamples[level])
        w, h = size
        out = np.full((h, w, 3), 255, np.uint8)
        found = False
        for col, row, ox0, oy0, ox1, oy1 in self._blocks(location_l0, level, size):
            key = (level, col, row)
            if key not in self._known:
                at = (location_l0[0] + round(ox0 * ds), location_l0[1] + round(oy0 * ds))
                try:
                    out[oy0:oy1, ox0:ox1] = self._inner.read_region(at, level, (ox1 - ox0, oy1 - oy0))
                    continue
                except (SlideError, MemoryError):
                    raise
                except Exception as exc:  # noqa: BLE001 - this tile is the damaged one
                    self._reopen()
                    self._record(key, exc)
            found = True
            if self.on_bad_tile == "fail":
                tile = self._known[key]
                raise DamagedSlideError(
                    f"{self.path}: the file is damaged: {tile.region_text()} cannot be decoded ({tile.reason}); "
                    "re-export or re-scan the slide, or run with --on-bad-tile skip to paint unreadable tiles "
                    "as background (they are listed in the report)"
                )
        if not found and first is not None:
            raise first  # no single tile fails: not a damaged tile
        return out

    def _record(self, key: tuple[int, int, int], exc: Exception) -> None:
        level, col, row = key
        props = self._inner.properties
        ds = float(props.level_downsamples[level])
        lw, lh = props.level_dimensions[level]
        tw, th = self._grid(level)
        x0, y0, x1, y1 = col * tw, row * th, min((col + 1) * tw, lw), min((row + 1) * th, lh)
        reason = " ".join(str(exc).split()) or type(exc).__name__
        tile = BadTile(level, round(x0 * ds), round(y0 * ds), round((x1 - x0) * ds), round((y1 - y0) * ds), reason)
        self._known[key] = tile
        self._new.append(tile)
        log.info("%s: %s cannot be decoded (%s)", self.path, tile.region_text(), reason)

    def _reopen(self) -> None:
        """A fresh handle on the same file (readers pickle by path and reopen when unpickled)."""
        try:
            fresh = pickle.loads(pickle.dumps(self._inner))
        except Exception:  # noqa: BLE001 - a reader that cannot reopen keeps its handle
            return
        try:
            self._inner.close()
        except Exception:  # noqa: BLE001 - the broken handle may refuse to close
            pass
        self._inner = fresh
