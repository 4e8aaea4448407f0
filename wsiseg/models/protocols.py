"""What the pipeline asks of a nucleus model: the Prompter and Segmentor protocols.

Coordinate convention for every point passed here: continuous tile pixels in the
pixel-*edge* frame, x right, y down; the centre of pixel (row i, column j) is
(j + 0.5, i + 0.5).  Models whose own code works in pixel-index coordinates (SAM's
prompt encoder adds 0.5 itself; PromptNucSeg predicts index coordinates) convert at
their boundary.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence, runtime_checkable

import numpy as np


@dataclass(frozen=True)
class NucleusClass:
    """A nucleus class as it reaches QuPath: id (>= 0), name and an RGB colour."""

    id: int
    name: str
    color: tuple[int, int, int]

    def __post_init__(self) -> None:
        if self.id < 0:
            raise ValueError(f"class id must be >= 0, got {self.id}")
        if not self.name or ": " in self.name:
            raise ValueError(f"class name {self.name!r} is empty or contains ': ' (QuPath derived class)")
        if len(self.color) != 3 or any(not 0 <= int(c) <= 255 for c in self.color):
            raise ValueError(f"class colour must be three values 0-255, got {self.color!r}")


NUCLEUS = NucleusClass(0, "Nucleus", (0, 136, 255))


@dataclass
class PointSet:
    """Points proposed by a prompter for one tile (or the global set, in the working frame).

    xy: (N, 2) float32, x then y, continuous pixel-edge frame.
    score: (N,) float32 in [0, 1].
    class_id: (N,) int16, index into the model's classes, -1 when unclassified.
    """

    xy: np.ndarray
    score: np.ndarray
    class_id: np.ndarray

    def __post_init__(self) -> None:
        self.xy = np.asarray(self.xy, dtype=np.float32).reshape(-1, 2)
        self.score = np.asarray(self.score, dtype=np.float32).reshape(-1)
        self.class_id = np.asarray(self.class_id, dtype=np.int16).reshape(-1)
        if not (len(self.xy) == len(self.score) == len(self.class_id)):
            raise ValueError(
                f"PointSet arrays disagree in length: xy {len(self.xy)}, score {len(self.score)}, "
                f"class_id {len(self.class_id)}"
            )

    def __len__(self) -> int:
        return len(self.xy)

    @classmethod
    def empty(cls) -> PointSet:
        return cls(np.zeros((0, 2), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int16))

    def take(self, index: np.ndarray) -> PointSet:
        return PointSet(self.xy[index], self.score[index], self.class_id[index])

    @classmethod
    def concat(cls, sets: Sequence[PointSet]) -> PointSet:
        if not sets:
            return cls.empty()
        return cls(
            np.concatenate([s.xy for s in sets]),
            np.concatenate([s.score for s in sets]),
            np.concatenate([s.class_id for s in sets]),
        )


@dataclass
class PromptBatch:
    """Prompts for one segmentor tile.

    points: (P, N, 2) float32, continuous tile pixels (edge frame); column 0 is the
        positive point, columns 1.. its negatives (or padding).
    labels: (P, N) int8; 1 positive, 0 negative, -1 padding (ignored).
    """

    points: np.ndarray
    labels: np.ndarray

    def __post_init__(self) -> None:
        self.points = np.asarray(self.points, dtype=np.float32)
        self.labels = np.asarray(self.labels, dtype=np.int8)
        if self.points.ndim != 3 or self.points.shape[-1] != 2:
            raise ValueError(f"points must be (P, N, 2), got {self.points.shape}")
        if self.labels.shape != self.points.shape[:2]:
            raise ValueError(f"labels {self.labels.shape} do not match points {self.points.shape[:2]}")

    def __len__(self) -> int:
        return len(self.points)


@dataclass
class TileMasks:
    """Masks a segmentor returns for one tile, one per prompt, cropped to their boxes.

    bbox_px: (P, 4) int32, x0, y0, x1, y1 in tile pixels, end exclusive; an empty mask
        has x1 == x0.
    masks: P bool arrays, masks[i].shape == (y1 - y0, x1 - x0).
    iou: (P,) float32, the segmentor's predicted quality of each mask (SAM's predicted IoU).
    """

    bbox_px: np.ndarray
    masks: list[np.ndarray]
    iou: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))

    def __post_init__(self) -> None:
        self.bbox_px = np.asarray(self.bbox_px, dtype=np.int32).reshape(-1, 4)
        self.iou = np.asarray(self.iou, dtype=np.float32).reshape(-1)
        if not (len(self.bbox_px) == len(self.masks) == len(self.iou)):
            raise ValueError("TileMasks arrays disagree in length")

    def __len__(self) -> int:
        return len(self.masks)

    @classmethod
    def from_dense(cls, masks: np.ndarray, iou: np.ndarray) -> TileMasks:
        """Crop dense (P, H, W) bool masks to their bounding boxes."""
        boxes = np.zeros((len(masks), 4), np.int32)
        crops: list[np.ndarray] = []
        for i, m in enumerate(masks):
            rows = np.flatnonzero(m.any(axis=1))
            if len(rows) == 0:
                crops.append(np.zeros((0, 0), bool))
                continue
            cols = np.flatnonzero(m.any(axis=0))
            y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
            boxes[i] = (x0, y0, x1, y1)
            crops.append(np.ascontiguousarray(m[y0:y1, x0:x1]))
        return cls(boxes, crops, iou)


@runtime_checkable
class Prompter(Protocol):
    """Proposes one point per nucleus in RGB tiles at the model's mpp."""

    @property
    def name(self) -> str: ...

    @property
    def mpp(self) -> float: ...

    @property
    def classes(self) -> tuple[NucleusClass, ...]: ...

    @property
    def nms_radius_px(self) -> float: ...

    @property
    def context_px(self) -> int:
        """How far (px) image content influences a point; prompter tiles overlap by twice this."""
        ...

    def predict_points(self, tiles: np.ndarray) -> list[PointSet]:
        """tiles: (B, H, W, 3) uint8 -> one PointSet per tile, tile pixels (edge frame)."""
        ...


@runtime_checkable
class Segmentor(Protocol):
    """Turns prompts into one mask per prompt, encoding each tile once."""

    @property
    def name(self) -> str: ...

    @property
    def mpp(self) -> float: ...

    @property
    def input_size_px(self) -> int | None:
        """The tile size the model wants (e.g. 256 for SAM at 256 input); None when any size works."""
        ...

    @property
    def max_nucleus_diameter_px(self) -> int:
        """The largest nucleus diameter (px at the model's mpp) it can return; sets the tile halo."""
        ...

    @property
    def k_negatives(self) -> int:
        """How many nearest other prompts go with each prompt as negatives."""
        ...

    def segment_tiles(self, tiles: np.ndarray, prompts: Sequence[PromptBatch]) -> list[TileMasks]:
        """tiles: (B, H, W, 3) uint8; prompts: one PromptBatch per tile -> one TileMasks per tile."""
        ...
