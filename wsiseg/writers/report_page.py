"""The per-slide HTML page, assembled: reads the nuclei columns once, draws the pictures and
charts, and lays out the sections `wsiseg.writers.report` describes.

Inputs are the JSON-ready report dict, a `ReportSlide` and a nuclei source (level-0 px).
"""

from __future__ import annotations

import html
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from wsiseg.writers.report import (
    LOW_SCORE,
    UNREADABLE_TILES_KEY,
    ReportSlide,
    fmt_mpp,
    page_title,
    report_warnings,
    tissue_area_mm2,
)
from wsiseg.writers.report_charts import ClassInfo, histogram_svg
from wsiseg.writers.report_crops import SCALE_BAR_UM, crop_side_l0, pick_crop_boxes, render_crops
from wsiseg.writers.report_images import (
    TISSUE_RGB,
    colorbar_rgb,
    density_grid,
    density_image,
    draw_overview,
    nice_ceiling,
    png_data_uri,
)
from wsiseg.writers.report_sections import (
    fmt,
    kv_table,
    list_at,
    mapping_at,
    models_table,
    outputs_list,
    parameters_table,
    processing_tables,
    run_table,
    section,
    unreadable_table,
    warnings_box,
)

__all__ = ["render_page"]

log = logging.getLogger(__name__)

_UNCLASSIFIED = ClassInfo(-1, "unclassified", (0, 200, 0))
#: (column, chart label, fixed range) of the histograms, in page order.
_HISTOGRAMS = (
    ("area_um2", "nucleus area (µm²)", (0.0, None)),
    ("score", "score", (0.0, 1.0)),
    ("hematoxylin_od_mean", "mean haematoxylin optical density", (0.0, None)),
)
#: Report keys the page shows in their own places (anything else is listed at the end).
_SHOWN = {
    "slide", "source", "wsiseg_version", "reader", "vendor", "size_l0", "mpp", "model", "models", "counts",
    "task_time_s", "workers", "model_fraction_of_wall", UNREADABLE_TILES_KEY, "parameters", "identity", "timings_s",
    "tissue_area_mm2", "command_line", "working_directory", "created", "software", "outputs", "warnings", "classes",
}  # fmt: skip


def _class_info(c: Any) -> ClassInfo:
    if isinstance(c, Mapping):
        return ClassInfo(int(c["id"]), str(c["name"]), tuple(int(v) for v in c["color"])[:3])  # type: ignore[arg-type]
    return ClassInfo(int(c.id), str(c.name), tuple(int(v) for v in c.color)[:3])  # type: ignore[arg-type]


def _column(nuclei: Any, name: str, n: int) -> np.ndarray | None:
    if nuclei is None or n == 0:
        return None
    try:
        values = np.asarray(nuclei.column(name))
    except (KeyError, AttributeError, LookupError):
        return None
    return values if len(values) == n else None


def render_page(
    report: Mapping[str, Any], slide: ReportSlide, nuclei: Any, classes: Sequence[Any], title: str | None
) -> str:
    """The whole page as one HTML string (UTF-8 text, no external references)."""
    n = len(nuclei) if nuclei is not None else 0
    centroids = _column(nuclei, "centroid", n)
    centroids = np.zeros((0, 2)) if centroids is None else centroids.reshape(-1, 2)
    class_id = _column(nuclei, "class_id", n)
    class_id = np.full(n, -1) if class_id is None else class_id.astype(np.int64)
    edge = _column(nuclei, "touches_edge", n)
    columns = {name: _column(nuclei, name, n) for name, _, _ in _HISTOGRAMS}

    known = [_class_info(c) for c in classes]
    if np.isin(class_id, [c.id for c in known], invert=True).any() or not known:
        known.append(_UNCLASSIFIED)
    shown = [c for c in known if (class_id == c.id).any()] or known[:1]

    counts = mapping_at(report, "counts")
    n_edge = int(edge.sum()) if edge is not None else int(counts.get("nuclei_touching_tile_edge", 0) or 0)
    mpp = slide.mpp
    tissue_mm2 = report.get("tissue_area_mm2")
    if not isinstance(tissue_mm2, (int, float)) and slide.tissue_l0 is not None and mpp:
        tissue_mm2 = tissue_area_mm2(slide.tissue_l0, mpp)
    score, area = columns["score"], columns["area_um2"]
    warnings = report_warnings(
        report, n_nuclei=n, n_edge=n_edge, mpp=mpp,
        low_score_share=float((score < LOW_SCORE).mean()) if score is not None else None,
        median_area_um2=float(np.median(area)) if area is not None else None,
    )

    grid = density_grid(centroids, slide.size_l0, mpp or 1.0, slide.tissue_l0)
    side = crop_side_l0(mpp)
    boxes = pick_crop_boxes(
        centroids, grid, slide.size_l0, side, touches_edge=edge, tissue_known=slide.tissue_l0 is not None,
        per_mm2=mpp is not None,
    )
    colors = {c.id: c.rgb for c in known}
    crops = [] if slide.read_l0 is None else render_crops(boxes, slide.read_l0, nuclei, colors, mpp=mpp)

    name = page_title(report, title)
    parts = [
        f"<header><h1>{name}</h1><p class=\"sub\">Nucleus segmentation report</p></header>",
        _slide_facts(report, slide, n, tissue_mm2),
        section("Warnings", warnings_box(warnings), ident="warnings"),
        _overview(slide, grid, mpp, [c.box for c in crops]),
        _crops(crops, side, mpp, slide.read_l0 is not None, known),
        _classes(shown, class_id, columns, tissue_mm2),
        _run_details(report),
    ]
    unreadable = report.get(UNREADABLE_TILES_KEY)
    if isinstance(unreadable, list) and unreadable:
        parts.append(section("Unreadable tiles", unreadable_table(unreadable), ident="unreadable"))
    rest = [(k.replace("_", " "), fmt(v)) for k, v in report.items() if k not in _SHOWN and v not in (None, [], {})]
    if rest:
        parts.append(section("Further recorded values", kv_table(rest)))
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{name} · wsiseg report</title><style>{_CSS}</style></head><body><main>"
        + "".join(parts)
        + "</main></body></html>\n"
    )


def _slide_facts(report: Mapping[str, Any], slide: ReportSlide, n: int, tissue_mm2: Any) -> str:
    mpp = slide.mpp
    w, h = slide.size_l0
    size = f"{w:,} × {h:,} px"
    if mpp:
        size += f" ({w * mpp / 1000:,.2f} × {h * mpp / 1000:,.2f} mm)"
    params = mapping_at(report, "parameters")
    source = "given with --mpp" if params.get("mpp") is not None else "from the slide file"
    has_area = isinstance(tissue_mm2, (int, float)) and tissue_mm2 > 0
    per_mm2 = f" ({n / tissue_mm2:,.0f} per mm² of tissue)" if has_area else ""
    models = list_at(report, "models")
    model_text = ", ".join(
        f"{m.get('name')}" + (f" {m.get('version')}" if m.get("version") else "")
        for m in models
        if isinstance(m, Mapping)
    ) or str(params.get("model") or "not recorded")
    scanner = (report.get("vendor"), report.get("reader"))
    rows = [
        ("Slide file", str(report.get("slide") or "not recorded")),
        ("Scanner · reader", " · ".join(str(v) for v in scanner if v) or "not recorded"),
        ("Size (level 0)", size),
        ("Resolution", f"{fmt_mpp(mpp)} ({source})" if mpp else "unknown"),
        ("Tissue area", f"{tissue_mm2:,.2f} mm²" if isinstance(tissue_mm2, (int, float)) else "not measured"),
        ("Nuclei", f"{n:,}{per_mm2}"),
        ("Model", model_text),
        ("Date", str(report.get("created") or "not recorded").replace("T", " ")),
    ]
    return section("Slide", kv_table(rows), ident="slide")


def _overview(slide: ReportSlide, grid: Any, mpp: float | None, boxes: Sequence[Any]) -> str:
    labelled = [(b.label, *b.bounds_l0) for b in boxes]
    overview = draw_overview(slide.thumbnail_rgb, slide.downsample, slide.tissue_l0, labelled)
    outline = "rgb({},{},{})".format(*TISSUE_RGB)
    tissue_note = (
        f'<span class="sw" style="background:{outline}"></span>tissue outline'
        if slide.tissue_l0 is not None else "tissue outline not available"
    )
    if boxes:
        tissue_note += f"; yellow boxes A-{boxes[-1].label} are the crops below"
    figs = [
        f'<figure class="ov"><img class="thumb" alt="slide thumbnail with tissue outline" '
        f'src="{png_data_uri(overview)}"><figcaption>{tissue_note}</figcaption></figure>'
    ]
    if mpp:
        valid = grid.per_mm2[np.isfinite(grid.per_mm2)]
        vmax = nice_ceiling(float(np.percentile(valid, 99)) if valid.size and valid.max() > 0 else 0.0)
        heat = density_image(grid, slide.thumbnail_rgb[:, :, :3], slide.downsample, vmax)
        ticks = "".join(
            f'<span style="left:{25 * k}%">{"≥ " if k == 4 else ""}{_tick(vmax * k / 4, vmax)}</span>'
            for k in range(5)
        )
        figs.append(
            f'<figure class="ov"><img class="thumb px" alt="nuclei density map" src="{png_data_uri(heat)}">'
            f'<div class="colorbar"><img class="cbar" alt="colour scale of the density map" '
            f'src="{png_data_uri(colorbar_rgb())}"><div class="ticks">{ticks}</div></div>'
            f"<figcaption>Nuclei per mm² of tissue, in squares of {grid.cell_um:g} µm; uncoloured squares "
            "hold too little tissue to measure</figcaption></figure>"
        )
    else:
        figs.append("<p>No density map: the slide's resolution is unknown, so nuclei per mm² cannot be given.</p>")
    return section("Overview", f'<div class="imgs">{"".join(figs)}</div>', ident="overview")


def _tick(value: float, vmax: float) -> str:
    return f"{value:,.0f}" if vmax >= 20 else f"{value:.3g}"


def _crops(crops: Sequence[Any], side: int, mpp: float | None, readable: bool, classes: Sequence[ClassInfo]) -> str:
    if not crops:
        why = "no slide pixels were available to the report" if not readable else "no nuclei or tissue to show"
        return section("Crops at full resolution", f"<p>No crops: {why}.</p>", ident="crops")
    legend = "".join(f'<span class="sw" style="background:{c.css}"></span>{html.escape(c.name)} ' for c in classes)
    figs = []
    for c in crops:
        b = c.box
        size = f"{b.width * mpp:,.0f} × {b.height * mpp:,.0f} µm" if mpp else f"{b.width} × {b.height} px"
        figs.append(
            f'<figure class="crop"><img class="px" alt="crop {b.label}: {html.escape(b.reason)}" '
            f'width="{c.image_rgb.shape[1]}" height="{c.image_rgb.shape[0]}" src="{png_data_uri(c.image_rgb)}">'
            f"<figcaption><b>{b.label}</b> · {html.escape(b.reason)}<br>{size} at x {b.x0:,}, y {b.y0:,} "
            f"(level-0 px) · {c.n_nuclei:,} nuclei outlined · pixels shown ×{c.magnify}</figcaption></figure>"
        )
    intro = (
        "<p>Level-0 pixels (the scan's full resolution) with every segmented nucleus outlined"
        + (f"; the white bar is {SCALE_BAR_UM:g} µm" if mpp else "") + f". {legend}</p>"
    )
    return section("Crops at full resolution", intro + f'<div class="crops">{"".join(figs)}</div>', ident="crops")


def _median(values: np.ndarray | None, rows: np.ndarray) -> str:
    if values is None or not rows.any():
        return "–"
    return fmt(float(np.median(values[rows])))


def _classes(shown: Sequence[ClassInfo], class_id: np.ndarray, columns: Mapping[str, Any], tissue_mm2: Any) -> str:
    n = len(class_id)
    per_area = isinstance(tissue_mm2, (int, float)) and tissue_mm2 > 0
    head = (
        "<tr><th>class</th><th>nuclei</th><th>share</th>" + ("<th>per mm² of tissue</th>" if per_area else "")
        + "<th>median area (µm²)</th><th>median score</th><th>median haematoxylin OD</th></tr>"
    )
    rows = []
    groups = [(c.name, c.css, class_id == c.id) for c in shown]
    if len(shown) > 1:
        groups.append(("all", "", np.ones(n, bool)))
    for name, css, rows_of in groups:
        k = int(rows_of.sum())
        swatch = f'<span class="sw" style="background:{css}"></span>' if css else ""
        rows.append(
            f"<tr><th>{swatch}{html.escape(name)}</th><td>{k:,}</td><td>{100 * k / max(n, 1):.1f} %</td>"
            + (f"<td>{k / tissue_mm2:,.0f}</td>" if per_area else "")
            + "".join(f"<td>{_median(columns[m], rows_of)}</td>" for m in ("area_um2", "score", "hematoxylin_od_mean"))
            + "</tr>"
        )
    charts = []
    for column, label, value_range in _HISTOGRAMS:
        values = columns.get(column)
        if values is None:
            continue
        svg, note = histogram_svg(values, class_id, shown, label=label, value_range=value_range)
        caption = html.escape(label[0].upper() + label[1:]) + (f" · {html.escape(note)}" if note else "")
        charts.append(f'<figure class="chart">{svg}<figcaption>{caption}</figcaption></figure>')
    hint = "<p>Bars: all nuclei; lines: one per class.</p>" if len(shown) > 1 else ""
    body = f'<table class="grid">{head}{"".join(rows)}</table>{hint}<div class="imgs">{"".join(charts)}</div>'
    return section("Nuclei per class", body, ident="classes")


def _run_details(report: Mapping[str, Any]) -> str:
    params = mapping_at(report, "parameters")
    counts = mapping_at(report, "counts")
    parts = ["<h3>Run</h3>", run_table(report), "<h3>Models</h3>", models_table(report)]
    if params:
        defaults = {"min_score": mapping_at(report, "model").get("min_score")}
        parts += ["<h3>Parameters</h3>", parameters_table(params, counts, defaults)]
    outputs = report.get("outputs")
    if isinstance(outputs, Mapping) and outputs:
        parts += ["<h3>Output files</h3>", outputs_list(outputs)]
    parts += ["<h3>Processing</h3>", processing_tables(report)]
    return section("Run details", "".join(parts), ident="run")


_CSS = (
    "body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:0;color:#1d2733;background:#f5f6f8}"
    "main{max-width:1240px;margin:0 auto;padding:1em 1.5em 3em}"
    "header h1{margin:.3em 0 0;font-size:1.6em}.sub{margin:.1em 0 1em;color:#5a6673}"
    "section{background:#fff;border:1px solid #dde1e6;border-radius:6px;padding:.6em 1.1em 1em;margin:0 0 1em}"
    "h2{font-size:1.15em;margin:.3em 0 .6em}h3{font-size:1em;margin:1em 0 .3em}"
    "table{border-collapse:collapse;margin:.3em 0}th,td{border-bottom:1px solid #e3e6ea;padding:3px 10px;"
    "text-align:left;vertical-align:top}table.kv th{color:#5a6673;font-weight:500;white-space:nowrap}"
    "table.grid th{background:#f0f2f4}table.grid td{font-variant-numeric:tabular-nums}"
    "code{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:.9em;word-break:break-all}"
    ".warn{background:#fff6db;border-left:4px solid #e0a800;padding:.2em .8em}.ok{color:#2d6a3e}"
    ".imgs{display:flex;flex-wrap:wrap;gap:1.2em;align-items:flex-start}figure{margin:0}"
    "figcaption{font-size:.88em;color:#4a5561;margin-top:.3em;max-width:550px}figure.chart figcaption{max-width:380px}"
    "img{border:1px solid #ccd2d8;display:block}figure.ov{flex:0 1 550px;min-width:0}img.thumb{width:100%;height:auto}"
    "img.px{image-rendering:pixelated}.crops{display:grid;grid-template-columns:repeat(auto-fill,minmax(330px,1fr));"
    "gap:1.2em}.crop img{max-width:100%;height:auto}"
    ".sw{display:inline-block;width:.8em;height:.8em;margin:0 .25em 0 .5em;border-radius:2px;vertical-align:-1px}"
    ".colorbar{margin-top:.5em}.colorbar img{width:100%;height:14px}"
    ".ticks{position:relative;height:1.3em;font-size:.8em;color:#333}"
    ".ticks span{position:absolute;transform:translateX(-50%);white-space:nowrap}"
    ".ticks span:first-child{transform:none}.ticks span:last-child{transform:translateX(-100%)}"
    "svg.hist text{font-size:11px;fill:#333;font-family:inherit}.cols{display:flex;flex-wrap:wrap;gap:2em}"
)
