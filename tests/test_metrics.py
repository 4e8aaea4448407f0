"""Instance metrics: PQ, AJI, AJI+, Dice and detection F1 on small cases worked out by hand."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from wsiseg.metrics import InstanceScores, mean_scores, score_instances

RATIOS = ("pq", "dq", "sq", "aji", "aji_plus", "dice", "f1_detection", "precision", "recall")


def paint(shape: tuple[int, int], *boxes: tuple[int, int, int, int, int], dtype: type = np.int32) -> np.ndarray:
    """Label image with boxes (id, row0, row1, col0, col1), half-open, painted in order."""
    labels = np.zeros(shape, dtype)
    for label, r0, r1, c0, c1 in boxes:
        labels[r0:r1, c0:c1] = label
    return labels


def ratios(s: InstanceScores) -> dict[str, float]:
    return {k: getattr(s, k) for k in RATIOS}


def test_perfect_prediction_scores_one_everywhere() -> None:
    truth = paint((12, 16), (5, 0, 4, 0, 4), (9, 6, 10, 6, 10), (300, 0, 3, 10, 14), dtype=np.uint16)
    pred = paint((12, 16), (1, 0, 4, 0, 4), (2, 6, 10, 6, 10), (3, 0, 3, 10, 14), dtype=np.int64)
    s = score_instances(pred, truth, radius_px=3)
    assert ratios(s) == {k: 1.0 for k in RATIOS}
    assert (s.n_true, s.n_pred, s.tp, s.fp, s.fn) == (3, 3, 3, 0, 0)
    assert (s.tp_detection, s.fp_detection, s.fn_detection) == (3, 0, 0)


def test_empty_prediction_scores_zero() -> None:
    truth = paint((10, 10), (1, 0, 4, 0, 4), (2, 5, 9, 5, 9))
    s = score_instances(np.zeros_like(truth), truth, radius_px=3)
    assert ratios(s) == {k: 0.0 for k in RATIOS}
    assert (s.n_true, s.n_pred, s.tp, s.fp, s.fn) == (2, 0, 0, 0, 2)


def test_empty_truth_is_skipped_as_nan_unless_asked_to_score_it() -> None:
    empty = np.zeros((10, 10), np.int32)
    pred = paint((10, 10), (7, 0, 4, 0, 4))
    s = score_instances(pred, empty, radius_px=3)
    assert all(math.isnan(v) for v in ratios(s).values())
    assert (s.n_true, s.n_pred, s.fp, s.fp_detection) == (0, 1, 1, 1)
    assert s.to_dict()["pq"] is None  # JSON-ready: NaN -> null
    # "score": predictions on an empty truth are all wrong ...
    assert ratios(score_instances(pred, empty, radius_px=3, empty_truth="score")) == {k: 0.0 for k in RATIOS}
    # ... and an empty prediction of an empty truth is perfect
    assert ratios(score_instances(empty, empty, radius_px=3, empty_truth="score")) == {k: 1.0 for k in RATIOS}
    assert all(math.isnan(v) for v in ratios(score_instances(empty, empty, radius_px=3)).values())


def test_truth_split_into_two_predictions() -> None:
    truth = paint((6, 8), (1, 0, 4, 0, 4))  # 16 px
    pred = paint((6, 8), (1, 0, 4, 0, 3), (2, 0, 4, 3, 4))  # 12 px + 4 px
    s = score_instances(pred, truth, radius_px=3)
    # IoU(t, p1) = 12/16 = 0.75 (match), IoU(t, p2) = 4/16 = 0.25
    # PQ: TP 1, FP 1, FN 0 -> DQ = 1 / 1.5 = 2/3, SQ = 0.75, PQ = 0.5
    assert (s.tp, s.fp, s.fn) == (1, 1, 0)
    assert s.dq == pytest.approx(2 / 3) and s.sq == pytest.approx(0.75) and s.pq == pytest.approx(0.5)
    # AJI and AJI+: t pairs p1, C = 12, U = 16 + unused p2 (4) = 20 -> 0.6
    assert s.aji == pytest.approx(0.6) and s.aji_plus == pytest.approx(0.6)
    assert s.dice == pytest.approx(1.0)  # 2 * 16 / (16 + 16)


def test_two_truths_merged_into_one_prediction() -> None:
    truth = paint((6, 8), (1, 0, 4, 0, 4), (2, 0, 4, 4, 5))  # 16 px, 4 px
    pred = paint((6, 8), (1, 0, 4, 0, 5))  # 20 px
    s = score_instances(pred, truth, radius_px=3)
    # IoU(t1, p) = 16/20 = 0.8 (match), IoU(t2, p) = 4/20 = 0.2
    # PQ: TP 1, FP 0, FN 1 -> DQ = 2/3, SQ = 0.8, PQ = 8/15
    assert (s.tp, s.fp, s.fn) == (1, 0, 1)
    assert s.pq == pytest.approx(8 / 15)
    # AJI (p reused): C = 16 + 4 = 20, U = 20 + 20 = 40 -> 0.5
    assert s.aji == pytest.approx(0.5)
    # AJI+ (one-to-one): t1-p, C = 16, U = 20 + unpaired t2 (4) = 24 -> 2/3
    assert s.aji_plus == pytest.approx(2 / 3)
    assert s.dice == pytest.approx(1.0)


def test_aji_plus_pairs_for_the_largest_total_iou_and_iou_of_one_half_is_no_match() -> None:
    # two rows tall strips: t1 cols 0-5 (12 px), t2 cols 6-9 (8 px); p1 cols 2-9 (16 px), p2 cols 0-1 (4 px)
    truth = paint((2, 10), (1, 0, 2, 0, 6), (2, 0, 2, 6, 10))
    pred = paint((2, 10), (1, 0, 2, 2, 10), (2, 0, 2, 0, 2))
    s = score_instances(pred, truth, radius_px=1)
    # IoU: t1-p1 = 8/20 = 0.4, t1-p2 = 4/12 = 1/3, t2-p1 = 8/16 = 0.5 (not > 0.5: no PQ match)
    assert (s.tp, s.fp, s.fn) == (0, 2, 2) and s.pq == 0.0 and s.dq == 0.0
    # AJI: t1 -> p1 (C 8, U 20), t2 -> p1 (C 8, U 16), unused p2 adds 4: 16 / 40 = 0.4
    assert s.aji == pytest.approx(0.4)
    # AJI+: {t1-p2, t2-p1} (IoU sum 0.83) beats {t1-p1} (0.4): C = 4 + 8, U = 12 + 16 -> 3/7
    assert s.aji_plus == pytest.approx(3 / 7)
    assert s.dice == pytest.approx(1.0)


def test_large_and_non_consecutive_ids_give_the_same_scores() -> None:
    truth = paint((6, 8), (1, 0, 4, 0, 4), (2, 0, 4, 4, 5), dtype=np.int32)
    pred = paint((6, 8), (1, 0, 4, 0, 5), dtype=np.int32)
    big_truth = np.where(truth > 0, truth.astype(np.uint64) * 2**40 + 3, 0).astype(np.uint64)
    big_pred = np.where(pred > 0, 2**50 + 17, 0).astype(np.uint64)
    assert score_instances(big_pred, big_truth, radius_px=3) == score_instances(pred, truth, radius_px=3)


def test_detection_radius_is_inclusive() -> None:
    truth = paint((11, 11), (1, 5, 6, 5, 6))  # one pixel at row 5, col 5
    pred = paint((11, 11), (4, 5, 6, 8, 9))  # one pixel at row 5, col 8: 3 px away
    at = score_instances(pred, truth, radius_px=3.0)
    assert (at.tp_detection, at.precision, at.recall, at.f1_detection) == (1, 1.0, 1.0, 1.0)
    short = score_instances(pred, truth, radius_px=2.99)
    assert (short.tp_detection, short.fp_detection, short.fn_detection, short.f1_detection) == (0, 1, 1, 0.0)
    # radius_um / mpp: 1.5 um at 0.5 um/px = 3 px (in), 1.4 um = 2.8 px (out)
    assert score_instances(pred, truth, mpp=0.5, radius_um=1.5).tp_detection == 1
    assert score_instances(pred, truth, mpp=0.5, radius_um=1.4).tp_detection == 0
    assert score_instances(pred, truth, mpp=0.25).radius_px == 12.0  # default 3 um


def test_detection_matches_as_many_pairs_as_the_radius_allows() -> None:
    # truths at cols 0 and 3, predictions at cols 2 and 5, radius 2: pairs A-P (2), B-P (1), B-Q (2).
    # Taking the closest pair B-P first would leave A alone; the one-to-one matching finds A-P, B-Q.
    truth = paint((1, 8), (1, 0, 1, 0, 1), (2, 0, 1, 3, 4))
    pred = paint((1, 8), (1, 0, 1, 2, 3), (2, 0, 1, 5, 6))
    s = score_instances(pred, truth, radius_px=2)
    assert (s.tp_detection, s.fp_detection, s.fn_detection) == (2, 0, 0)


def test_per_class_pq_counts_only_the_instances_of_that_class() -> None:
    truth = paint((6, 12), (1, 0, 4, 0, 4), (2, 0, 4, 6, 10))
    pred = paint((6, 12), (10, 0, 4, 0, 4), (20, 0, 4, 6, 10))
    truth_classes, pred_classes = {1: 0, 2: 1}, {10: 0, 20: 0}  # p20 segments t2 right but calls it class 0
    s = score_instances(pred, truth, radius_px=3, truth_classes=truth_classes, pred_classes=pred_classes, n_classes=3)
    # class 0: truth {t1}, pred {p10, p20}: TP 1, FP 1 -> DQ 2/3, SQ 1 -> PQ 2/3
    # class 1: truth {t2}, pred {}: FN 1 -> PQ 0;  class 2: no truth -> skipped (NaN)
    assert s.pq_per_class is not None
    assert s.pq_per_class[0] == pytest.approx(2 / 3) and s.pq_per_class[1] == 0.0 and math.isnan(s.pq_per_class[2])
    assert s.mpq == pytest.approx(1 / 3)  # mean of 2/3 and 0
    assert s.bpq == 1.0 and s.pq == 1.0  # binary PQ ignores classes
    d = s.to_dict()
    assert d["pq_per_class"]["2"] is None and d["mpq"] == pytest.approx(1 / 3)
    # with empty_truth="score", class 2 (nothing true, nothing predicted) counts as 1.0: (2/3 + 0 + 1) / 3
    scored = score_instances(pred, truth, radius_px=3, truth_classes=truth_classes, pred_classes=pred_classes,
                             n_classes=3, empty_truth="score")
    assert scored.mpq == pytest.approx(5 / 9)
    # a prediction without a class belongs to no class: class 0 then has TP 1 and nothing else
    partial = score_instances(pred, truth, radius_px=3, truth_classes=truth_classes, pred_classes={10: 0})
    assert partial.pq_per_class == {0: 1.0, 1: 0.0}
    assert score_instances(pred, truth, radius_px=3).pq_per_class is None


def random_labels(rng: np.random.Generator, shape: tuple[int, int], n: int) -> np.ndarray:
    labels = np.zeros(shape, np.int32)
    for i in range(1, n + 1):
        r, c = rng.integers(0, shape[0] - 2), rng.integers(0, shape[1] - 2)
        h, w = rng.integers(2, 9, size=2)
        labels[r : r + h, c : c + w] = i
    return labels


def test_permuting_ids_does_not_change_any_score() -> None:
    rng = np.random.default_rng(7)
    for _ in range(10):
        truth, pred = random_labels(rng, (40, 40), 15), random_labels(rng, (40, 40), 15)
        classes_t = {i: int(rng.integers(0, 3)) for i in range(1, 16)}
        classes_p = {i: int(rng.integers(0, 3)) for i in range(1, 16)}
        new_t = rng.permutation(np.arange(1, 16)) * 1000 + rng.integers(0, 999)
        new_p = rng.permutation(np.arange(1, 16)) * 7 + 100_000
        lut_t, lut_p = np.r_[0, new_t], np.r_[0, new_p]
        base = score_instances(pred, truth, radius_px=3, truth_classes=classes_t, pred_classes=classes_p)
        moved = score_instances(
            lut_p[pred], lut_t[truth], radius_px=3,
            truth_classes={int(lut_t[i]): c for i, c in classes_t.items()},
            pred_classes={int(lut_p[i]): c for i, c in classes_p.items()},
        )  # fmt: skip
        moved_d, base_d = moved.to_dict(), base.to_dict()
        assert moved_d.pop("pq_per_class") == pytest.approx(base_d.pop("pq_per_class"))
        assert moved_d == pytest.approx(base_d)


def test_swapping_prediction_and_truth_keeps_pq_and_dice() -> None:
    rng = np.random.default_rng(3)
    truth, pred = random_labels(rng, (40, 40), 12), random_labels(rng, (40, 40), 12)
    a, b = score_instances(pred, truth, radius_px=3), score_instances(truth, pred, radius_px=3)
    assert (a.pq, a.dice, a.tp, a.fp, a.fn) == pytest.approx((b.pq, b.dice, b.tp, b.fn, b.fp))


def dense_reference(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """PQ, AJI and AJI+ straight from their definitions, with one full-image mask per instance."""
    t_masks = [truth == i for i in np.unique(truth) if i]
    p_masks = [pred == j for j in np.unique(pred) if j]
    inter = np.array([[(t & p).sum() for p in p_masks] for t in t_masks], float).reshape(len(t_masks), len(p_masks))
    union = np.array([[(t | p).sum() for p in p_masks] for t in t_masks], float).reshape(inter.shape)
    iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
    match = iou > 0.5
    tp, fp, fn = match.sum(), len(p_masks) - match.sum(), len(t_masks) - match.sum()
    pq = tp / (tp + fp / 2 + fn / 2) * (iou[match].mean() if tp else 0.0)
    c = u = 0.0
    used: set[int] = set()
    for i, t in enumerate(t_masks):
        if iou[i].max(initial=0) > 0:
            j = int(np.argmax(iou[i]))
            c, u = c + inter[i, j], u + union[i, j]
            used.add(j)
        else:
            u += t.sum()
    u += sum(p.sum() for j, p in enumerate(p_masks) if j not in used)
    rows, cols = linear_sum_assignment(-iou)
    keep = iou[rows, cols] > 0
    rows, cols = rows[keep], cols[keep]
    c2 = inter[rows, cols].sum()
    u2 = union[rows, cols].sum() + sum(t.sum() for i, t in enumerate(t_masks) if i not in set(rows.tolist()))
    u2 += sum(p.sum() for j, p in enumerate(p_masks) if j not in set(cols.tolist()))
    return {"pq": pq, "aji": c / u, "aji_plus": c2 / u2}


def test_sparse_scores_equal_the_per_instance_mask_definitions() -> None:
    rng = np.random.default_rng(11)
    for _ in range(15):
        truth, pred = random_labels(rng, (36, 36), 12), random_labels(rng, (36, 36), 12)
        s = score_instances(pred, truth, radius_px=3)
        for name, value in dense_reference(pred, truth).items():
            assert getattr(s, name) == pytest.approx(value, abs=1e-12), name


def test_mean_scores_average_images_and_skip_those_without_truth() -> None:
    perfect = paint((6, 8), (1, 0, 4, 0, 4))
    split = paint((6, 8), (1, 0, 4, 0, 3), (2, 0, 4, 3, 4))
    empty = np.zeros((6, 8), np.int32)
    images = [
        score_instances(perfect, perfect, radius_px=3),  # pq 1, aji 1
        score_instances(split, perfect, radius_px=3),  # pq 0.5, aji 0.6 (see the split test)
        score_instances(perfect, empty, radius_px=3),  # no truth: NaN, skipped
    ]
    mean = mean_scores(images)
    assert mean["pq"] == pytest.approx(0.75) and mean["aji"] == pytest.approx(0.8)
    assert mean["n_images"] == 3 and mean["tp"] == 2 and mean["fp"] == 2 and mean["n_true"] == 2
    assert "mpq" not in mean
    with pytest.raises(ValueError):
        mean_scores([])


def test_mean_scores_average_each_class_over_the_images_that_have_it() -> None:
    truth = paint((6, 12), (1, 0, 4, 0, 4), (2, 0, 4, 6, 10))
    a = score_instances(truth, truth, radius_px=3, truth_classes={1: 0, 2: 1}, pred_classes={1: 0, 2: 1})
    b = score_instances(truth, truth, radius_px=3, truth_classes={1: 0, 2: 0}, pred_classes={1: 0, 2: 1})
    # a: class 0 PQ 1, class 1 PQ 1.  b: class 0 TP 1 FN 1 -> DQ 2/3, PQ 2/3; class 1 has no truth (NaN)
    mean = mean_scores([a, b])
    assert mean["pq_class_0"] == pytest.approx((1 + 2 / 3) / 2)
    assert mean["pq_class_1"] == pytest.approx(1.0)
    assert mean["mpq"] == pytest.approx((1 + 2 / 3) / 2)  # per-image mPQ: 1 and 2/3


def test_bad_inputs_raise_one_clear_error() -> None:
    with pytest.raises(ValueError, match=r"\(4, 5\).*\(4, 6\)"):
        score_instances(np.zeros((4, 5), np.int32), np.zeros((4, 6), np.int32), radius_px=3)
    with pytest.raises(ValueError, match="mpp"):
        score_instances(np.zeros((4, 5), np.int32), np.zeros((4, 5), np.int32))
    with pytest.raises(ValueError, match="integer"):
        score_instances(np.zeros((4, 5), np.float32), np.zeros((4, 5), np.int32), radius_px=3)
    with pytest.raises(ValueError, match=">= 0"):
        score_instances(np.full((4, 5), -1, np.int32), np.zeros((4, 5), np.int32), radius_px=3)


def test_import_is_cheap(tmp_path: Path) -> None:
    heavy = "('torch', 'zarr', 'dask', 'scipy')"
    code = f"import sys, wsiseg.metrics; print(sorted(m for m in {heavy} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path)
    assert out.stdout.strip() == "[]"
