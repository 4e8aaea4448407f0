"""Per-slide run report: a JSON file and a self-contained HTML page.

The report is a plain JSON-compatible dict built by the pipeline.  The HTML page shows
its top-level scalars as a summary table, every mapping as a key-value table (titled by
its key; ``timings_s`` = stage -> seconds gets a per-stage share column, and its
``total`` entry, when present, is the wall time) and every list as bullet points.

``unreadable_tiles`` (UNREADABLE_TILES_KEY), when not empty, is shown first after the summary
as a table: the tiles the slide file could not decode, read as background
(``--on-bad-tile skip``), each a mapping level, x_l0, y_l0, width_l0, height_l0 (level-0 px)
and reason.

Images: the thumbnail (RGB uint8, H x W x 3) with one dot per nucleus coloured by
class, and a nuclei-density heat map, both inlined as base64 PNG.  Centroids passed
here are in *thumbnail* pixels (x, y), i.e. level-0 centroids divided by the
thumbnail's downsample.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["UNREADABLE_TILES_KEY", "density_map", "jsonable", "render_overlay", "write_report", "write_report_html"]

#: report key of the tiles read as background because the slide file could not decode them
UNREADABLE_TILES_KEY = "unreadable_tiles"
_TILE_COLUMNS = ("level", "x_l0", "y_l0", "width_l0", "height_l0", "reason")

_UNCLASSIFIED_RGB = (0, 200, 0)


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
    """Nuclei per bin on a grid over the thumbnail, (ceil(H/bin), ceil(W/bin)) float32.

    centroids_thumb: (N, 2) x, y in thumbnail pixels; points outside are ignored.
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


# Anchors of a perceptually ordered dark-blue -> teal -> yellow ramp (viridis-like), 0..1.
_RAMP = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], np.float64)


def _colorize(values: np.ndarray) -> np.ndarray:
    """(H, W) non-negative values -> (H, W, 3) uint8 via the ramp, scaled to the 99th percentile."""
    v = np.asarray(values, np.float64)
    top = float(np.percentile(v[v > 0], 99)) if (v > 0).any() else 1.0
    t = np.clip(v / max(top, 1e-12), 0.0, 1.0) * (len(_RAMP) - 1)
    anchors = np.arange(len(_RAMP))
    rgb = np.stack([np.interp(t, anchors, _RAMP[:, c]) for c in range(3)], axis=-1)
    return np.round(rgb).astype(np.uint8)


def render_overlay(
    thumbnail_rgb: np.ndarray,
    centroids_thumb: np.ndarray,
    class_id: np.ndarray | None = None,
    class_colors: Mapping[int, tuple[int, int, int]] | None = None,
    *,
    radius_px: int = 1,
) -> np.ndarray:
    """The thumbnail with a filled disc of `radius_px` per nucleus, coloured by class.

    thumbnail_rgb: (H, W, 3) uint8.  centroids_thumb: (N, 2) x, y thumbnail px.
    class_id: (N,) ints (-1 or unknown ids drawn in a default green).  Returns a new array.
    """
    img = np.array(_as_rgb(thumbnail_rgb), copy=True)
    h, w = img.shape[:2]
    pts = np.asarray(centroids_thumb, np.float64).reshape(-1, 2)
    finite = np.isfinite(pts).all(axis=1)
    pts = pts[finite]
    cx = np.floor(pts[:, 0]).astype(np.int64)
    cy = np.floor(pts[:, 1]).astype(np.int64)
    colors = np.tile(np.array(_UNCLASSIFIED_RGB, np.uint8), (len(pts), 1))
    if class_id is not None and class_colors:
        cid = np.asarray(class_id).reshape(-1)[finite]
        for k, rgb in class_colors.items():
            colors[cid == k] = np.asarray(rgb, np.uint8)
    r = max(0, int(radius_px))
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            if dx * dx + dy * dy > r * r:
                continue
            x, y = cx + dx, cy + dy
            ok = (x >= 0) & (x < w) & (y >= 0) & (y < h)
            img[y[ok], x[ok]] = colors[ok]
    return img


def _as_rgb(image: np.ndarray) -> np.ndarray:
    a = np.asarray(image)
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)
    if a.ndim != 3 or a.shape[2] not in (3, 4):
        raise ValueError(f"thumbnail_rgb must be (H, W, 3) uint8, got shape {a.shape}")
    if a.dtype != np.uint8:
        raise ValueError(f"thumbnail_rgb must be uint8, got {a.dtype}")
    return a[:, :, :3]


def _png_data_uri(rgb: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb)).save(buf, format="PNG", optimize=False)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.4g}" if abs(value) < 1e6 else f"{value:,.0f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    if isinstance(value, (Mapping, list)):
        return json.dumps(value, separators=(", ", ": "))
    return str(value)


def _kv_table(data: Mapping[str, Any]) -> str:
    rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(_fmt(v))}</td></tr>" for k, v in data.items())
    return f"<table>{rows}</table>"


def _timings_table(timings: Mapping[str, Any]) -> str:
    stages = {k: float(v) for k, v in timings.items() if k != "total" and isinstance(v, (int, float))}
    total = timings.get("total")
    total = float(total) if isinstance(total, (int, float)) else sum(stages.values())
    rows = [
        f"<tr><th>{html.escape(str(stage))}</th><td>{sec:,.2f} s</td>"
        f"<td>{100.0 * sec / total if total > 0 else 0.0:.1f} %</td></tr>"
        for stage, sec in stages.items()
    ]
    rows.append(f"<tr><th>total</th><td>{total:,.2f} s</td><td></td></tr>")
    return "<table><tr><th>stage</th><th>time</th><th>share</th></tr>" + "".join(rows) + "</table>"


def _unreadable_table(tiles: Sequence[Any]) -> str:
    head = "".join(f"<th>{c}</th>" for c in _TILE_COLUMNS)
    rows = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_fmt(t.get(c, '')))}</td>" for c in _TILE_COLUMNS) + "</tr>"
        for t in tiles
        if isinstance(t, Mapping)
    )
    note = (
        f"<p><b>{len(tiles):,} tiles of the slide file could not be decoded</b> and were read as background: "
        "no nuclei were found there (coordinates in level-0 px).</p>"
    )
    return f"{note}<table><tr>{head}</tr>{rows}</table>"


def _section(title: str, body: str) -> str:
    return f"<section><h2>{html.escape(title)}</h2>{body}</section>"


def write_report_html(
    path: str | os.PathLike[str],
    report: Mapping[str, Any],
    thumbnail_rgb: np.ndarray,
    centroids_thumb: np.ndarray,
    class_id: np.ndarray | None = None,
    *,
    classes: Sequence[Any] | None = None,
    density: np.ndarray | None = None,
    title: str | None = None,
) -> Path:
    """Write a self-contained HTML report (images inlined) to `path` atomically; returns the path.

    thumbnail_rgb: (H, W, 3) uint8.  centroids_thumb: (N, 2) x, y in thumbnail px.
    class_id: (N,) class of each centroid.  classes: objects with `id`, `name`, `color`
    (e.g. NucleusClass) or mappings with those keys, for dot colours and the legend
    (default: ``report["classes"]`` when present).  density: (h, w) nuclei-density grid
    at any resolution, shown stretched to the thumbnail width; from `density_map` when None.
    """
    data = jsonable(report)
    thumb = _as_rgb(thumbnail_rgb)
    if classes is None:
        classes = data.get("classes") if isinstance(data.get("classes"), list) else []
    class_list = [_class_tuple(c) for c in classes]
    overlay = render_overlay(thumb, centroids_thumb, class_id, {c[0]: c[2] for c in class_list})
    heat = _colorize(np.asarray(density_map(centroids_thumb, thumb.shape[:2]) if density is None else density))
    slide = data.get("slide")
    name = title or str(slide.get("path", "") if isinstance(slide, dict) else slide or "") or "wsiseg report"
    n_nuclei = len(np.asarray(centroids_thumb).reshape(-1, 2))
    legend = "".join(
        f'<span class="sw" style="background:rgb{rgb}"></span>{html.escape(n)} ' for _, n, rgb in class_list
    )

    parts = [f"<h1>{html.escape(Path(name).name or name)}</h1>"]
    scalars = {k: v for k, v in data.items() if not isinstance(v, (dict, list))}
    if scalars:
        parts.append(_section("Summary", _kv_table(scalars)))
    unreadable = data.get(UNREADABLE_TILES_KEY)
    if isinstance(unreadable, list) and unreadable:
        parts.append(_section("Unreadable tiles", _unreadable_table(unreadable)))
    parts.append(
        _section(
            "Nuclei",
            f'<div class="imgs"><figure><img alt="nuclei overlay" src="{_png_data_uri(overlay)}">'
            f"<figcaption>{n_nuclei:,} nuclei {legend}</figcaption></figure>"
            f'<figure><img alt="nuclei density" class="px" style="width:{thumb.shape[1]}px" '
            f'src="{_png_data_uri(heat)}"><figcaption>nuclei density</figcaption></figure></div>',
        )
    )
    for key, value in data.items():
        title_ = key.replace("_", " ").capitalize()
        if key == UNREADABLE_TILES_KEY:
            continue  # shown above
        if key == "timings_s" and isinstance(value, dict):
            parts.append(_section("Timings per stage", _timings_table(value)))
        elif isinstance(value, dict):
            parts.append(_section(title_, _kv_table(value)))
        elif isinstance(value, list) and value:
            items = "".join(f"<li>{html.escape(_fmt(v))}</li>" for v in value)
            parts.append(_section(title_, f"<ul>{items}</ul>"))

    page = (
        '<!DOCTYPE html><html><head><meta charset="utf-8">'
        f"<title>{html.escape(name)}</title><style>{_CSS}</style></head><body>" + "".join(parts) + "</body></html>\n"
    )
    path = Path(path)
    _atomic_write_bytes(path, page.encode("utf-8"))
    return path


def _class_tuple(c: Any) -> tuple[int, str, tuple[int, int, int]]:
    if isinstance(c, Mapping):
        return int(c["id"]), str(c["name"]), tuple(int(v) for v in c["color"])  # type: ignore[return-value]
    return int(c.id), str(c.name), tuple(int(v) for v in c.color)  # type: ignore[return-value]


_CSS = (
    "body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}"
    "table{border-collapse:collapse;margin:.3em 0}th,td{border:1px solid #ccc;padding:2px 8px;"
    "text-align:left;vertical-align:top}th{background:#f4f4f4;font-weight:600}"
    ".imgs{display:flex;flex-wrap:wrap;gap:1em}figure{margin:0}img{max-width:100%;border:1px solid #ccc}"
    "img.px{image-rendering:pixelated}.sw{display:inline-block;width:.8em;height:.8em;margin:0 .2em 0 .6em}"
    "pre{background:#f8f8f8;padding:.5em;overflow:auto}"
)
