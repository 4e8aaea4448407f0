"""Tile plans: coverage, ownership exactly once, and the halo guarantee."""

from __future__ import annotations

import numpy as np
import pytest

from wsiseg.tiling import plan_prompter_tiles, plan_segmentor_tiles


@pytest.mark.parametrize("size,tile,overlap", [(1000, 256, 64), (256, 256, 64), (100, 256, 64), (2050, 512, 128)])
def test_prompter_cores_partition_the_image(size: int, tile: int, overlap: int) -> None:
    plan = plan_prompter_tiles(size, size + 7, tile, overlap)
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, [size, size + 7], (5000, 2))
    owners = np.stack([plan.tile(i).owns(xy) for i in range(plan.count)])
    assert (owners.sum(axis=0) == 1).all()
    assert (np.argmax(owners, axis=0) == plan.owner_of(xy)).all()


def test_prompter_tiles_cover_image_and_keep_points_away_from_inner_edges() -> None:
    size, tile, overlap = 1000, 256, 64
    plan = plan_prompter_tiles(size, size, tile, overlap)
    h = overlap // 2
    first, last = plan.tile(0), plan.tile(plan.count - 1)
    # the image's own edges lie h px inside the tiles: beyond them the tiles read white
    assert first.x0 <= -h and first.y0 <= -h
    assert last.x0 + last.size >= size + h and last.y0 + last.size >= size + h
    for i in range(plan.count):
        t = plan.tile(i)
        # an owned point is >= h px from every tile edge that lies inside the image
        if np.isfinite(t.own_x0):
            assert t.own_x0 - t.x0 >= h
        if np.isfinite(t.own_x1):
            assert t.x0 + t.size - t.own_x1 >= h


def test_segmentor_blocks_own_each_prompt_once_and_halo_surrounds_it() -> None:
    plan = plan_segmentor_tiles(900, 700, 256, 40)
    rng = np.random.default_rng(1)
    xy = rng.uniform(0, [900, 700], (3000, 2))
    owner = plan.owner_of(xy)
    for i in np.unique(owner):
        t = plan.tile(int(i))
        pts = xy[owner == i]
        assert t.owns(pts).all()
        assert (pts[:, 0] - t.x0 >= 40).all() and (t.x0 + t.size - pts[:, 0] >= 40).all()
        assert (pts[:, 1] - t.y0 >= 40).all() and (t.y0 + t.size - pts[:, 1] >= 40).all()


def test_bad_tile_parameters_are_refused_with_the_option_name() -> None:
    with pytest.raises(ValueError, match="--overlap"):
        plan_prompter_tiles(100, 100, 256, 256)
    with pytest.raises(ValueError, match="--tile-size"):
        plan_segmentor_tiles(100, 100, 64, 40)
