"""A lazy sequence of labelled images: references are listed up front, pixels read on access."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import overload

from wsiseg.datasets.item import DatasetError, NucleusItem
from wsiseg.datasets.splits import SPLIT_NAMES, split_images


@dataclass(frozen=True)
class ItemRef:
    """One image of a dataset, not yet read.

    name: unique within the dataset.  source: the image file (or the array file for PanNuke).
    load: reads the item; a functools.partial of a module-level function, so a Dataset pickles
    (e.g. into DataLoader worker processes).  group: for stratified splits (organ, tissue type).
    split: a split fixed by a manifest ("train", "val" or "test"), or None.
    """

    name: str
    source: Path
    load: Callable[[], NucleusItem]
    group: str | None = None
    split: str | None = None


class Dataset:
    """A sequence of NucleusItem, read lazily: `len(ds)`, `ds[i]`, `ds[a:b]`, iteration.

    Every image has a split ("train" or "val", or a manifest's "test"): the manifest's when its
    references carry one (then all must), else `split_images(names, val_fraction, seed, groups)`
    over the references' groups.  `ds.split("val")` is the sub-dataset of one split; items
    read from it carry `item.split`.
    """

    def __init__(
        self,
        refs: Iterable[ItemRef],
        *,
        val_fraction: float = 0.2,
        seed: int = 0,
        splits: Mapping[str, str] | None = None,
    ) -> None:
        self._refs: tuple[ItemRef, ...] = tuple(refs)
        sources: dict[str, Path] = {}
        for ref in self._refs:
            if ref.name in sources:
                raise DatasetError(f"{ref.source}: item name {ref.name!r} is also used by {sources[ref.name]}; "
                                   "give every image a unique name (a `name` column in a CSV manifest)")
            sources[ref.name] = ref.source
        self._splits: dict[str, str] = dict(splits) if splits is not None else _assign_splits(
            self._refs, val_fraction, seed
        )

    @property
    def refs(self) -> tuple[ItemRef, ...]:
        """The item references, in dataset order."""
        return self._refs

    @property
    def names(self) -> list[str]:
        """Item names, in dataset order."""
        return [ref.name for ref in self._refs]

    @property
    def splits(self) -> dict[str, str]:
        """{item name: split} for every item."""
        return {ref.name: self._splits[ref.name] for ref in self._refs}

    def split(self, name: str) -> Dataset:
        """The items of split `name` ("train", "val" or "test"), in dataset order."""
        if name not in SPLIT_NAMES:
            raise ValueError(f"unknown split {name!r}; use one of {', '.join(SPLIT_NAMES)}")
        return self._subset([ref for ref in self._refs if self._splits[ref.name] == name])

    def __len__(self) -> int:
        return len(self._refs)

    @overload
    def __getitem__(self, index: int) -> NucleusItem: ...

    @overload
    def __getitem__(self, index: slice) -> Dataset: ...

    def __getitem__(self, index: int | slice) -> NucleusItem | Dataset:
        if isinstance(index, slice):
            return self._subset(list(self._refs[index]))
        ref = self._refs[index]
        item = ref.load()
        item.name = ref.name
        item.split = self._splits[ref.name]
        if item.group is None:
            item.group = ref.group
        return item

    def __iter__(self) -> Iterator[NucleusItem]:
        for i in range(len(self._refs)):
            yield self[i]

    def __repr__(self) -> str:
        counts = {s: sum(v == s for v in self.splits.values()) for s in SPLIT_NAMES}
        shown = ", ".join(f"{s}={n}" for s, n in counts.items() if n)
        return f"Dataset({len(self)} images{': ' + shown if shown else ''})"

    def _subset(self, refs: list[ItemRef]) -> Dataset:
        return Dataset(refs, splits={ref.name: self._splits[ref.name] for ref in refs})


def _assign_splits(refs: tuple[ItemRef, ...], val_fraction: float, seed: int) -> dict[str, str]:
    fixed = [ref for ref in refs if ref.split is not None]
    if fixed:
        missing = [ref for ref in refs if ref.split is None]
        if missing:
            raise DatasetError(f"{missing[0].source}: no split given while other images have one; "
                               "fill the split column for every row, or leave it out")
        for ref in fixed:
            if ref.split not in SPLIT_NAMES:
                raise DatasetError(f"{ref.source}: unknown split {ref.split!r}; use one of {', '.join(SPLIT_NAMES)}")
        return {ref.name: str(ref.split) for ref in refs}
    names = [ref.name for ref in refs]
    parts = split_images(names, val_fraction, seed, groups={ref.name: ref.group for ref in refs})
    return {**dict.fromkeys(parts["train"], "train"), **dict.fromkeys(parts["val"], "val")}
