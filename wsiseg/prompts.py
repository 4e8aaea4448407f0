"""The global prompt set: point NMS across tiles, ownership, and negative prompts.

All coordinates here are continuous working-frame pixels (pixels at the model's mpp,
edge frame).  The global set is small (16 bytes a point), so it lives in memory; the
per-tile jobs built from it carry only their own prompts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
from scipy.spatial import cKDTree

from wsiseg.models.protocols import PointSet, PromptBatch
from wsiseg.tiling import TilePlan, TileSpec


def canonical_order(points: PointSet) -> np.ndarray:
    """Indices sorting points by descending score, then y, then x: an order independent of tiling."""
    return np.lexsort((points.xy[:, 0], points.xy[:, 1], -points.score))


def point_nms(points: PointSet, radius_px: float) -> PointSet:
    """Greedy point NMS over the global set (the prompter's rule: by descending score, a kept
    point suppresses every other point within `radius_px`, classes ignored).  Returns the kept
    points in canonical order, so a prompt's global index does not depend on tiling."""
    from wsiseg.models.prompters.point_nms import point_nms as greedy_nms

    pts = points.take(canonical_order(points))  # ties in score then fall to canonical order
    return pts.take(greedy_nms(pts.xy, pts.score, radius_px))


def nearest_negatives(
    xy: np.ndarray, k: int, max_distance_px: float, *, ids: np.ndarray | None = None, tree: cKDTree | None = None
) -> np.ndarray:
    """For each of the points `ids` (default: all) of the (N, 2) set, the indices of its k
    nearest *other* points within `max_distance_px`, nearest first; -1 where there are fewer.
    Returns (len(ids), k) int64."""
    ids = np.arange(len(xy)) if ids is None else np.asarray(ids, np.int64)
    n = len(ids)
    if k <= 0 or n == 0:
        return np.full((n, max(k, 0)), -1, np.int64)
    tree = cKDTree(xy.astype(np.float64)) if tree is None else tree
    kk = min(k + 1, len(xy))
    dist, idx = tree.query(xy[ids], k=kk, distance_upper_bound=max_distance_px)
    idx = idx.reshape(n, kk)
    valid = (idx != len(xy)) & (idx != ids[:, None]) & np.isfinite(dist.reshape(n, kk))
    # keep the first k valid entries of each row, in order
    rank = np.cumsum(valid, axis=1) - 1
    out = np.full((n, k), -1, np.int64)
    rows, cols = np.nonzero(valid & (rank < k))
    out[rows, rank[rows, cols]] = idx[rows, cols]
    return out


@dataclass
class SegmentorJob:
    """What one segmentor tile needs: its box, its prompts (owned first), and their ids.

    prompt_ids: (P,) int64 global prompt indices; the first `n_owned` are owned by the tile,
        the rest are context prompts (owned by neighbours) decoded only to resolve overlaps.
    prompts: PromptBatch in tile pixels (positive point then k negatives per prompt).
    score, class_id: (P,) the prompter's score and class of each prompt.
    """

    tile: TileSpec
    prompt_ids: np.ndarray
    n_owned: int
    prompts: PromptBatch
    score: np.ndarray
    class_id: np.ndarray


def build_segmentor_jobs(
    points: PointSet, plan: TilePlan, *, k_negatives: int, context_px: float
) -> list[SegmentorJob]:
    """All jobs of `iter_segmentor_jobs` as a list."""
    return list(iter_segmentor_jobs(points, plan, k_negatives=k_negatives, context_px=context_px))


def count_segmentor_jobs(points: PointSet, plan: TilePlan) -> int:
    """How many segmentor tiles own at least one prompt."""
    return len(np.unique(plan.owner_of(points.xy))) if len(points) else 0


def iter_segmentor_jobs(
    points: PointSet,
    plan: TilePlan,
    *,
    k_negatives: int,
    context_px: float,
) -> Iterator[SegmentorJob]:
    """One job per segmentor tile that owns at least one prompt, in tile order, made lazily
    (a slide's jobs are never all in memory at once).

    Negatives are the k nearest other prompts of the global set within the tile's halo, so
    they cross tile borders.  Context prompts are non-owned prompts within `context_px`
    of the owned block (their masks may overlap owned nuclei).
    """
    xy = points.xy
    halo = plan.offset_px
    owner = plan.owner_of(xy)
    tree = cKDTree(xy.astype(np.float64)) if len(xy) else None
    sort = np.argsort(owner, kind="stable")
    bounds = np.searchsorted(owner[sort], np.arange(plan.count + 1))
    for t in np.flatnonzero(np.diff(bounds) > 0):
        spec = plan.tile(int(t))
        owned = sort[bounds[t] : bounds[t + 1]]
        if len(owned) == 0:
            continue
        context = _context_prompts(tree, spec, halo, context_px, owner, int(t))
        ids = np.concatenate([owned, context]).astype(np.int64)
        neg = nearest_negatives(xy, k_negatives, float(halo), ids=ids, tree=tree)  # per tile: no (N, k) table
        batch = _prompt_batch(xy, ids, neg, spec)
        yield SegmentorJob(spec, ids, len(owned), batch, points.score[ids], points.class_id[ids])


def _context_prompts(
    tree: cKDTree | None, spec: TileSpec, halo: int, context_px: float, owner: np.ndarray, t: int
) -> np.ndarray:
    if tree is None or context_px <= 0:
        return np.zeros(0, np.int64)
    bx0, by0 = spec.x0 + halo, spec.y0 + halo
    bx1, by1 = spec.x0 + spec.size - halo, spec.y0 + spec.size - halo
    reach = min(context_px, halo)
    centre = ((bx0 + bx1) / 2, (by0 + by1) / 2)
    radius = np.hypot((bx1 - bx0) / 2 + reach, (by1 - by0) / 2 + reach)
    cand = np.asarray(tree.query_ball_point(centre, radius), np.int64)
    if len(cand) == 0:
        return cand
    p = tree.data[cand]
    inside = (
        (p[:, 0] >= bx0 - reach)
        & (p[:, 0] < bx1 + reach)
        & (p[:, 1] >= by0 - reach)
        & (p[:, 1] < by1 + reach)
        & (owner[cand] != t)
    )
    return np.sort(cand[inside])


def _prompt_batch(xy: np.ndarray, ids: np.ndarray, neg: np.ndarray, spec: TileSpec) -> PromptBatch:
    """neg: (len(ids), k) global indices of each prompt's negatives, -1 for none."""
    k = neg.shape[1]
    origin = np.array([spec.x0, spec.y0], np.float64)
    pts = np.zeros((len(ids), 1 + k, 2), np.float32)
    labels = np.full((len(ids), 1 + k), -1, np.int8)
    pts[:, 0] = xy[ids] - origin
    labels[:, 0] = 1
    if k:
        nb = neg
        has = nb >= 0
        pts[:, 1:][has] = (xy[nb[has]] - origin).astype(np.float32)
        labels[:, 1:][has] = 0
    return PromptBatch(pts, labels)
