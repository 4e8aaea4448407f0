"""Shared fixtures: small synthetic slides with known nuclei, written once per test session.

Slides (Path), their truth (SyntheticTruth, level-0 px of that slide) and spec
(svs_spec, tiff_spec, png_spec, no_mpp_spec: SyntheticSpec):
  svs_slide / svs_truth        2048x1536 Aperio-style SVS, 0.5 mpp (20x), levels 1/4/16, JPEG
  tiff_slide / tiff_truth      1536x1024 generic tiled TIFF, 0.25 mpp (40x), levels 1/4, deflate
  png_image / png_truth        768x512 PNG, no mpp in the file (spec 0.5 mpp), all tissue
  no_mpp_tiff / no_mpp_truth   512x384 tiled TIFF without resolution tags
  truncated_slide              svs_slide cut at 60 % of its bytes
  text_as_svs                  a text file named .svs
make_slide(spec, kind, **options) writes any other slide ("svs", "tiff" or "png") and
returns (path, truth), cached per arguments.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from wsiseg.synthetic import (
    SyntheticSpec,
    SyntheticTruth,
    make_nuclei,
    write_generic_tiff,
    write_png,
    write_svs_like,
)

SVS_SPEC = SyntheticSpec(2048, 1536, mpp=0.5, seed=1, touching_fraction=0.1)
TIFF_SPEC = SyntheticSpec(1536, 1024, mpp=0.25, seed=2, tissue_fraction=0.7)
PNG_SPEC = SyntheticSpec(768, 512, mpp=0.5, seed=3, tissue_fraction=1.0)
NO_MPP_SPEC = SyntheticSpec(512, 384, mpp=0.5, seed=4)

_WRITERS = {"svs": (write_svs_like, ".svs"), "tiff": (write_generic_tiff, ".tif"), "png": (write_png, ".png")}


@pytest.fixture(scope="session")
def slide_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("slides")


@pytest.fixture(scope="session")
def make_slide(slide_dir: Path) -> Callable[..., tuple[Path, SyntheticTruth]]:
    """make_slide(spec, kind="svs", **writer_options) -> (path, truth), written once."""
    cache: dict[Any, tuple[Path, SyntheticTruth]] = {}

    def make(spec: SyntheticSpec, kind: str = "svs", **options: Any) -> tuple[Path, SyntheticTruth]:
        key = (spec, kind, tuple(sorted(options.items())))
        if key not in cache:
            writer, suffix = _WRITERS[kind]
            path = slide_dir / f"slide{len(cache)}-{kind}{suffix}"
            cache[key] = (path, writer(path, spec, **options))
        return cache[key]

    return make


@pytest.fixture(scope="session")
def svs_spec() -> SyntheticSpec:
    return SVS_SPEC


@pytest.fixture(scope="session")
def tiff_spec() -> SyntheticSpec:
    return TIFF_SPEC


@pytest.fixture(scope="session")
def png_spec() -> SyntheticSpec:
    return PNG_SPEC


@pytest.fixture(scope="session")
def no_mpp_spec() -> SyntheticSpec:
    return NO_MPP_SPEC


@pytest.fixture(scope="session")
def svs_truth() -> SyntheticTruth:
    return make_nuclei(SVS_SPEC)


@pytest.fixture(scope="session")
def svs_slide(slide_dir: Path, svs_truth: SyntheticTruth) -> Path:
    path = slide_dir / "synthetic.svs"
    write_svs_like(path, SVS_SPEC, svs_truth, levels=(1, 4, 16), compression="jpeg")
    return path


@pytest.fixture(scope="session")
def tiff_truth() -> SyntheticTruth:
    return make_nuclei(TIFF_SPEC)


@pytest.fixture(scope="session")
def tiff_slide(slide_dir: Path, tiff_truth: SyntheticTruth) -> Path:
    path = slide_dir / "synthetic.tif"
    write_generic_tiff(path, TIFF_SPEC, tiff_truth, levels=(1, 4), compression="deflate")
    return path


@pytest.fixture(scope="session")
def png_truth() -> SyntheticTruth:
    return make_nuclei(PNG_SPEC)


@pytest.fixture(scope="session")
def png_image(slide_dir: Path, png_truth: SyntheticTruth) -> Path:
    path = slide_dir / "synthetic.png"
    write_png(path, PNG_SPEC, png_truth)
    return path


@pytest.fixture(scope="session")
def no_mpp_truth() -> SyntheticTruth:
    return make_nuclei(NO_MPP_SPEC)


@pytest.fixture(scope="session")
def no_mpp_tiff(slide_dir: Path, no_mpp_truth: SyntheticTruth) -> Path:
    path = slide_dir / "no-mpp.tif"
    write_generic_tiff(path, NO_MPP_SPEC, no_mpp_truth, mpp=None, pyramid=False)
    return path


@pytest.fixture(scope="session")
def truncated_slide(slide_dir: Path, svs_slide: Path) -> Path:
    path = slide_dir / "truncated.svs"
    data = svs_slide.read_bytes()
    path.write_bytes(data[: int(len(data) * 0.6)])
    return path


@pytest.fixture(scope="session")
def text_as_svs(slide_dir: Path) -> Path:
    path = slide_dir / "notes.svs"
    path.write_text("this is a text file, not a slide\n")
    return path
