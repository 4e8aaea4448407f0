"""Instance segmentation metrics of the nucleus literature: PQ (DQ, SQ), AJI, AJI+, Dice, detection F1.

Inputs are instance label images: 2-D integer arrays of equal shape, 0 = background, any
other value = one nucleus (ids need not be consecutive; any integer dtype, no negatives).
Every metric comes from one sparse contingency table of (truth id, pred id) pixel counts
over the pixels both label, so the cost is a few passes over the image whatever the
number of nuclei.

Definitions follow HoVer-Net's ``metrics/stats_utils.py`` (Graham et al. 2019), which the
PromptNucSeg evaluation uses unchanged:

* PQ = DQ x SQ (Kirillov et al. 2019): a (truth, pred) pair matches when IoU > 0.5, which
  makes matches unique; DQ = TP / (TP + FP/2 + FN/2), SQ = mean IoU of the matches
  (0 when there is none).  HoVer-Net adds 1e-6 to IoU and SQ denominators; here the
  fractions are exact (IoU > 0.5 is tested as 2 |T n P| > |T u P|), which changes
  values by less than 1e-6.
* AJI (Kumar et al. 2017, the MoNuSeg code): each truth takes the prediction of highest
  IoU among those overlapping it (a prediction may serve several truths; ties go to the
  smallest pred id); C = sum of their intersections, U = sum of their unions + the area of
  every truth with no overlap + the area of every prediction no truth took; AJI = C / U.
* AJI+ (Graham et al. 2019): as AJI, but truths and predictions are paired one-to-one by
  the assignment of largest total IoU (Hungarian, ``scipy.optimize.linear_sum_assignment``);
  unpaired truths and predictions add their areas to U.  The assignment is solved per
  connected component of the overlap graph, which gives the same optimum as HoVer-Net's
  dense matrix (ties may pair differently).
* Dice: binary Dice of the foregrounds, 2 |A n B| / (|A| + |B|).
* Detection: instance centroids (mean pixel position) are matched one-to-one within
  `radius_px` (distance <= radius, as HoVer-Net's ``pair_coordinates``): the largest number
  of pairs, then the smallest total distance (Hungarian with pairs beyond the radius
  forbidden; HoVer-Net instead assigns all points, then drops pairs beyond the radius).
  precision = TP / (TP + FP), recall = TP / (TP + FN), F1 = 2 TP / (2 TP + FP + FN).
* Classes (PanNuke, Gamper et al. 2020): the PQ of class c is PQ on the instances of class c
  alone (truths and predictions of other classes removed); mPQ of an image = NaN-mean of
  its per-class PQ (with the default `empty_truth`, the classes present in its truth);
  bPQ = PQ ignoring classes.

Empty images (`empty_truth`): PanNuke's evaluation skips an image, per class, when its
truth has no instance.  With ``empty_truth="nan"`` (default) every ratio metric of such an
image is NaN, so `mean_scores` (NaN-mean, as the papers) leaves it out.  With
``empty_truth="score"`` it counts: 1.0 on every metric when the prediction is empty as
well, 0.0 when it is not.  A non-empty truth with an empty prediction scores 0.0 on every
metric, whichever the setting.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Literal

import numpy as np

__all__ = ["EmptyTruth", "InstanceScores", "mean_scores", "score_instances"]

EmptyTruth = Literal["nan", "score"]
_RATIOS = ("pq", "dq", "sq", "aji", "aji_plus", "dice", "f1_detection", "precision", "recall")
_COUNTS = ("n_true", "n_pred", "tp", "fp", "fn", "tp_detection", "fp_detection", "fn_detection")
_DENSE_LOOKUP_MAX = 1 << 24  # ids (or id pairs) below this are counted with bincount, above with np.unique


@dataclass(frozen=True)
class InstanceScores:
    """Scores of one predicted instance label image against its truth.

    pq, dq, sq: panoptic quality and its factors (tp, fp, fn count the IoU > 0.5 matches).
    aji, aji_plus: aggregated Jaccard index, MoNuSeg and one-to-one versions.
    dice: binary foreground Dice.  f1_detection, precision, recall: centroid matching within
    radius_px (pixels); tp/fp/fn_detection its counts.  n_true, n_pred: instance counts.
    pq_per_class (class id -> PQ), mpq, bpq: only when classes were given, else None.
    Ratios are NaN where undefined (see the module docstring on empty images).
    """

    pq: float
    dq: float
    sq: float
    aji: float
    aji_plus: float
    dice: float
    f1_detection: float
    precision: float
    recall: float
    n_true: int
    n_pred: int
    tp: int
    fp: int
    fn: int
    tp_detection: int
    fp_detection: int
    fn_detection: int
    radius_px: float
    pq_per_class: dict[int, float] | None = field(default=None)
    mpq: float | None = None
    bpq: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict: NaN becomes None, class ids become string keys."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "pq_per_class":
                if value is not None:
                    out[f.name] = {str(c): _json_number(v) for c, v in value.items()}
            elif value is not None or f.name not in ("mpq", "bpq"):
                out[f.name] = _json_number(value)
        return out


def _json_number(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


@dataclass(frozen=True)
class _Overlaps:
    """Sparse contingency of two label images; instances are indexed 0..n-1 in ascending id order."""

    true_ids: np.ndarray  # (n_true,) original ids
    pred_ids: np.ndarray  # (n_pred,)
    true_area: np.ndarray  # (n_true,) int64 px
    pred_area: np.ndarray  # (n_pred,) int64 px
    pair_true: np.ndarray  # (k,) int64 index of the truth of each overlapping pair
    pair_pred: np.ndarray  # (k,) int64
    inter: np.ndarray  # (k,) int64 px
    union: np.ndarray  # (k,) int64 px
    true_centroid: np.ndarray  # (n_true, 2) float64 (row, col)
    pred_centroid: np.ndarray  # (n_pred, 2)


def _dense_labels(labels: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(dense, ids, areas): flat labels renumbered 1..n in ascending id order (0 stays 0)."""
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{name} labels must be an integer instance label image, got dtype {labels.dtype}")
    flat = labels.reshape(-1)
    if flat.size == 0:
        return np.zeros(0, np.intp), np.zeros(0, labels.dtype), np.zeros(0, np.int64)
    low, high = flat.min(), flat.max()
    if low < 0:
        raise ValueError(f"{name} labels must be >= 0 (0 = background), got a minimum of {low}")
    if high < _DENSE_LOOKUP_MAX:
        flat = flat.astype(np.intp, copy=False)
        counts = np.bincount(flat)
        ids = np.flatnonzero(counts)
        ids = ids[ids > 0]
        lookup = np.zeros(len(counts), np.intp)
        lookup[ids] = np.arange(1, len(ids) + 1)
        return lookup[flat], ids.astype(labels.dtype), counts[ids].astype(np.int64)
    values, inverse, counts = np.unique(flat, return_inverse=True, return_counts=True)
    if values[0] == 0:
        return inverse.reshape(-1).astype(np.intp), values[1:], counts[1:].astype(np.int64)
    return inverse.reshape(-1).astype(np.intp) + 1, values, counts.astype(np.int64)


def _centroids(dense: np.ndarray, n: int, shape: tuple[int, int]) -> np.ndarray:
    """(n, 2) mean (row, col) of each instance's pixels (pixel-index frame)."""
    if n == 0:
        return np.zeros((0, 2))
    pixel = np.flatnonzero(dense)
    label = dense[pixel]
    row, col = np.divmod(pixel, shape[1])
    area = np.bincount(label, minlength=n + 1)[1:]
    rows = np.bincount(label, weights=row, minlength=n + 1)[1:]
    cols = np.bincount(label, weights=col, minlength=n + 1)[1:]
    return np.stack([rows / area, cols / area], axis=1)


def _overlaps(pred: np.ndarray, truth: np.ndarray) -> _Overlaps:
    t, true_ids, true_area = _dense_labels(truth, "truth")
    p, pred_ids, pred_area = _dense_labels(pred, "pred")
    n_true, n_pred = len(true_ids), len(pred_ids)
    both = (t > 0) & (p > 0)
    key = t[both].astype(np.int64) * (n_pred + 1) + p[both]
    if (n_true + 1) * (n_pred + 1) <= _DENSE_LOOKUP_MAX:
        counts = np.bincount(key, minlength=1)
        keys = np.flatnonzero(counts)
        inter = counts[keys].astype(np.int64)
    else:
        keys, inter = np.unique(key, return_counts=True)
        inter = inter.astype(np.int64)
    pair_true = keys // (n_pred + 1) - 1
    pair_pred = keys % (n_pred + 1) - 1
    union = true_area[pair_true] + pred_area[pair_pred] - inter
    shape = (truth.shape[0], truth.shape[1])
    return _Overlaps(
        true_ids, pred_ids, true_area, pred_area, pair_true, pair_pred, inter, union,
        _centroids(t, n_true, shape), _centroids(p, n_pred, shape),
    )


def _match_sparse(
    rows: np.ndarray, cols: np.ndarray, cost: np.ndarray, n_rows: int, absent_cost: float | None
) -> np.ndarray:
    """Indices of the candidate pairs chosen by a min-cost one-to-one assignment.

    Only the k candidate pairs (rows[i], cols[i]) with cost[i] may be chosen.  Solved with
    linear_sum_assignment per connected component of the candidate graph.  absent_cost: the
    cost of a non-candidate cell (its choice is discarded); None = a cost above any set of
    candidates, so the number of chosen pairs is maximal first and the total cost minimal second.
    """
    from scipy.optimize import linear_sum_assignment
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    k = len(rows)
    if k == 0:
        return np.zeros(0, np.intp)
    n_cols = int(cols.max()) + 1
    graph = coo_matrix((np.ones(k), (rows, cols + n_rows)), shape=(n_rows + n_cols, n_rows + n_cols))
    _, component = connected_components(graph, directed=False)
    pair_component = component[rows]
    order = np.argsort(pair_component, kind="stable")
    cuts = np.flatnonzero(np.diff(pair_component[order])) + 1
    starts, ends = np.r_[0, cuts], np.r_[cuts, k]
    single = ends - starts == 1  # one truth and one prediction: they pair
    chosen = [order[starts[single]]]
    for start, end in zip(starts[~single].tolist(), ends[~single].tolist()):
        idx = order[start:end]
        row_ids, r = np.unique(rows[idx], return_inverse=True)
        col_ids, c = np.unique(cols[idx], return_inverse=True)
        fill = absent_cost
        if fill is None:
            fill = float(np.abs(cost[idx]).max()) * (min(len(row_ids), len(col_ids)) + 1) + 1.0
        matrix = np.full((len(row_ids), len(col_ids)), fill, np.float64)
        matrix[r, c] = cost[idx]
        position = np.full(matrix.shape, -1, np.intp)
        position[r, c] = idx
        ri, ci = linear_sum_assignment(matrix)
        picked = position[ri, ci]
        chosen.append(picked[picked >= 0])
    return np.sort(np.concatenate(chosen))


def _aji(ov: _Overlaps) -> float:
    """MoNuSeg AJI: each truth takes its max-IoU prediction (reuse allowed)."""
    if len(ov.inter) == 0:
        denominator = int(ov.true_area.sum() + ov.pred_area.sum())
        return 0.0 if denominator else math.nan
    iou = ov.inter / ov.union
    # pairs are sorted by truth; per truth put the highest IoU (then the smallest pred) first
    order = np.lexsort((ov.pair_pred, -iou, ov.pair_true))
    first = np.r_[True, np.diff(ov.pair_true[order]) != 0]
    best = order[first]
    used_pred = np.zeros(len(ov.pred_area), bool)
    used_pred[ov.pair_pred[best]] = True
    paired_true = np.zeros(len(ov.true_area), bool)
    paired_true[ov.pair_true[best]] = True
    c = int(ov.inter[best].sum())
    u = int(ov.union[best].sum() + ov.true_area[~paired_true].sum() + ov.pred_area[~used_pred].sum())
    return c / u


def _aji_plus(ov: _Overlaps) -> float:
    """AJI+: one-to-one pairing of largest total IoU; unpaired instances add their areas to U."""
    if len(ov.inter) == 0:
        denominator = int(ov.true_area.sum() + ov.pred_area.sum())
        return 0.0 if denominator else math.nan
    iou = ov.inter / ov.union
    best = _match_sparse(ov.pair_true, ov.pair_pred, -iou, len(ov.true_area), absent_cost=0.0)
    paired_true = np.zeros(len(ov.true_area), bool)
    paired_true[ov.pair_true[best]] = True
    paired_pred = np.zeros(len(ov.pred_area), bool)
    paired_pred[ov.pair_pred[best]] = True
    c = int(ov.inter[best].sum())
    u = int(ov.union[best].sum() + ov.true_area[~paired_true].sum() + ov.pred_area[~paired_pred].sum())
    return c / u


def _detection(ov: _Overlaps, radius_px: float) -> int:
    """Number of centroid pairs within radius_px in a maximum one-to-one matching."""
    if len(ov.true_area) == 0 or len(ov.pred_area) == 0:
        return 0
    from scipy.spatial import cKDTree

    near = cKDTree(ov.true_centroid).sparse_distance_matrix(
        cKDTree(ov.pred_centroid), radius_px, output_type="ndarray"
    )
    rows, cols, dist = near["i"].astype(np.intp), near["j"].astype(np.intp), near["v"]
    return len(_match_sparse(rows, cols, dist, len(ov.true_area), absent_cost=None))


def _pq(tp: int, fp: int, fn: int, iou_sum: float, empty_truth: EmptyTruth) -> tuple[float, float, float]:
    """(dq, sq, pq) from match counts (PQ of Kirillov et al.; SQ = 0 without matches, as HoVer-Net)."""
    if tp + fn == 0:
        value = _empty_truth_value(fp, empty_truth)
        return value, value, value
    dq = tp / (tp + 0.5 * fp + 0.5 * fn)
    sq = iou_sum / tp if tp else 0.0
    return dq, sq, dq * sq


def _empty_truth_value(n_pred: int, empty_truth: EmptyTruth) -> float:
    if empty_truth == "nan":
        return math.nan
    return 0.0 if n_pred else 1.0


def _class_of(ids: np.ndarray, classes: Mapping[int, int] | None) -> np.ndarray:
    """(n,) int64 class of each instance id; -1 when the mapping lacks it."""
    out = np.full(len(ids), -1, np.int64)
    if not classes or len(ids) == 0:
        return out
    keys = np.fromiter((int(k) for k in classes.keys()), np.int64, len(classes))
    values = np.fromiter((int(v) for v in classes.values()), np.int64, len(classes))
    order = np.argsort(keys)
    keys, values = keys[order], values[order]
    ids = ids.astype(np.int64)
    pos = np.clip(np.searchsorted(keys, ids), 0, len(keys) - 1)
    found = keys[pos] == ids
    out[found] = values[pos[found]]
    return out


def _radius(mpp: float | None, radius_um: float, radius_px: float | None) -> float:
    if radius_px is not None:
        radius = float(radius_px)
    elif mpp is not None:
        if not (math.isfinite(mpp) and mpp > 0):
            raise ValueError(f"score_instances: mpp must be a positive resolution in µm/px, got {mpp}")
        radius = float(radius_um) / float(mpp)
    else:
        raise ValueError(
            "score_instances: the detection radius needs mpp (µm per pixel, e.g. 0.25) or radius_px"
        )
    if not (math.isfinite(radius) and radius >= 0):
        raise ValueError(f"score_instances: the detection radius must be >= 0 px, got {radius}")
    return radius


def score_instances(
    pred: np.ndarray,
    truth: np.ndarray,
    *,
    mpp: float | None = None,
    radius_um: float = 3.0,
    radius_px: float | None = None,
    pred_classes: Mapping[int, int] | None = None,
    truth_classes: Mapping[int, int] | None = None,
    n_classes: int | None = None,
    empty_truth: EmptyTruth = "nan",
) -> InstanceScores:
    """Score a predicted instance label image against the truth (definitions: module docstring).

    pred, truth: (H, W) integer instance labels, 0 = background, equal shapes.
    mpp: µm per pixel, turns radius_um (detection radius, µm) into pixels; radius_px, when
    given, is used instead.  One of the two is required.
    pred_classes, truth_classes: instance id -> class id (>= 0); ids missing from a mapping
    (or mapped to a negative class) belong to no class.  Per-class PQ is reported for the
    classes 0..n_classes-1, or for every class id in the mappings when n_classes is None.
    empty_truth: "nan" (PanNuke: images, or classes, without truth are skipped) or "score".
    Raises ValueError on different shapes, non-integer or negative labels, or no radius.
    """
    pred, truth = np.asarray(pred), np.asarray(truth)
    if pred.shape != truth.shape:
        raise ValueError(f"pred shape {pred.shape} and truth shape {truth.shape} differ; score them on one grid")
    if truth.ndim != 2:
        raise ValueError(f"instance label images must be 2-D (H, W), got shape {truth.shape}")
    if empty_truth not in ("nan", "score"):
        raise ValueError(f"empty_truth must be 'nan' or 'score', got {empty_truth!r}")
    radius = _radius(mpp, radius_um, radius_px)
    ov = _overlaps(pred, truth)
    n_true, n_pred = len(ov.true_ids), len(ov.pred_ids)

    matched = 2 * ov.inter > ov.union  # IoU > 0.5: at most one match per instance
    iou_sum = float((ov.inter[matched] / ov.union[matched]).sum())
    tp = int(matched.sum())
    fp, fn = n_pred - tp, n_true - tp
    dq, sq, pq = _pq(tp, fp, fn, iou_sum, empty_truth)
    tp_d = _detection(ov, radius)
    fp_d, fn_d = n_pred - tp_d, n_true - tp_d
    true_fg, pred_fg = int(ov.true_area.sum()), int(ov.pred_area.sum())
    if n_true == 0:
        aji = aji_plus = dice = f1 = precision = recall = _empty_truth_value(n_pred, empty_truth)
    else:
        aji, aji_plus = _aji(ov), _aji_plus(ov)
        dice = 2 * int(ov.inter.sum()) / (true_fg + pred_fg)
        f1 = 2 * tp_d / (2 * tp_d + fp_d + fn_d)
        precision = tp_d / (tp_d + fp_d) if n_pred else 0.0
        recall = tp_d / (tp_d + fn_d)

    per_class: dict[int, float] | None = None
    mpq = bpq = None
    if pred_classes is not None or truth_classes is not None or n_classes is not None:
        t_cls, p_cls = _class_of(ov.true_ids, truth_classes), _class_of(ov.pred_ids, pred_classes)
        if n_classes is not None:
            class_ids = list(range(int(n_classes)))
        else:
            class_ids = sorted({int(c) for c in (*(truth_classes or {}).values(), *(pred_classes or {}).values())})
            class_ids = [c for c in class_ids if c >= 0]
        pair_t, pair_p = t_cls[ov.pair_true[matched]], p_cls[ov.pair_pred[matched]]
        pair_iou = ov.inter[matched] / ov.union[matched]
        per_class = {}
        for c in class_ids:
            same = (pair_t == c) & (pair_p == c)
            tp_c = int(same.sum())
            fp_c, fn_c = int((p_cls == c).sum()) - tp_c, int((t_cls == c).sum()) - tp_c
            per_class[c] = _pq(tp_c, fp_c, fn_c, float(pair_iou[same].sum()), empty_truth)[2]
        mpq = _nanmean(list(per_class.values()))
        bpq = pq

    return InstanceScores(
        pq=pq, dq=dq, sq=sq, aji=aji, aji_plus=aji_plus, dice=dice,
        f1_detection=f1, precision=precision, recall=recall,
        n_true=n_true, n_pred=n_pred, tp=tp, fp=fp, fn=fn,
        tp_detection=tp_d, fp_detection=fp_d, fn_detection=fn_d, radius_px=radius,
        pq_per_class=per_class, mpq=mpq, bpq=bpq,
    )  # fmt: skip


def _nanmean(values: Sequence[float | None]) -> float:
    """Mean of the finite values; NaN when there is none (no RuntimeWarning)."""
    kept = [float(v) for v in values if v is not None and not math.isnan(v)]
    return sum(kept) / len(kept) if kept else math.nan


def mean_scores(scores: Sequence[InstanceScores]) -> dict[str, float]:
    """Dataset summary: per-image scores averaged over images, as the papers report them.

    Ratios (pq, dq, sq, aji, aji_plus, dice, f1_detection, precision, recall, and mpq, bpq
    when present) are NaN-means over images: images where a ratio is NaN (no truth) are left
    out.  Per-class PQ is averaged per class over the images where it is defined and reported
    flat as ``pq_class_<id>``.  Counts (n_true, n_pred, tp, fp, fn and the detection counts)
    are summed; ``n_images`` is the number of images.  Values are floats; NaN where no image
    had a value.  Raises ValueError on an empty sequence.
    """
    if len(scores) == 0:
        raise ValueError("mean_scores needs the scores of at least one image")
    out: dict[str, float] = {"n_images": float(len(scores))}
    for name in _RATIOS:
        out[name] = _nanmean([getattr(s, name) for s in scores])
    for name in ("mpq", "bpq"):
        if any(getattr(s, name) is not None for s in scores):
            out[name] = _nanmean([getattr(s, name) for s in scores])
    class_ids = sorted({c for s in scores if s.pq_per_class for c in s.pq_per_class})
    for c in class_ids:
        out[f"pq_class_{c}"] = _nanmean([(s.pq_per_class or {}).get(c) for s in scores])
    for name in _COUNTS:
        out[name] = float(sum(getattr(s, name) for s in scores))
    return out
