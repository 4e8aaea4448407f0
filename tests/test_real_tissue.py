"""The weight-free model on a real stained tissue image (scikit-image ships it: an IHC
section whose nuclei are haematoxylin-counterstained), not only on synthetic slides."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from wsiseg.pipeline import RunConfig, run_slide
from wsiseg.scheduling import SchedulerConfig
from wsiseg.writers.zarr_store import open_nuclei


@pytest.fixture(scope="module")
def ihc_png(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from skimage import data

    path = tmp_path_factory.mktemp("real") / "ihc.png"
    Image.fromarray(data.immunohistochemistry()).save(path)
    return path


def test_classical_model_finds_plausible_nuclei_in_real_tissue(ihc_png: Path, tmp_path: Path) -> None:
    result = run_slide(
        ihc_png, tmp_path,
        RunConfig(model="classical", mpp=0.5, tissue_detection=False, scheduler=SchedulerConfig(scheduler="synchronous")),
    )
    store = open_nuclei(result.zarr)
    table = store.table()
    assert store.count > 150  # the stroma alone holds well over a hundred nuclei
    area = table.measurements["area_um2"]
    assert 8 < np.median(area) < 80  # nucleus-sized, in µm² at the given 0.5 µm/px
    # nuclei are darker in haematoxylin than the tissue around them
    from wsiseg.stain import hematoxylin_od

    od = hematoxylin_od(np.asarray(Image.open(ihc_png).convert("RGB")))
    assert np.median(table.measurements["hematoxylin_od_mean"]) > np.median(od) + 0.05


def test_tile_size_does_not_change_nuclei_when_tissue_reaches_the_image_edge(ihc_png: Path, tmp_path: Path) -> None:
    import shapely

    sets = []
    for tile in (256, 1024):
        result = run_slide(
            ihc_png, tmp_path / str(tile),
            RunConfig(model="classical", mpp=0.5, tissue_detection=False, tile_size_px=tile,
                      scheduler=SchedulerConfig(scheduler="synchronous")),
        )
        polys = open_nuclei(result.zarr).table().polygons()
        # nothing lies outside the image, although tiles read mirrored content beyond it
        assert shapely.total_bounds(polys)[2] <= 512 and shapely.total_bounds(polys)[0] >= 0
        sets.append({shapely.to_wkb(shapely.normalize(p)) for p in polys})
    assert sets[0] == sets[1]
