"""The global prompt set: point NMS, negatives across tile borders, segmentor jobs."""

from __future__ import annotations

import numpy as np

from wsiseg.models.protocols import PointSet
from wsiseg.prompts import build_segmentor_jobs, nearest_negatives, point_nms
from wsiseg.tiling import plan_segmentor_tiles


def _brute_nms(xy: np.ndarray, score: np.ndarray, r: float) -> set[tuple[float, float]]:
    order = np.lexsort((xy[:, 0], xy[:, 1], -score))
    kept: list[int] = []
    for i in order:
        if all(np.hypot(*(xy[i] - xy[j])) > r for j in kept):
            kept.append(i)
    return {tuple(xy[i]) for i in kept}


def test_point_nms_matches_the_greedy_rule() -> None:
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 100, (400, 2)).astype(np.float32)
    score = rng.uniform(0, 1, 400).astype(np.float32)
    kept = point_nms(PointSet(xy, score, np.zeros(400)), 6.0)
    assert {tuple(p) for p in kept.xy} == _brute_nms(xy, score, 6.0)
    assert np.all(np.diff(kept.score) <= 0)


def test_point_nms_result_does_not_depend_on_input_order() -> None:
    rng = np.random.default_rng(1)
    xy = rng.uniform(0, 50, (200, 2)).astype(np.float32)
    score = rng.uniform(0, 1, 200).astype(np.float32)
    a = point_nms(PointSet(xy, score, np.zeros(200)), 5.0)
    perm = rng.permutation(200)
    b = point_nms(PointSet(xy[perm], score[perm], np.zeros(200)), 5.0)
    np.testing.assert_array_equal(a.xy, b.xy)


def test_negatives_are_the_k_nearest_others_within_reach() -> None:
    xy = np.array([[0, 0], [1, 0], [3, 0], [100, 0]], float)
    neg = nearest_negatives(xy, 2, max_distance_px=10)
    assert neg[0].tolist() == [1, 2]
    assert neg[1].tolist() == [0, 2]
    assert neg[3].tolist() == [-1, -1]


def test_negatives_cross_tile_borders() -> None:
    # two prompts either side of the block border at x = 176 (tile 256, halo 40)
    xy = np.array([[170.5, 100.5], [181.5, 100.5]], np.float32)
    pts = PointSet(xy, [0.9, 0.8], [0, 0])
    plan = plan_segmentor_tiles(400, 300, 256, 40)
    jobs = build_segmentor_jobs(pts, plan, k_negatives=1, context_px=20)
    assert len(jobs) == 2
    for job in jobs:
        assert job.n_owned == 1
        p = job.prompts
        assert p.labels[0].tolist() == [1, 0]
        own = p.points[0, 0] + [job.tile.x0, job.tile.y0]
        neg = p.points[0, 1] + [job.tile.x0, job.tile.y0]
        assert {tuple(own), tuple(neg)} == {tuple(xy[0]), tuple(xy[1])}
        # the neighbour is also a context prompt for overlap resolution
        assert len(job.prompt_ids) == 2


def test_every_prompt_is_owned_by_exactly_one_job() -> None:
    rng = np.random.default_rng(2)
    xy = rng.uniform(0, 1000, (2000, 2)).astype(np.float32)
    pts = PointSet(xy, rng.uniform(0, 1, 2000), np.zeros(2000))
    jobs = build_segmentor_jobs(pts, plan_segmentor_tiles(1000, 1000, 256, 48), k_negatives=3, context_px=16)
    owned = np.concatenate([j.prompt_ids[: j.n_owned] for j in jobs])
    assert sorted(owned.tolist()) == list(range(2000))
