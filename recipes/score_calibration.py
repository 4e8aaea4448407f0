"""How well a model's nucleus score is calibrated: precision by score, per image.

    python recipes/score_calibration.py wsiseg-tiny --data /path/val.csv --split val

Runs each image of the split as `wsiseg run IMAGE --mpp X` would (tissue detection off, every
prompt kept: `--min-score 0`), and counts a predicted nucleus as correct when it overlaps a true
nucleus with IoU > 0.5 (the matching of panoptic quality, Kirillov et al. 2019, where such a
match is unique).  Prints the pooled precision per score band and, for a few `--min-score`
values, each image's precision and the share of its nuclei kept: a calibrated score gives the
same precision on every image for the same threshold.  Numbers, not tuning: the model's own
threshold is not changed by this script.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

BANDS = (0.0, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0001)
THRESHOLDS = (0.0, 0.3, 0.5, 0.7)


def correct_predictions(pred: np.ndarray, truth: np.ndarray) -> dict[int, bool]:
    """For each predicted id of `pred` ((H, W) int, 0 background): IoU > 0.5 with a true instance."""
    p, t = pred.ravel().astype(np.int64), truth.ravel().astype(np.int64)
    both = (p > 0) & (t > 0)
    pairs, inter = np.unique(p[both] * (int(t.max()) + 1) + t[both], return_counts=True)
    pp, tt = pairs // (int(t.max()) + 1), pairs % (int(t.max()) + 1)
    area_p = np.bincount(p, minlength=int(p.max()) + 1)
    area_t = np.bincount(t, minlength=int(t.max()) + 1)
    iou = inter / (area_p[pp] + area_t[tt] - inter)
    good = set(pp[iou > 0.5].tolist())
    return {int(i): int(i) in good for i in np.unique(p[p > 0])}


def main() -> None:
    from PIL import Image

    from wsiseg.datasets import open_dataset
    from wsiseg.instances_io import load_instances
    from wsiseg.pipeline import RunConfig, run_slide
    from wsiseg.scheduling import SchedulerConfig
    from wsiseg.writers.zarr_store import open_nuclei

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--data", required=True)
    parser.add_argument("--split", default="val")
    parser.add_argument("--val-fraction", type=float, default=0.25)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    dataset = open_dataset(args.data, split=args.split, val_fraction=args.val_fraction, seed=args.seed)
    per_image: list[tuple[str, np.ndarray, np.ndarray]] = []  # name, scores, correct
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(len(dataset)):
            item = dataset[i]
            image = Path(tmp) / f"{item.name}.png"
            Image.fromarray(np.ascontiguousarray(item.image)).save(image, compress_level=1)
            config = RunConfig(model=args.model, mpp=item.mpp, tissue_detection=False, min_score=0.0,
                               scheduler=SchedulerConfig(scheduler="synchronous"))
            result = run_slide(image, Path(tmp) / "out", config)
            store = open_nuclei(result.zarr)
            ids, scores = store.label_ids(), np.asarray(store.column("score"), np.float64)
            flags = correct_predictions(load_instances(result.zarr, shape=item.labels.shape), item.labels)
            correct = np.array([flags.get(int(k), False) for k in ids])
            per_image.append((item.name, scores, correct))
            print(f"  {item.name}: {len(ids)} nuclei, precision {correct.mean():.3f}", flush=True)

    scores = np.concatenate([s for _, s, _ in per_image])
    correct = np.concatenate([c for _, _, c in per_image])
    print("\nscore band   nuclei  precision (all images pooled)")
    for lo, hi in zip(BANDS[:-1], BANDS[1:]):
        inside = (scores >= lo) & (scores < hi)
        if inside.any():
            print(f"{lo:.1f}-{min(hi, 1.0):.1f}  {inside.sum():8d}  {correct[inside].mean():9.3f}")
    print("\n--min-score  precision per image (min / median / max)  nuclei kept per image (min / median / max)")
    for t in THRESHOLDS:
        prec = [c[s >= t].mean() for _, s, c in per_image if (s >= t).any()]
        kept = [(s >= t).mean() for _, s, _ in per_image]
        print(f"{t:9.1f}  {min(prec):.3f} / {np.median(prec):.3f} / {max(prec):.3f}"
              f"                     {min(kept):.2f} / {np.median(kept):.2f} / {max(kept):.2f}")


if __name__ == "__main__":
    main()
