"""Per-slide run report: a JSON file and a self-contained HTML page a pathologist can open.

The report is a plain JSON-compatible dict built by the pipeline; `record_run` adds what a
reader needs to trust and repeat the run (tissue area, command line, date, software and model
versions, output paths).  ``unreadable_tiles`` (UNREADABLE_TILES_KEY) lists the tiles the slide
file could not decode, read as background (``--on-bad-tile skip``), each a mapping level,
x_l0, y_l0, width_l0, height_l0 (level-0 px) and reason.

The HTML page (`write_report_html`), top to bottom: the slide in one table (size, resolution
and its source, tissue area, nuclei and nuclei per mm², model, date); warnings; the thumbnail
with the tissue outline and lettered boxes where the crops are; the density map in nuclei per
mm² of tissue with its colour bar; 4-6 crops at full resolution (level-0 pixels, magnified by
whole numbers) with every nucleus outline drawn (densest, sparsest tissue, an edge nucleus,
random); counts per class and histograms of area (µm²), score and haematoxylin OD per class;
then the run: command line, date, software, models (name, version, sha256), parameters, output
paths, counts and time per stage, unreadable tiles.  Images are PNG data URIs and the charts
inline SVG: the page loads nothing and runs no script.
"""

from __future__ import annotations

import html
import json
import math
import os
import platform
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "UNREADABLE_TILES_KEY",
    "ReportSlide",
    "density_map",
    "jsonable",
    "record_run",
    "report_warnings",
    "tissue_area_mm2",
    "write_report",
    "write_report_html",
]

#: report key of the tiles read as background because the slide file could not decode them
UNREADABLE_TILES_KEY = "unreadable_tiles"
#: A nucleus scoring below LOW_SCORE is doubtful; a slide where LOW_SCORE_SHARE or more of its
#: nuclei are doubtful gets a warning.
LOW_SCORE = 0.5
LOW_SCORE_SHARE = 0.2
#: Median nucleus areas outside this range (µm²) mean the resolution is probably wrong: human
#: nuclei are about 4-16 µm across (Alberts et al., Molecular Biology of the Cell, 6th ed., ch. 1),
#: i.e. 12-200 µm²; an mpp off by 2x moves the median area 4x.
PLAUSIBLE_MEDIAN_AREA_UM2 = (12.0, 200.0)
#: Finest resolution a brightfield scanner gives (µm/px); the coarsest is MAX_NUCLEUS_MPP.
MIN_SCAN_MPP = 0.1
#: Installed distributions whose versions the report records (when present).
_SOFTWARE = ("numpy", "torch", "zarr", "tiffslide", "openslide-python", "openslide-bin", "pillow")


def jsonable(obj: Any) -> Any:
    """`obj` converted to plain JSON types: numpy scalars/arrays, paths, tuples, sets, dataclasses.

    Non-finite floats become None (strict JSON has no NaN).
    """
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return jsonable(obj.item())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, (str, int, bool)) or obj is None:
        return obj
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if hasattr(obj, "__dataclass_fields__"):
        return {f: jsonable(getattr(obj, f)) for f in obj.__dataclass_fields__}
    return str(obj)


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.partial-{uuid.uuid4().hex[:8]}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_report(path: str | os.PathLike[str], report: Mapping[str, Any]) -> Path:
    """Write `report` as indented JSON to `path` atomically (temp file + rename); returns the path."""
    path = Path(path)
    text = json.dumps(jsonable(report), indent=2, allow_nan=False, sort_keys=False)
    _atomic_write_bytes(path, (text + "\n").encode("utf-8"))
    return path


def density_map(centroids_thumb: np.ndarray, shape_hw: tuple[int, int], *, bin_px: int = 8) -> np.ndarray:
    """Nuclei per bin on a grid over a thumbnail, (ceil(H/bin), ceil(W/bin)) float32.

    centroids_thumb: (N, 2) x, y in thumbnail pixels; points outside are ignored.  (The page's
    map in nuclei per mm² of tissue is `wsiseg.writers.report_images.density_grid`.)
    """
    if bin_px < 1:
        raise ValueError(f"bin_px must be >= 1, got {bin_px}")
    h, w = shape_hw
    gh, gw = max(1, -(-h // bin_px)), max(1, -(-w // bin_px))
    pts = np.asarray(centroids_thumb, np.float64).reshape(-1, 2)
    pts = pts[np.isfinite(pts).all(axis=1)]
    gx = np.floor(pts[:, 0] / bin_px).astype(np.int64)
    gy = np.floor(pts[:, 1] / bin_px).astype(np.int64)
    ok = (gx >= 0) & (gx < gw) & (gy >= 0) & (gy < gh)
    counts = np.bincount(gy[ok] * gw + gx[ok], minlength=gh * gw)
    return counts.reshape(gh, gw).astype(np.float32)


def tissue_area_mm2(tissue_l0: Any, mpp: float) -> float:
    """Area of a shapely (Multi)Polygon in level-0 px, in mm² at `mpp` µm per level-0 px."""
    if not mpp > 0:
        raise ValueError(f"tissue_area_mm2 needs mpp > 0 µm/px, got {mpp}")
    return float(tissue_l0.area) * mpp * mpp / 1e6


def _software() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    from wsiseg._version import __version__

    found = {"wsiseg": __version__, "python": platform.python_version()}
    for dist in _SOFTWARE:
        try:
            found[dist] = version(dist)
        except PackageNotFoundError:
            continue
    return found


def record_run(
    report: dict[str, Any],
    *,
    command_line: Sequence[str] | None = None,
    tissue_l0: Any = None,
    mpp: float | None = None,
    outputs: Mapping[str, str | os.PathLike[str]] | None = None,
    models: Sequence[Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """Add to `report` (in place; also returned) what a reader needs to trust and repeat the run.

    Keys: ``tissue_area_mm2`` (from tissue_l0, level-0 shapely geometry, at mpp µm/px; kept
    when already there), ``command_line`` (shell-quoted argv) and ``working_directory``,
    ``created`` (local ISO 8601 time), ``software`` (name -> version), ``outputs``
    (name -> path) and ``models`` (each role, name, version, sha256).
    """
    import shlex

    if report.get("tissue_area_mm2") is None and tissue_l0 is not None and mpp:
        report["tissue_area_mm2"] = round(tissue_area_mm2(tissue_l0, mpp), 6)
    if command_line:
        report["command_line"] = shlex.join(str(a) for a in command_line)
        report["working_directory"] = os.getcwd()
    report.setdefault("created", time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    report["software"] = _software()
    if outputs:
        report["outputs"] = {k: os.fspath(v) for k, v in outputs.items()}
    if models is not None:
        report["models"] = [dict(m) for m in models]
    return report


@dataclass(frozen=True)
class ReportSlide:
    """The slide as the HTML page shows it.

    thumbnail_rgb: (H, W, 3) uint8; downsample: level-0 px per thumbnail px; size_l0: (width,
    height) of level 0; mpp: µm per level-0 px (None: no physical units); tissue_l0: the tissue
    region, a shapely (Multi)Polygon in level-0 px (None: unknown, every cell counts as tissue);
    read_l0(x0, y0, width, height) -> (height, width, 3) uint8 level-0 pixels, for the crops.
    """

    thumbnail_rgb: np.ndarray
    downsample: float
    size_l0: tuple[int, int]
    mpp: float | None
    tissue_l0: Any = None
    read_l0: Callable[[int, int, int, int], np.ndarray] | None = None

    def __post_init__(self) -> None:
        a = np.asarray(self.thumbnail_rgb)
        if a.ndim != 3 or a.shape[2] not in (3, 4) or a.dtype != np.uint8:
            raise ValueError(f"ReportSlide.thumbnail_rgb must be (H, W, 3) uint8, got {a.shape} {a.dtype}")
        if not self.downsample > 0:
            raise ValueError(f"ReportSlide.downsample must be > 0, got {self.downsample}")
        if self.mpp is not None and not self.mpp > 0:
            raise ValueError(f"ReportSlide.mpp must be > 0 µm/px or None, got {self.mpp}")


def report_warnings(
    report: Mapping[str, Any],
    *,
    n_nuclei: int,
    n_edge: int,
    low_score_share: float | None,
    median_area_um2: float | None,
    mpp: float | None,
) -> list[str]:
    """What a reader should know before trusting the slide's numbers, one sentence each."""
    out = [str(w) for w in report.get("warnings", []) or []] if isinstance(report.get("warnings"), list) else []
    unreadable = report.get(UNREADABLE_TILES_KEY)
    if isinstance(unreadable, list) and unreadable:
        k = len(unreadable)
        out.append(
            f"{k:,} {'tile' if k == 1 else 'tiles'} of the slide file could not be decoded and "
            f"{'was' if k == 1 else 'were'} read as background: no nuclei were found there (listed below)."
        )
    if n_edge:
        share = 100.0 * n_edge / max(n_nuclei, 1)
        one = n_edge == 1
        out.append(
            f"{n_edge:,} {'nucleus' if one else 'nuclei'} ({share:.1f} %) reached the outer edge of "
            f"{'its' if one else 'their'} tile and may be cut short; kept and flagged touches_edge "
            "(a crop below shows one)."
        )
    if low_score_share is not None and low_score_share >= LOW_SCORE_SHARE:
        out.append(
            f"{100 * low_score_share:.0f} % of nuclei score below {LOW_SCORE}: the model is unsure on much of "
            "this slide (staining, focus or tissue type it was not trained on); check the crops."
        )
    out += mpp_warnings(report, mpp)
    lo, hi = PLAUSIBLE_MEDIAN_AREA_UM2
    if median_area_um2 is not None and n_nuclei >= 20 and not lo <= median_area_um2 <= hi:
        out.append(
            f"The median nucleus area is {median_area_um2:,.1f} µm², far from the usual {lo:.0f}-{hi:.0f} µm²: "
            f"the slide's resolution ({fmt_mpp(mpp)}) may be wrong; if so, rerun with --mpp."
        )
    if report.get("resumed"):
        out.append("This run resumed an interrupted one from its checkpoints: the times shown cover only the "
                   "part done after the resume (the nuclei are those of an uninterrupted run).")
    if n_nuclei == 0:
        out.append("No nuclei were found: check the tissue outline and the region of interest.")
    return out


def mpp_warnings(report: Mapping[str, Any], mpp: float | None) -> list[str]:
    """The warnings about the slide's resolution `mpp` (µm/px) a report implies: outside what
    scanners give, replacing the file's own (`file_mpp`) by far, or far coarser than the model's
    (`model.mpp`); the last two are `wsiseg check`'s own.  Used by the HTML page and the cohort
    summary."""
    from wsiseg.readers.resolution import MAX_NUCLEUS_MPP, override_warning, upsampling_warning

    out = []
    if mpp is not None and not MIN_SCAN_MPP <= mpp <= MAX_NUCLEUS_MPP:
        out.append(
            f"The resolution, {mpp:.4g} µm/px, is outside what scanners give for nuclei "
            f"({MIN_SCAN_MPP}-{MAX_NUCLEUS_MPP} µm/px); if it is wrong, rerun with --mpp."
        )
    file_mpp = report.get("file_mpp")
    own = (file_mpp, file_mpp) if isinstance(file_mpp, (int, float)) and not isinstance(file_mpp, bool) else None
    replaced = override_warning(mpp, own, "--mpp (or the slide manifest's mpp)")
    if replaced:
        out.append(replaced + " (the same warning as `wsiseg check`).")
    model = report.get("model")
    upsampled = upsampling_warning(mpp, model.get("mpp") if isinstance(model, Mapping) else None)
    if upsampled:
        out.append(upsampled[0].upper() + upsampled[1:] + " (the same warning as `wsiseg check`).")
    return out


def fmt_mpp(mpp: float | None) -> str:
    return "unknown µm/px" if mpp is None else f"{mpp:.4g} µm/px"


def write_report_html(
    path: str | os.PathLike[str],
    report: Mapping[str, Any],
    slide: ReportSlide,
    nuclei: Any = None,
    *,
    classes: Sequence[Any] | None = None,
    title: str | None = None,
) -> Path:
    """Write the self-contained HTML page (see the module docstring) to `path` atomically.

    nuclei: the run's nuclei, a `NucleiStore` (`wsiseg.writers.zarr_store.open_nuclei`) or any
    object with ``__len__``, ``column(name)`` and ``query(x0, y0, x1, y1)`` (level-0 px), or
    None.  classes: objects with `id`, `name`, `color` (NucleusClass) or mappings with those
    keys; default: the store's, else ``report["classes"]``.  Returns the path.
    """
    from wsiseg.writers.report_page import render_page

    data = jsonable(report)
    if classes is None:
        listed = data.get("classes")
        classes = getattr(nuclei, "classes", None) or (listed if isinstance(listed, list) else [])
    page = render_page(data, slide, nuclei, classes, title)
    path = Path(path)
    _atomic_write_bytes(path, page.encode("utf-8"))
    return path


def page_title(report: Mapping[str, Any], title: str | None) -> str:
    slide = report.get("slide")
    name = title or str(slide.get("path", "") if isinstance(slide, Mapping) else slide or "") or "wsiseg report"
    return html.escape(Path(name).name or name)
