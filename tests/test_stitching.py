"""Stitching: pixel-edge polygons, the owner rule, measurements."""

from __future__ import annotations

import numpy as np
import shapely
from scipy import ndimage as ndi

from wsiseg.models.protocols import TileMasks
from wsiseg.stain import hematoxylin_od
from wsiseg.stitching import FrameTransform, stitch_tile, trace_outline


def test_traced_outline_follows_pixel_edges_exactly() -> None:
    rng = np.random.default_rng(0)
    for _ in range(300):
        m = ndi.binary_fill_holes(ndi.binary_opening(rng.random((14, 14)) < 0.6))
        lab, n = ndi.label(m)
        if n == 0:
            continue
        m = lab == 1 + int(np.argmax(ndi.sum(m, lab, range(1, n + 1))))
        ring = trace_outline(m)
        poly = shapely.Polygon(ring)
        assert poly.is_valid
        assert poly.area == m.sum()
        step = np.diff(np.vstack([ring, ring[:1]]), axis=0)
        assert ((step[:, 0] == 0) | (step[:, 1] == 0)).all()


def test_square_outline_is_its_four_corners() -> None:
    m = np.zeros((6, 6), bool)
    m[1:4, 2:5] = True
    ring = trace_outline(m)
    assert {tuple(p) for p in ring} == {(2, 1), (5, 1), (5, 4), (2, 4)}


def _disk(shape: tuple[int, int], cx: float, cy: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (xx + 0.5 - cx) ** 2 + (yy + 0.5 - cy) ** 2 <= r * r


def test_higher_iou_wins_overlapping_pixels_and_context_prompts_are_not_emitted() -> None:
    shape = (64, 64)
    a, b, c = _disk(shape, 20, 32, 10), _disk(shape, 34, 32, 10), _disk(shape, 55, 10, 5)
    masks = TileMasks.from_dense(np.stack([a, b, c]), np.array([0.9, 0.95, 0.99], np.float32))
    table = stitch_tile(
        tile_origin_px=(100, 200),
        tile_shape=shape,
        masks=masks,
        n_owned=2,
        prompt_ids=np.array([5, 6, 7]),
        prompt_score=np.array([0.5, 0.6, 0.7], np.float32),
        prompt_class=np.array([0, 1, 0]),
        image=np.full((*shape, 3), (90, 60, 150), np.uint8),
        transform=FrameTransform(scale=2.0, mpp=0.5),
    )
    assert len(table) == 2
    polys = table.polygons()
    # b (iou .95) keeps its whole disk; a loses the shared pixels
    assert polys[1].area == b.sum() * 4
    assert polys[0].area == (a & ~b).sum() * 4
    assert not polys[0].intersection(polys[1]).area
    # level-0 = (tile origin + px) * scale
    assert polys[1].bounds[0] == (100 + np.flatnonzero(b.any(0))[0]) * 2
    np.testing.assert_allclose(table.measurements["area_um2"], [(a & ~b).sum() * 0.25, b.sum() * 0.25])
    assert table.class_id.tolist() == [0, 1]
    np.testing.assert_allclose(table.measurements["score"], [0.5, 0.6])
    expected_od = hematoxylin_od(np.full((1, 1, 3), (90, 60, 150), np.uint8))[0, 0]
    assert table.measurements["hematoxylin_od_mean"].tolist() == [expected_od, expected_od]


def test_disk_measurements_are_those_of_a_disk() -> None:
    shape = (80, 80)
    m = _disk(shape, 40, 40, 15)
    table = stitch_tile(
        tile_origin_px=(0, 0), tile_shape=shape, masks=TileMasks.from_dense(m[None], np.ones(1)),
        n_owned=1, prompt_ids=np.array([0]), prompt_score=np.ones(1, np.float32), prompt_class=np.array([-1]),
        image=np.zeros((*shape, 3), np.uint8), transform=FrameTransform(1.0, 1.0),
    )
    meas = {k: float(v[0]) for k, v in table.measurements.items()}
    assert abs(meas["major_axis_um"] - 30) < 1.5 and abs(meas["minor_axis_um"] - 30) < 1.5
    assert meas["eccentricity"] < 0.2
    assert 0.95 < meas["solidity"] <= 1.0
    assert table.touches_edge.tolist() == [False]


def test_mask_reaching_the_tile_edge_is_kept_and_flagged() -> None:
    shape = (32, 32)
    m = _disk(shape, 3, 16, 6)
    table = stitch_tile(
        tile_origin_px=(0, 0), tile_shape=shape, masks=TileMasks.from_dense(m[None], np.ones(1)),
        n_owned=1, prompt_ids=np.array([0]), prompt_score=np.ones(1, np.float32), prompt_class=np.array([0]),
        image=np.zeros((*shape, 3), np.uint8), transform=FrameTransform(1.0, 1.0),
    )
    assert table.touches_edge.tolist() == [True]
    assert table.area_px[0] == m.sum()


def test_holes_are_filled_unless_another_nucleus_won_them() -> None:
    shape = (40, 40)
    ring = _disk(shape, 20, 20, 12) & ~_disk(shape, 20, 20, 4)
    inner = _disk(shape, 20, 20, 3)
    for with_inner in (False, True):
        masks = [ring, inner] if with_inner else [ring]
        table = stitch_tile(
            tile_origin_px=(0, 0), tile_shape=shape,
            masks=TileMasks.from_dense(np.stack(masks), np.array([0.5, 0.9][: len(masks)], np.float32)),
            n_owned=1, prompt_ids=np.arange(len(masks)), prompt_score=np.ones(len(masks), np.float32),
            prompt_class=np.zeros(len(masks)), image=np.zeros((*shape, 3), np.uint8),
            transform=FrameTransform(1.0, 1.0),
        )
        assert len(table) == 1
        assert table.polygons()[0].area == _disk(shape, 20, 20, 12).sum()


def _stitch_all(shape: tuple[int, int], masks: list[np.ndarray], iou: list[float], n_owned: int, **kw) -> object:
    n = len(masks)
    return stitch_tile(
        tile_origin_px=(0, 0), tile_shape=shape,
        masks=TileMasks.from_dense(np.stack(masks), np.array(iou, np.float32)),
        n_owned=n_owned, prompt_ids=np.arange(n), prompt_score=np.ones(n, np.float32),
        prompt_class=np.zeros(n), image=np.zeros((*shape, 3), np.uint8),
        transform=kw.get("transform", FrameTransform(1.0, 1.0)),
    )


def test_a_nucleus_inside_another_merges_into_it_and_polygons_never_overlap() -> None:
    shape = (40, 40)
    outer = _disk(shape, 20, 20, 12)
    nucleolus = _disk(shape, 21, 19, 3)  # its own prompt, higher predicted IoU: it wins its pixels
    table = _stitch_all(shape, [outer, nucleolus], [0.5, 0.9], n_owned=2)
    assert len(table) == 1
    assert table.polygons()[0].area == outer.sum()
    # the tile that owns only the nucleolus (the outer nucleus is its context) emits nothing
    alone = _stitch_all(shape, [nucleolus, outer], [0.9, 0.5], n_owned=1)
    assert len(alone) == 0


def test_a_nucleus_in_a_hole_beside_background_still_merges() -> None:
    shape = (40, 40)
    ring = _disk(shape, 20, 20, 12) & ~_disk(shape, 20, 20, 6)
    inner = _disk(shape, 20, 20, 2)  # background between it and the ring
    table = _stitch_all(shape, [ring, inner], [0.5, 0.9], n_owned=2)
    assert len(table) == 1 and table.polygons()[0].area == _disk(shape, 20, 20, 12).sum()


def test_touching_nuclei_side_by_side_stay_two() -> None:
    shape = (40, 60)
    a, b = _disk(shape, 20, 18, 9), _disk(shape, 20, 36, 9)
    table = _stitch_all(shape, [a, b], [0.9, 0.8], n_owned=2)
    assert len(table) == 2
    polys = table.polygons()
    assert polys[0].intersection(polys[1]).area == 0


def test_level0_polygons_are_clipped_to_the_slide() -> None:
    # working pixels of 2 level-0 px on a 61 px wide, 41 px high slide: the last column and row
    # of working pixels reach past it (x = 62, y = 42 before clipping)
    shape = (21, 31)
    m = _disk(shape, 28, 15, 6)
    table = _stitch_all(shape, [m], [0.9], n_owned=1, transform=FrameTransform(2.0, 0.5, clip_l0=(0, 0, 61, 41)))
    poly = table.polygons()[0]
    assert poly.bounds[2] == 61 and poly.bounds[3] == 41
    assert poly.is_valid and poly.geom_type == "Polygon"
    np.testing.assert_allclose(table.measurements["area_um2"], poly.area * 0.25 * 0.25)


def test_a_mask_box_outside_the_tile_is_refused_before_painting() -> None:
    import pytest

    from wsiseg.stitching import TileInput, batch_outlines

    def outlines(box: list[int], mask: np.ndarray, n_tiles: int = 1) -> object:
        ok = TileMasks(np.array([[2, 2, 6, 6]]), [np.ones((4, 4), bool)], np.ones(1))
        tile = TileMasks(np.array([box]), [mask], np.ones(1))
        ids, score, cls = np.zeros(1, np.int64), np.ones(1, np.float32), np.zeros(1, np.int16)
        tiles = [TileInput((0, 0), ok, 1, ids, score, cls)] * (n_tiles - 1) + [TileInput((0, 0), tile, 1, ids, score, cls)]
        return batch_outlines(tiles, np.zeros((n_tiles, 8, 8, 3), np.uint8))

    assert outlines([2, 2, 6, 6], np.ones((4, 4), bool)).values[0, 0] == 16
    for box, mask in (([5, 5, 10, 10], np.ones((5, 5), bool)), ([0, 0, 4, 4], np.ones((3, 3), bool))):
        for n_tiles in (1, 3):  # the mask's index in its own tile, wherever the tile is in the batch
            with pytest.raises(ValueError, match="segmentor mask 0"):
                outlines(box, mask, n_tiles)


def _one_tile_reference(tile: object, image: np.ndarray, image_size: tuple[int, int], min_area: int) -> list:
    """A tile's owned nuclei the way they were found one tile at a time, with the kernels
    called one by one: (corners, values, touches, score, iou, class) per nucleus."""
    from wsiseg import stitch_kernels as kernels
    from wsiseg.stain import hematoxylin_tables

    h, w = image.shape[:2]
    masks = tile.masks
    canvas = np.zeros((h, w), np.int32)
    order = np.lexsort((-np.asarray(tile.prompt_ids), masks.iou))
    priority = np.empty(len(order), np.int64)
    priority[order] = np.arange(len(order))
    box = masks.bbox_px.astype(np.int64)
    used = (box[:, 2] > box[:, 0]) & (box[:, 3] > box[:, 1])
    sizes = np.where(used, np.array([m.size for m in masks.masks], np.int64), 0)
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    flat = np.concatenate([m.ravel() for m, u in zip(masks.masks, used) if u] or [np.zeros(0, bool)])
    kernels.paint_masks(canvas, masks.bbox_px, flat, offsets, np.argsort(priority, kind="stable"))
    ox, oy = tile.origin_px
    canvas[:, : max(0, -ox)] = 0
    canvas[: max(0, -oy)] = 0
    canvas[:, max(0, image_size[0] - ox) :] = 0
    canvas[max(0, image_size[1] - oy) :] = 0
    kernels.absorb_enclosed(canvas, masks.bbox_px)
    idx, ends, corners, values = kernels.owned_nuclei(
        canvas, masks.bbox_px, tile.n_owned, image, hematoxylin_tables(), float(min_area)
    )
    out = []
    for k, i in enumerate(idx):
        ring = corners[(ends[k - 1] if k else 0) : ends[k]] + box[i, :2] + [ox, oy]
        edge = box[i, 0] == 0 or box[i, 1] == 0 or box[i, 2] == w or box[i, 3] == h
        out.append((ring, values[k], edge, tile.prompt_score[i], masks.iou[i], tile.prompt_class[i]))
    return out


def test_a_batch_of_tiles_gives_the_nuclei_of_each_tile_stitched_alone_bit_for_bit() -> None:
    from wsiseg.stitching import TileInput, batch_outlines

    rng = np.random.default_rng(3)
    shape, image_size = (48, 48), (150, 110)
    for trial in range(25):
        tiles, images = [], rng.integers(0, 256, (5, *shape, 3), dtype=np.uint8)
        for t in range(5):
            n = int(rng.integers(0, 14))
            dense = np.stack([_disk(shape, *rng.uniform(0, 48, 2), rng.uniform(1, 9)) for _ in range(n)] or
                             [np.zeros(shape, bool)])[:n]
            dense &= rng.random(dense.shape) < 0.93  # ragged masks: holes, several parts, corner contacts
            iou = rng.choice([0.5, 0.7, 0.9], n).astype(np.float32)  # ties: the lower prompt id wins
            origin = (int(rng.integers(-20, 140)), int(rng.integers(-20, 100)))  # some tiles cross the image edge
            ids = rng.permutation(100)[:n]
            tiles.append(TileInput(origin, TileMasks.from_dense(dense, iou), int(rng.integers(0, n + 1)), ids,
                                   rng.random(n).astype(np.float32), rng.integers(-1, 3, n).astype(np.int16)))
        got = batch_outlines(tiles, images, min_area_px=3, image_size_px=image_size)
        want = [row for tile, image in zip(tiles, images) for row in _one_tile_reference(tile, image, image_size, 3)]
        if not want:
            assert got is None
            continue
        assert got is not None and len(got.values) == len(want), trial
        starts = np.concatenate([[0], got.ends[:-1]])
        for k, (ring, values, edge, score, iou, cls) in enumerate(want):
            np.testing.assert_array_equal(got.corners[starts[k] : got.ends[k]], ring)
            assert got.values[k].tobytes() == values.tobytes()
            assert (got.touches[k], got.score[k], got.iou[k], got.class_id[k]) == (edge, score, iou, cls)


def test_unclipped_table_holds_what_shapely_reads_back_from_its_polygons() -> None:
    from wsiseg.nuclei import NucleusTable

    shape = (64, 64)
    rng = np.random.default_rng(5)
    dense = np.stack([_disk(shape, *rng.uniform(8, 56, 2), rng.uniform(3, 8)) for _ in range(12)])
    dense &= rng.random(dense.shape) < 0.95
    for scale, clip in ((1.0, None), ((1.37, 0.91), None), (0.5, (0.0, 0.0, 1e6, 1e6))):
        table = _stitch_all(shape, list(dense), list(rng.random(12)), n_owned=12,
                            transform=FrameTransform(scale, 0.5, clip_l0=clip))
        assert len(table) > 5
        again = NucleusTable.from_polygons(table.polygons(), table.class_id, table.measurements, table.touches_edge)
        for name in ("coords", "ring_offsets", "geom_offsets", "centroid_l0", "bbox_l0", "area_px"):
            got, want = getattr(table, name), getattr(again, name)
            assert got.dtype == want.dtype and got.tobytes() == want.tobytes(), name
