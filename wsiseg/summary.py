"""The cohort summary: `OUT/summary.csv` and `OUT/summary.html`, one row per slide.

Built from the ledger (`OUT/wsiseg-ledger.json`: every slide ever run into OUT, its state and,
for failures, the reason) and each finished slide's `NAME.report.json`.  Failed slides come
first, then slides that did not finish (pending, running), then done and skipped ones, each
group in ledger order.  The HTML page is self-contained (inline style, no scripts, no
external files) and links each slide's `NAME.report.html` by a path relative to OUT.

Columns: slide, state, reason, nuclei, tissue_area_mm2, nuclei_per_mm2, time_s, model, precision,
mpp, warnings, report.  Tissue area (and so nuclei per mm²) is left empty when the slide's report
does not record it (`tissue_area_mm2`, or `tissue.area_mm2`); precision is the arithmetic the
slide's network ran at ("fp32" or "bf16", the report's `model.precision`), empty for a model
without a network (classical).
"""

from __future__ import annotations

import csv
import html
import io
import json
import os
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wsiseg._version import __version__
from wsiseg.cohort import LEDGER_NAME

SUMMARY_CSV = "summary.csv"
SUMMARY_HTML = "summary.html"
COLUMNS = ("slide", "state", "reason", "nuclei", "tissue_area_mm2", "nuclei_per_mm2", "time_s", "model",
           "precision", "mpp", "warnings", "report")
_ORDER = {"failed": 0, "pending": 1, "running": 1, "done": 2, "skipped": 2}


@dataclass(frozen=True)
class SummaryRow:
    """One slide of the summary.  Areas in mm², time in s (the run that made the outputs).

    report: path of the slide's HTML report (else JSON report) relative to the output folder,
        or None when it has none.
    """

    slide: str
    state: str
    reason: str | None = None
    nuclei: int | None = None
    tissue_area_mm2: float | None = None
    nuclei_per_mm2: float | None = None
    time_s: float | None = None
    model: str | None = None
    precision: str | None = None
    mpp: float | None = None
    warnings: tuple[str, ...] = ()
    report: str | None = None


def summary_rows(out_dir: Path) -> list[SummaryRow]:
    """The rows of OUT's summary, failures first (module docstring).  An absent or unreadable
    ledger gives no rows; an unreadable report leaves that slide's measured cells empty."""
    out_dir = Path(out_dir)
    try:
        entries: dict[str, dict[str, Any]] = json.loads((out_dir / LEDGER_NAME).read_text()).get("slides", {})
    except (OSError, ValueError, AttributeError):
        return []
    rows = [_safe_row(slide, entry, out_dir) for slide, entry in entries.items() if isinstance(entry, dict)]
    return sorted(rows, key=lambda r: _ORDER.get(r.state, 1))  # stable: ledger order within a group


def _safe_row(slide: str, entry: dict[str, Any], out_dir: Path) -> SummaryRow:
    """`_row`, or the ledger's own facts when a report holds something unexpected."""
    try:
        return _row(slide, entry, out_dir)
    except (AttributeError, TypeError, ValueError, KeyError):
        return SummaryRow(slide, str(entry.get("state", "pending")), reason=entry.get("reason"))


def _row(slide: str, entry: dict[str, Any], out_dir: Path) -> SummaryRow:
    state = str(entry.get("state", "pending"))
    if state == "failed":
        from wsiseg.cohort import reason_without_slide

        return SummaryRow(slide, state, reason=reason_without_slide(entry.get("reason") or "unknown (see wsiseg.log)",
                                                                    slide))
    report_path = _report_path(entry.get("report"), out_dir)
    report = _read_json(report_path) if report_path is not None else None
    if report_path is None or report is None:
        return SummaryRow(slide, state, nuclei=entry.get("nuclei"))
    counts = report.get("counts") or {}
    nuclei = counts.get("nuclei", entry.get("nuclei"))
    tissue = report.get("tissue_area_mm2")
    if tissue is None and isinstance(report.get("tissue"), dict):
        tissue = report["tissue"].get("area_mm2")
    tissue = float(tissue) if isinstance(tissue, (int, float)) else None
    per_mm2 = None
    if isinstance(nuclei, int) and tissue:
        per_mm2 = round(nuclei / tissue, 1)
    params = report.get("parameters") or {}
    model = params.get("model") or (report.get("model") or {}).get("segmentor")
    if params.get("prompter"):
        model = f"{model} (prompter {params['prompter']})"
    precision = (report.get("model") or {}).get("precision")
    html_path = report_path.with_name(report_path.name[: -len(".json")] + ".html")
    shown = html_path if html_path.is_file() else report_path
    return SummaryRow(
        slide, state, nuclei=nuclei, tissue_area_mm2=tissue, nuclei_per_mm2=per_mm2,
        time_s=_rounded((report.get("timings_s") or {}).get("total")), model=model,
        precision=str(precision) if precision else None, mpp=report.get("mpp"),
        warnings=_warnings(report), report=os.path.relpath(shown, out_dir),
    )


def _rounded(value: Any) -> float | None:
    return round(float(value), 1) if isinstance(value, (int, float)) else None


def _report_path(recorded: Any, out_dir: Path) -> Path | None:
    """The report JSON the ledger names: in OUT under its file name (the ledger records it as the
    run's command line gave OUT, which may be relative to another folder), else as recorded."""
    if not recorded:
        return None
    here = out_dir / Path(str(recorded)).name
    if here.is_file():
        return here
    return Path(str(recorded)) if Path(str(recorded)).is_file() else None


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _warnings(report: dict[str, Any]) -> tuple[str, ...]:
    """The report's own warnings when it lists them; else those its counts and its resolution
    imply (`wsiseg.writers.report.mpp_warnings`)."""
    from wsiseg.writers.report import mpp_warnings

    listed = report.get("warnings")
    if isinstance(listed, list):
        return tuple(str(w.get("message", w)) if isinstance(w, dict) else str(w) for w in listed)
    counts = report.get("counts") or {}
    found: list[str] = []
    if counts.get("nuclei") == 0:
        found.append("no nuclei found")
    if counts.get("nuclei_touching_tile_edge"):
        found.append(f"{counts['nuclei_touching_tile_edge']} nuclei reached their tile's edge")
    if counts.get("unreadable_tiles"):
        found.append(f"{counts['unreadable_tiles']} tiles could not be read")
    mpp = report.get("mpp")
    found += mpp_warnings(report, float(mpp) if isinstance(mpp, (int, float)) and not isinstance(mpp, bool) else None)
    return tuple(found)


def write_summary(out_dir: Path) -> tuple[Path, Path]:
    """Write OUT/summary.csv and OUT/summary.html (each atomically) from OUT's ledger and reports;
    returns their paths."""
    out_dir = Path(out_dir)
    rows = summary_rows(out_dir)
    csv_path, html_path = out_dir / SUMMARY_CSV, out_dir / SUMMARY_HTML
    _atomic_write(csv_path, render_csv(rows))
    _atomic_write(html_path, render_html(rows, title=f"wsiseg summary: {out_dir.resolve().name}"))
    return csv_path, html_path


def render_csv(rows: list[SummaryRow]) -> str:
    """The CSV text: a header of COLUMNS, one line per row; warnings joined by '; '."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(COLUMNS)
    for r in rows:
        writer.writerow([
            r.slide, r.state, r.reason or "", _cell(r.nuclei), _cell(r.tissue_area_mm2), _cell(r.nuclei_per_mm2),
            _cell(r.time_s), r.model or "", r.precision or "", _cell(r.mpp), "; ".join(r.warnings), r.report or "",
        ])
    return buffer.getvalue()


def _cell(value: Any) -> str:
    return "" if value is None else str(value)


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; font-size: 14px; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f0f0f0; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.failed td { background: #fde8e8; }
tr.pending td, tr.running td { background: #fff6dd; }
.muted { color: #777; }
"""


def render_html(rows: list[SummaryRow], *, title: str = "wsiseg summary") -> str:
    """A self-contained HTML page: counts, then the table; each slide's name links its report."""
    states: dict[str, int] = {}
    for r in rows:
        states[r.state] = states.get(r.state, 0) + 1
    finished = [r for r in rows if r.nuclei is not None and r.state in ("done", "skipped")]
    ordered = sorted(states.items(), key=lambda kv: _ORDER.get(kv[0], 1))
    counts = ", ".join(f"{n} {s}" for s, n in ordered) or "no slides"
    head = ["slide", "state", "reason", "nuclei", "tissue mm²", "nuclei / mm²", "time (s)", "model", "precision",
            "mpp", "warnings"]
    lines = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f"<p>{html.escape(counts)}; {sum(r.nuclei or 0 for r in finished)} nuclei in the finished slides.</p>",
        "<table><thead><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr></thead><tbody>",
    ]
    for r in rows:
        name = html.escape(Path(r.slide).name)
        link = f'<a href="{html.escape(urllib.parse.quote(r.report))}">{name}</a>' if r.report else name
        cells = [
            f'<td title="{html.escape(r.slide)}">{link}</td>', f"<td>{html.escape(r.state)}</td>",
            f"<td>{html.escape(r.reason or '')}</td>",
            *(f'<td class="num">{_cell(v)}</td>' for v in (r.nuclei, r.tissue_area_mm2, r.nuclei_per_mm2, r.time_s)),
            f"<td>{html.escape(r.model or '')}</td>", f"<td>{html.escape(r.precision or '')}</td>",
            f'<td class="num">{_cell(r.mpp)}</td>',
            "<td>" + "<br>".join(html.escape(w) for w in r.warnings) + "</td>",
        ]
        lines.append(f'<tr class="{html.escape(r.state)}">' + "".join(cells) + "</tr>")
    lines += [
        "</tbody></table>",
        f'<p class="muted">wsiseg {html.escape(__version__)}, {html.escape(time.strftime("%Y-%m-%d %H:%M:%S %z"))}. '
        "Empty cells: not recorded for that slide, or not applicable (precision: a model without a network, "
        "such as classical).</p>",
        "</body></html>",
    ]
    return "\n".join(lines) + "\n"


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
