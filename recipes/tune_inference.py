"""Choose a wsiseg-tiny bundle's inference thresholds on *training* images (never validation).

    python recipes/tune_inference.py runs/wsiseg-tiny/bundle --recipe recipes/wsiseg-tiny.toml

Runs the bundle's network once per training image (one per organ, the recipe's split and mpp
overrides), then scores a grid of (core_threshold, foreground_threshold) settings of the
distance-core prompter and the watershed segmentor on those maps, and prints PQ, AJI and
detection F1 for each.  The whole image is one tile here, so figures differ slightly from
`wsiseg eval`; the ranking is what is used.

A bundle with horizontal and vertical maps (`hv` in its config) is scored with its distance map
folded by each of a few `HvSettings` (and unfolded, "none") and the core thresholds.
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path
from typing import Any

import numpy as np


def main() -> None:
    from wsiseg.models.tiny.maps import N_MAPS, DenseMapNet, HvSettings, fold_hv
    from wsiseg.training.tiny import TinyRecipe, split_items, to_model_mpp

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--recipe", type=Path, required=True)
    parser.add_argument("--per-organ", type=int, default=1, help="training images per organ")
    args = parser.parse_args()

    recipe = TinyRecipe.from_toml(args.recipe)
    train, _ = split_items(recipe)
    chosen: list = []
    seen: dict[str, int] = {}
    for item in train:
        organ = item.group or item.name
        if seen.get(organ, 0) < args.per_organ:
            seen[organ] = seen.get(organ, 0) + 1
            chosen.append(item)
    net, _, _ = DenseMapNet.from_bundle(args.bundle, "segmentor", "tiny_segmentor")
    cases = []
    for item in chosen:
        image, labels = to_model_mpp(item, recipe.mpp, recipe.mpp_overrides.get(item.name))
        maps = net.predict_maps(image[None], fold=False)[0]
        cases.append((item, maps, labels))
        print(f"  {item.name}: {image.shape[1]}x{image.shape[0]} px", flush=True)
    if net.hv is None:
        folds: list = [None]
        grid = list(itertools.product((0.4, 0.45, 0.5, 0.55, 0.6), (0.4, 0.5, 0.6)))
    else:
        folds = [None, *(HvSettings(step, saturation) for step, saturation in
                         ((1, 0.25), (1, 0.5), (1, 1.0), (2, 0.25), (2, 0.5)))]
        grid = list(itertools.product((0.4, 0.5, 0.6), (0.5,)))
    for hv in folds:
        if hv is not None or net.hv is not None:
            print(f"hv fold: {hv if hv is not None else 'none (the network distance map)'}", flush=True)
        folded = [(item, fold_hv(maps[None], hv)[0] if hv else maps[:N_MAPS], labels) for item, maps, labels in cases]
        score_grid(folded, grid, recipe)


def score_grid(cases: list, grid: list, recipe: Any) -> None:
    """Print the mean scores of each (core_threshold, foreground_threshold) of `grid` on
    `cases` ((item, (3, H, W) maps, labels) each)."""
    from skimage.segmentation import watershed

    from wsiseg.metrics import mean_scores, score_instances
    from wsiseg.models.tiny.maps import DISTANCE, FOREGROUND
    from wsiseg.models.tiny.prompter import PeakSettings, core_points

    for core, fg in grid:
        settings = PeakSettings(threshold=recipe.threshold, min_distance_px=recipe.min_distance_px,
                                foreground_threshold=fg, source="distance", core_threshold=core)
        scores = []
        for item, maps, labels in cases:
            points = core_points(maps, settings)
            markers = np.zeros(labels.shape, np.int32)
            cols = np.clip(points.xy[:, 0].astype(int), 0, labels.shape[1] - 1)
            rows = np.clip(points.xy[:, 1].astype(int), 0, labels.shape[0] - 1)
            markers[rows, cols] = np.arange(1, len(points) + 1)
            pred = watershed(-maps[DISTANCE], markers, mask=maps[FOREGROUND] > fg)
            scores.append(score_instances(pred, labels, mpp=recipe.mpp))
        m = mean_scores(scores)
        print(f"core {core:.2f} fg {fg:.2f}: PQ {m['pq']:.4f} AJI {m['aji']:.4f} F1 {m['f1_detection']:.4f} "
              f"precision {m['precision']:.3f} recall {m['recall']:.3f}", flush=True)


if __name__ == "__main__":
    main()
