"""Greedy point non-maximum suppression (PromptNucSeg's rule), cheap to import (no torch).

Points are visited in descending score; a point still kept suppresses every other point at
Euclidean distance <= radius.  Classes are ignored.  Ties in score keep the earlier index.
"""

from __future__ import annotations

import numpy as np
from scipy.spatial import cKDTree


def point_nms(xy: np.ndarray, score: np.ndarray, radius: float) -> np.ndarray:
    """Indices (ascending, int64) of the points kept.

    xy: (N, 2) float, any frame (px); score: (N,) float; radius: px, <= 0 keeps everything.
    """
    xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    score = np.asarray(score, dtype=np.float64).reshape(-1)
    if len(xy) != len(score):
        raise ValueError(f"point_nms: {len(xy)} points but {len(score)} scores")
    n = len(xy)
    if n == 0 or radius <= 0:
        return np.arange(n, dtype=np.int64)
    # pairs within the radius (the query is padded a hair; the exact rule is applied after)
    pairs = cKDTree(xy).query_pairs(r=radius * (1 + 1e-9) + 1e-9, output_type="ndarray")
    if len(pairs):
        pairs = pairs[np.hypot(*(xy[pairs[:, 0]] - xy[pairs[:, 1]]).T) <= radius]
    kept = np.ones(n, dtype=bool)
    if len(pairs) == 0:
        return np.arange(n, dtype=np.int64)
    # symmetric adjacency in CSR form; only points with a neighbour need the greedy pass
    src = np.concatenate([pairs[:, 0], pairs[:, 1]])
    dst = np.concatenate([pairs[:, 1], pairs[:, 0]])
    sort = np.argsort(src, kind="stable")
    src, dst = src[sort], dst[sort]
    starts = np.searchsorted(src, np.arange(n + 1))
    involved = np.zeros(n, dtype=bool)
    involved[src] = True
    order = np.argsort(-score, kind="stable")
    for i in order[involved[order]]:
        if kept[i]:
            kept[dst[starts[i] : starts[i + 1]]] = False
    return np.flatnonzero(kept).astype(np.int64)
