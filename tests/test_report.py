"""Run report: atomic JSON, self-contained HTML with overlay and density images."""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from wsiseg.models.protocols import NucleusClass
from wsiseg.writers.report import density_map, render_overlay, write_report, write_report_html

CLASSES = [NucleusClass(0, "Tumor", (255, 0, 0)), NucleusClass(1, "Immune", (0, 0, 255))]


def sample_report() -> dict:
    return {
        "slide": "/data/slides/case-01.svs",
        "reader": "tiffslide",
        "mpp": np.float32(0.25),
        "counts": {"nuclei": np.int64(1234), "nuclei_touching_tile_edge": 3},
        "timings_s": {"read": 1.5, "prompter": 6.0, "segmentor": 2.5, "total": 10.0},
        "parameters": {"tile_px": 256, "note": "<script>alert(1)</script>", "out": Path("/tmp/out")},
        "warnings": ["3 nuclei reached their tile's outer edge"],
    }


def test_json_report_is_atomic_and_strict_json(tmp_path: Path) -> None:
    report = {**sample_report(), "nan_value": float("nan"), "array": np.arange(3), "shape": (2, 3)}
    path = write_report(tmp_path / "out" / "case.report.json", report)
    data = json.loads(path.read_text())  # strict: NaN would have been written as a bare token
    assert data["counts"]["nuclei"] == 1234 and data["mpp"] == pytest.approx(0.25)
    assert data["nan_value"] is None and data["array"] == [0, 1, 2] and data["shape"] == [2, 3]
    assert data["parameters"]["out"] == "/tmp/out"
    assert [p.name for p in path.parent.iterdir()] == ["case.report.json"]


def decode_images(html_text: str) -> list[Image.Image]:
    uris = re.findall(r'src="data:image/png;base64,([^"]+)"', html_text)
    return [Image.open(io.BytesIO(base64.b64decode(u))) for u in uris]


def test_html_report_is_self_contained_and_shows_the_run(tmp_path: Path) -> None:
    thumb = np.full((60, 80, 3), 230, np.uint8)
    centroids = np.array([[10.5, 10.5], [40.2, 30.7], [70.0, 50.0], [500.0, 500.0]])
    class_id = np.array([0, 1, -1, 0])
    path = write_report_html(
        tmp_path / "case.report.html", sample_report(), thumb, centroids, class_id, classes=CLASSES
    )
    text = path.read_text()
    assert "http://" not in text and "https://" not in text  # nothing fetched from elsewhere
    overlay, heat = decode_images(text)
    assert overlay.size == (80, 60)
    pixels = np.asarray(overlay.convert("RGB"))
    assert tuple(pixels[10, 10]) == (255, 0, 0) and tuple(pixels[30, 40]) == (0, 0, 255)
    assert tuple(pixels[0, 0]) == (230, 230, 230)
    assert heat.size[0] > 0
    assert "case-01.svs" in text and "1,234" in text and "Tumor" in text
    assert "&lt;script&gt;" in text and "<script>" not in text
    assert re.search(r"<th>prompter</th><td>6.00 s</td><td>60.0 %</td>", text)
    assert "outer edge" in text


def test_classes_default_to_the_report_and_pipeline_call_style_works(tmp_path: Path) -> None:
    report = {**sample_report(), "classes": [{"id": 0, "name": "Tumor", "color": [0, 255, 0]}]}
    thumb = np.zeros((20, 20, 3), np.uint8)
    path = write_report_html(tmp_path / "r.html", report, thumb, np.array([[5.0, 5.0]]), np.array([0]))
    (overlay, _) = decode_images(path.read_text())
    assert tuple(np.asarray(overlay.convert("RGB"))[5, 5]) == (0, 255, 0)


def test_density_map_counts_points_per_bin() -> None:
    pts = np.array([[1, 1], [2, 3], [9, 1], [15.9, 15.9], [-1, 3], [16, 0], [np.nan, 2]])
    grid = density_map(pts, (16, 16), bin_px=8)
    assert grid.shape == (2, 2)
    assert grid.tolist() == [[2, 1], [0, 1]]
    with pytest.raises(ValueError, match="bin_px"):
        density_map(pts, (16, 16), bin_px=0)


def test_overlay_draws_discs_and_keeps_the_thumbnail() -> None:
    thumb = np.zeros((9, 9, 3), np.uint8)
    out = render_overlay(thumb, np.array([[4.5, 4.5]]), np.array([1]), {1: (9, 8, 7)}, radius_px=1)
    assert (out.reshape(-1, 3) == (9, 8, 7)).all(axis=1).sum() == 5  # a plus-shaped radius-1 disc
    assert not thumb.any()
    with pytest.raises(ValueError, match="thumbnail_rgb"):
        render_overlay(np.zeros((4, 4, 5), np.uint8), np.zeros((0, 2)))
