"""Train/validation splits by whole image: seeded, deterministic, optionally one per group."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

#: The split names a dataset item can carry.
SPLIT_NAMES: tuple[str, ...] = ("train", "val", "test")


def val_count(n_images: int, val_fraction: float) -> int:
    """How many of `n_images` go to validation: round-half-up of val_fraction * n_images, at
    least 1 when n_images >= 2 and val_fraction > 0, and never all of them."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if n_images < 2 or val_fraction == 0.0:
        return 0
    return min(n_images - 1, max(1, math.floor(val_fraction * n_images + 0.5)))


def split_images(
    names: Sequence[str],
    val_fraction: float = 0.2,
    seed: int = 0,
    groups: Mapping[str, str | None] | Sequence[str | None] | None = None,
) -> dict[str, list[str]]:
    """{"train": [...], "val": [...]}: whole images, each name in exactly one list.

    `val_count(len(names), val_fraction)` images go to "val".  The choice depends only on the
    set of names, the seed and the groups (not on the order of `names`): the sorted names are
    shuffled with numpy's default_rng(seed).  Each list keeps the order of `names`.

    groups (a {name: group} mapping, or a sequence aligned with `names`; e.g. the organ of each
    image): the validation images are then picked one per group first, visiting the groups in
    the seeded order, and only from groups holding at least two images (so no group leaves
    training entirely); remaining places are filled from the seeded shuffle.  When there are
    fewer validation places than such groups, the first groups in the seeded order get one
    each.  Images whose group is None only fill remaining places.

    Raises ValueError for duplicate names, a groups sequence of the wrong length, or a
    val_fraction outside [0, 1).
    """
    if len(set(names)) != len(names):
        raise ValueError("split_images: names must be unique")
    group_of = _group_map(names, groups)
    n_val = val_count(len(names), val_fraction)
    order = [sorted(names)[i] for i in np.random.default_rng(seed).permutation(len(names))]
    chosen: list[str] = []
    if group_of:
        sizes: dict[str, int] = {}
        for name in order:
            group = group_of.get(name)
            if group is not None:
                sizes[group] = sizes.get(group, 0) + 1
        seen: set[str] = set()
        for name in order:
            group = group_of.get(name)
            if len(chosen) == n_val:
                break
            if group is not None and group not in seen and sizes[group] >= 2:
                seen.add(group)
                chosen.append(name)
    taken = set(chosen)
    for name in order:
        if len(chosen) == n_val:
            break
        if name not in taken:
            chosen.append(name)
            taken.add(name)
    return {"train": [n for n in names if n not in taken], "val": [n for n in names if n in taken]}


def _group_map(
    names: Sequence[str], groups: Mapping[str, str | None] | Sequence[str | None] | None
) -> dict[str, str]:
    if groups is None:
        return {}
    if isinstance(groups, Mapping):
        return {n: str(groups[n]) for n in names if groups.get(n) is not None}
    if isinstance(groups, str) or len(groups) != len(names):
        raise ValueError("split_images: groups must be a {name: group} mapping or one group per name")
    return {n: str(g) for n, g in zip(names, groups) if g is not None}
