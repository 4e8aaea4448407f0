"""The report of a real run, as its reader gets it: the JSON records tissue area, command line,
models and outputs, and the HTML page opens offline in a real browser (headless Chromium from
Debian's package) with every image decoded, the colour bar and the crops laid out, and no
"None" in its text."""

from __future__ import annotations

import html
import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from wsiseg.pipeline import RunConfig, SlideResult, run_slide
from wsiseg.readers import open_slide
from wsiseg.scheduling import SchedulerConfig
from wsiseg.tissue import tissue_for_slide

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
CHROMIUM = next((found for found in map(shutil.which, BROWSERS) if found), None)
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="no Chromium binary on PATH (Debian: apt-get install chromium; .ci/run installs it)"
)

# Added to a copy of the page only: the page itself has no script.  After load it writes what the
# browser made of the page into an attribute that --dump-dom prints.
PROBE = """<script>
addEventListener('load', () => {
  const imgs = [...document.images];
  const shown = (i) => i.complete && i.naturalWidth > 0 && i.getBoundingClientRect().width > 0;
  const probe = {
    images: imgs.length,
    broken: imgs.filter((i) => !shown(i)).map((i) => i.alt),
    colorbar: imgs.filter((i) => i.classList.contains('cbar') && shown(i)).map((i) => i.getBoundingClientRect().width),
    ticks: [...document.querySelectorAll('.colorbar .ticks span')].map((s) => s.textContent),
    crops: [...document.querySelectorAll('figure.crop img')].filter(shown).map((i) => i.naturalWidth),
    charts: document.querySelectorAll('svg.hist').length,
    says_none: /\\bNone\\b/.test(document.body.innerText),
    text_chars: document.body.innerText.length,
  };
  document.body.setAttribute('data-probe', JSON.stringify(probe));
});
</script>"""


def _chromium(*args: str, profile: Path) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM is not None
    command = [CHROMIUM, "--headless", "--disable-gpu", "--no-sandbox", "--no-first-run", "--hide-scrollbars",
               "--disable-dev-shm-usage",  # containers often have a tiny /dev/shm
               f"--user-data-dir={profile}", "--virtual-time-budget=10000", *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    if done.returncode != 0:  # a browser that crashed while starting on a loaded machine: once more
        done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    return done


@pytest.fixture(scope="module")
def result(svs_slide: Path, tmp_path_factory: pytest.TempPathFactory) -> SlideResult:
    out = tmp_path_factory.mktemp("report-run")
    config = RunConfig(model="classical", scheduler=SchedulerConfig(scheduler="synchronous"))
    return run_slide(svs_slide, out, config)


def test_run_report_json_records_tissue_area_command_models_and_outputs(result: SlideResult, svs_slide: Path) -> None:
    report = json.loads(result.report.read_text())
    reader = open_slide(svs_slide)
    try:
        tissue = tissue_for_slide(reader, mpp_l0=0.5)
    finally:
        reader.close()
    assert report["tissue_area_mm2"] == pytest.approx(tissue.area_l0 * 0.25 / 1e6, rel=1e-4)
    assert 0 < report["tissue_area_mm2"] < 2048 * 1536 * 0.25 / 1e6
    assert report["command_line"] == shlex.join(sys.argv)
    assert report["models"] == [{"role": "model", "name": "classical", "version": None, "sha256": None}]
    assert {k: Path(v).name for k, v in report["outputs"].items()} == {
        "geojson": f"{svs_slide.stem}.geojson.gz", "zarr": f"{svs_slide.stem}.zarr",
        "report_json": f"{svs_slide.stem}.report.json", "report_html": f"{svs_slide.stem}.report.html",
    }
    assert all(Path(v).exists() for v in report["outputs"].values())
    page = result.report_html.read_text()
    assert f"{report['tissue_area_mm2']:,.2f} mm²" in page and f"{result.n_nuclei:,}" in page


@needs_chromium
def test_report_page_opens_offline_with_every_image_loaded(result: SlideResult, tmp_path: Path) -> None:
    probed = tmp_path / "probed.html"
    probed.write_text(result.report_html.read_text().replace("</body>", PROBE + "</body>"), encoding="utf-8")
    run = _chromium("--dump-dom", probed.as_uri(), profile=tmp_path / "profile")
    found = run.stdout.split('data-probe="')[1:2]
    assert found, f"Chromium printed no probe (exit {run.returncode}): {run.stderr[-2000:]}"
    probe: dict[str, Any] = json.loads(html.unescape(found[0].split('"', 1)[0]))
    assert probe["broken"] == [] and probe["images"] >= 7  # overview, density, colour bar, 4+ crops
    assert probe["colorbar"] and probe["colorbar"][0] > 200  # laid out across the density map
    assert probe["ticks"][0] == "0" and probe["ticks"][-1].startswith("≥ ")
    assert 4 <= len(probe["crops"]) <= 6 and min(probe["crops"]) >= 300
    assert probe["charts"] == 3 and not probe["says_none"] and probe["text_chars"] > 1000


@needs_chromium
def test_report_page_screenshot_shows_the_density_colours(result: SlideResult, tmp_path: Path) -> None:
    shot = tmp_path / "page.png"
    run = _chromium(f"--screenshot={shot}", "--window-size=1300,1600", result.report_html.as_uri(),
                    profile=tmp_path / "profile")
    assert shot.exists(), f"Chromium wrote no screenshot (exit {run.returncode}): {run.stderr[-2000:]}"
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert pixels.shape == (1600, 1300, 3)
    yellow = (np.abs(pixels - (253, 231, 37)).sum(axis=2) < 30).sum()  # the top of the colour scale
    purple = (np.abs(pixels - (68, 1, 84)).sum(axis=2) < 30).sum()  # its bottom
    assert yellow > 50 and purple > 50
