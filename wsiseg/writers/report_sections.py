"""HTML fragments of the per-slide report that state facts: the slide, warnings, the run's
provenance (command line, date, software and models), parameters, outputs and processing.

Every fragment escapes what it shows and never prints a Python ``None``: unset values are left
out, or named for what they mean ("model default", "not recorded").
"""

from __future__ import annotations

import html
import json
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "PARAMETER_LABELS",
    "fmt",
    "kv_table",
    "list_at",
    "mapping_at",
    "models_table",
    "outputs_list",
    "parameters_table",
    "processing_tables",
    "run_table",
    "section",
    "unreadable_table",
    "warnings_box",
]

NOT_RECORDED = "not recorded"

#: How each RunConfig parameter reads on the page, and what an unset (None) value means there:
#: a string is shown in its place, None leaves the row out.
PARAMETER_LABELS: dict[str, tuple[str, str | None]] = {
    "model": ("Model", None),
    "prompter": ("Prompter", "the model's own"),
    "prompts_file": ("Prompts file", None),
    "tile_size_px": ("Tile size (px, working resolution)", "model default"),
    "overlap_px": ("Tile overlap (px)", None),
    "mpp": ("Resolution override (µm/px, --mpp)", None),
    "tissue_detection": ("Tissue detection", None),
    "roi": ("Region of interest (--roi)", None),
    "geojson_format": ("GeoJSON format", None),
    "write_labels": ("Label raster in the Zarr store", None),
    "device": ("Device", None),
    "k_negatives": ("Negative prompts per nucleus", "model default"),
    "prompt_selection": ("Prompt selection", "model default"),
    "points_per_tile": ("Points per tile", "model default"),
    "min_score": ("Minimum score", "model default"),
    "tta": ("Test-time augmentation (maps averaged over flips)", None),
    "precision": ("Network arithmetic (--precision)", None),
    "batch_tiles": ("Tiles per batch", None),
    "on_bad_tile": ("Tiles the file cannot decode", None),
}
_BAD_TILE_WORDS = {"fail": "stop the slide (fail)", "skip": "read as background and listed (skip)"}
_TILE_COLUMNS = ("level", "x_l0", "y_l0", "width_l0", "height_l0", "reason")
_COUNT_LABELS = {
    "prompter_tiles": "prompter tiles", "segmentor_tiles": "segmentor tiles", "points_found": "points found",
    "points_raw": "points kept (before merging)", "prompts": "prompts (after merging)", "nuclei": "nuclei",
    "unreadable_tiles": "unreadable tiles", "nuclei_touching_tile_edge": "nuclei touching a tile edge",
    "halo_px": "tile halo (px)", "tile_px": "tile size (px)",
}  # fmt: skip


def mapping_at(report: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    """report[key] when it is a mapping, else an empty one."""
    value = report.get(key)
    return value if isinstance(value, Mapping) else {}


def list_at(report: Mapping[str, Any], key: str) -> list[Any]:
    """report[key] when it is a list, else an empty one."""
    value = report.get(key)
    return value if isinstance(value, list) else []


def fmt(value: Any) -> str:
    """A value as page text: thousands separators, 4 significant digits, yes/no, no None."""
    if value is None:
        return NOT_RECORDED
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:,.4g}" if abs(value) < 1e6 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, (Mapping, list, tuple)):
        return json.dumps(value, separators=(", ", ": "), default=str)
    return str(value)


def section(title: str, body: str, *, ident: str = "") -> str:
    anchor = f' id="{ident}"' if ident else ""
    return f"<section{anchor}><h2>{html.escape(title)}</h2>{body}</section>"


def kv_table(rows: Sequence[tuple[str, str]], *, raw: bool = False, cls: str = "kv") -> str:
    """A two-column table; values are escaped unless `raw` (already HTML)."""
    body = "".join(
        f"<tr><th>{html.escape(k)}</th><td>{v if raw else html.escape(v)}</td></tr>" for k, v in rows
    )
    return f'<table class="{cls}">{body}</table>'


def warnings_box(warnings: Sequence[str]) -> str:
    if not warnings:
        return '<p class="ok">No warnings: no nucleus reached a tile edge, scores and sizes look usual.</p>'
    items = "".join(f"<li>{html.escape(w)}</li>" for w in warnings)
    return f'<div class="warn"><ul>{items}</ul></div>'


def run_table(report: Mapping[str, Any]) -> str:
    """Command line, working folder, date, software versions and run identity."""
    rows: list[tuple[str, str]] = []
    command = report.get("command_line")
    if command:
        rows.append(("Command line", f"<code>{html.escape(str(command))}</code>"))
    if report.get("working_directory"):
        rows.append(("Working folder", f"<code>{html.escape(str(report['working_directory']))}</code>"))
    rows.append(("Date", html.escape(str(report.get("created") or NOT_RECORDED).replace("T", " "))))
    software = report.get("software")
    if isinstance(software, Mapping) and software:
        text = ", ".join(f"{k} {v}" for k, v in software.items() if v)
    else:
        text = f"wsiseg {report.get('wsiseg_version') or NOT_RECORDED}"
    rows.append(("Software", html.escape(text)))
    if report.get("identity"):
        rows.append(("Run identity (sha256)", f"<code>{html.escape(str(report['identity']))}</code>"))
    return kv_table(rows, raw=True)


def models_table(report: Mapping[str, Any]) -> str:
    """One row per model: role, name, version, sha256 (bundles pin every weight file by it)."""
    models = report.get("models")
    if not isinstance(models, list) or not models:
        named = mapping_at(report, "model")
        models = [{"role": r, "name": named.get(r)} for r in ("segmentor", "prompter") if named.get(r)]
    rows = []
    for m in models:
        if not isinstance(m, Mapping):
            continue
        sha = m.get("sha256")
        rows.append(
            f"<tr><td>{html.escape(str(m.get('role') or ''))}</td><td>{html.escape(str(m.get('name') or ''))}</td>"
            f"<td>{html.escape(str(m.get('version') or 'none (built in or a raw checkpoint)'))}</td>"
            f"<td><code>{html.escape(str(sha or NOT_RECORDED))}</code></td></tr>"
        )
    head = "<tr><th>role</th><th>name</th><th>version</th><th>sha256</th></tr>"
    return f'<table class="grid">{head}{"".join(rows)}</table>'


def parameters_table(
    parameters: Mapping[str, Any], counts: Mapping[str, Any], defaults: Mapping[str, Any] | None = None
) -> str:
    """The run's parameters with readable names; unset ones say what was used instead (with the
    value, where `counts` (tile_px) or `defaults` (e.g. the model's min_score) records it), or are
    left out."""
    defaults = defaults or {}
    rows = []
    for key, value in parameters.items():
        label, unset = PARAMETER_LABELS.get(key, (key.replace("_", " "), None))
        if value is None:
            if unset is None:
                continue
            text = unset
            if key == "tile_size_px" and isinstance(counts.get("tile_px"), int):
                text = f"{unset} ({counts['tile_px']:,})"
            elif isinstance(defaults.get(key), (int, float)) and not isinstance(defaults.get(key), bool):
                text = f"{unset} ({fmt(defaults[key])})"
        elif key == "on_bad_tile":
            text = _BAD_TILE_WORDS.get(str(value), str(value))
        else:
            text = fmt(value)
        rows.append((label, text))
    return kv_table(rows)


def outputs_list(outputs: Mapping[str, Any]) -> str:
    items = "".join(
        f"<tr><th>{html.escape(k.replace('_', ' '))}</th><td><code>{html.escape(str(v))}</code></td></tr>"
        for k, v in outputs.items()
        if v
    )
    return f'<table class="kv">{items}</table>'


def processing_tables(report: Mapping[str, Any]) -> str:
    """Tile and prompt counts, workers, the model's share of wall time, and time per stage."""
    counts = mapping_at(report, "counts")
    rows = [(_COUNT_LABELS.get(k, k.replace("_", " ")), fmt(v)) for k, v in counts.items() if v is not None]
    if report.get("workers") is not None:
        rows.append(("workers", fmt(report["workers"])))
    share = report.get("model_fraction_of_wall")
    if isinstance(share, (int, float)):
        rows.append(("model's share of the workers' time", f"{100 * share:.0f} %"))
    parts = [kv_table(rows)] if rows else []
    timings = report.get("timings_s")
    if isinstance(timings, Mapping) and timings:
        stages = {k: float(v) for k, v in timings.items() if k != "total" and isinstance(v, (int, float))}
        total = timings.get("total")
        total = float(total) if isinstance(total, (int, float)) else sum(stages.values())
        trs = [
            f"<tr><th>{html.escape(str(stage))}</th><td>{sec:,.2f} s</td>"
            f"<td>{100.0 * sec / total if total > 0 else 0.0:.1f} %</td></tr>"
            for stage, sec in stages.items()
        ]
        trs.append(f"<tr><th>total</th><td>{total:,.2f} s</td><td></td></tr>")
        head = "<tr><th>stage</th><th>time</th><th>share</th></tr>"
        parts.append(f'<table class="grid">{head}{"".join(trs)}</table>')
    return '<div class="cols">' + "".join(parts) + "</div>"


def unreadable_table(tiles: Sequence[Any]) -> str:
    head = "".join(f"<th>{c}</th>" for c in _TILE_COLUMNS)
    rows = "".join(
        "<tr>" + "".join(f"<td>{html.escape(fmt(t.get(c, '')))}</td>" for c in _TILE_COLUMNS) + "</tr>"
        for t in tiles
        if isinstance(t, Mapping)
    )
    note = (
        f"<p><b>{len(tiles):,} {'tile' if len(tiles) == 1 else 'tiles'} of the slide file could not be decoded"
        "</b> and read as background: no nuclei were found there (coordinates in level-0 px).</p>"
    )
    return f'{note}<table class="grid"><tr>{head}</tr>{rows}</table>'
