"""TinySegmentor: each prompt's mask is its basin in a seeded watershed of the distance map.

Per tile: the network's maps; one seed per distinct prompt point of the tile's PromptBatch
(positives and their negatives, so a neighbour's point always competes for pixels); a
watershed (scikit-image) of the negated distance map, restricted to pixels whose foreground
probability exceeds `foreground_threshold`.  A prompt's mask is its seed's basin, cut to the
square of side `max_nucleus_diameter_px` centred on the prompt; a seed on background gets an
empty mask.  Basins never overlap, so a point inside another nucleus (a nucleolus) takes its
own share of pixels instead of a duplicate mask.  The predicted quality is the mean
foreground probability over the mask.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
from scipy import ndimage as ndi

from wsiseg.models.protocols import PromptBatch, TileMasks
from wsiseg.models.tiny.maps import DISTANCE, FOREGROUND, DenseMapNet, tile_batches

if TYPE_CHECKING:
    from wsiseg.models.bundles import Bundle

ARCHITECTURE = "tiny_segmentor"


@dataclass(frozen=True)
class WatershedSettings:
    """foreground_threshold: probability a mask pixel needs; max_nucleus_diameter_px: side of
    the square a mask is cut to (and the pipeline's halo)."""

    foreground_threshold: float = 0.5
    max_nucleus_diameter_px: int = 64

    def __post_init__(self) -> None:
        if not 0 < self.foreground_threshold < 1:
            raise ValueError(f"foreground_threshold must be in (0, 1), got {self.foreground_threshold}")
        if self.max_nucleus_diameter_px < 4:
            raise ValueError(f"max_nucleus_diameter_px must be >= 4, got {self.max_nucleus_diameter_px}")


def watershed_masks(maps: np.ndarray, batch: PromptBatch, settings: WatershedSettings) -> TileMasks:
    """maps: (3, H, W) float32; batch: the tile's prompts -> one mask per prompt (row)."""
    from skimage.segmentation import watershed

    height, width = maps.shape[1:]
    n = len(batch)
    if n == 0:
        return TileMasks(np.zeros((0, 4), np.int32), [], np.zeros(0, np.float32))
    # distinct seed pixels; positives first, so every row's positive has a seed of its own
    cols = np.clip(np.floor(batch.points[..., 0]).astype(np.int64), 0, width - 1)
    rows = np.clip(np.floor(batch.points[..., 1]).astype(np.int64), 0, height - 1)
    used = batch.labels >= 0
    order_pix = np.concatenate([(rows[:, 0] * width + cols[:, 0]), (rows * width + cols)[used]])
    pixels, first = np.unique(order_pix, return_index=True)
    pixels = pixels[np.argsort(first, kind="stable")]
    markers = np.zeros(height * width, np.int32)
    markers[pixels] = np.arange(1, len(pixels) + 1, dtype=np.int32)
    markers = markers.reshape(height, width)
    foreground = maps[FOREGROUND] > settings.foreground_threshold
    basins = watershed(-maps[DISTANCE], markers, mask=foreground)
    seed_of_row = markers[rows[:, 0], cols[:, 0]]
    slices = ndi.find_objects(basins)
    half = settings.max_nucleus_diameter_px // 2
    boxes = np.zeros((n, 4), np.int32)
    masks: list[np.ndarray] = []
    quality = np.zeros(n, np.float32)
    for i in range(n):
        seed = int(seed_of_row[i])
        sl = slices[seed - 1] if seed - 1 < len(slices) else None
        if sl is None:
            masks.append(np.zeros((0, 0), bool))
            continue
        r, c = int(rows[i, 0]), int(cols[i, 0])
        y0, y1 = max(sl[0].start, r - half), min(sl[0].stop, r + half + 1)
        x0, x1 = max(sl[1].start, c - half), min(sl[1].stop, c + half + 1)
        crop = basins[y0:y1, x0:x1] == seed
        if not crop.any():
            masks.append(np.zeros((0, 0), bool))
            continue
        ys, xs = np.nonzero(crop)
        y0, y1, x0, x1 = y0 + ys.min(), y0 + ys.max() + 1, x0 + xs.min(), x0 + xs.max() + 1
        crop = basins[y0:y1, x0:x1] == seed
        boxes[i] = (x0, y0, x1, y1)
        masks.append(crop)
        quality[i] = float(maps[FOREGROUND, y0:y1, x0:x1][crop].mean())
    return TileMasks(boxes, masks, quality)


class TinySegmentor:
    """Segmentor protocol over a DenseMapNet (see module docstring)."""

    def __init__(
        self,
        net: DenseMapNet,
        *,
        name: str = "wsiseg-tiny",
        mpp: float = 0.25,
        settings: WatershedSettings = WatershedSettings(),
        k_negatives: int = 8,
        preferred_tile_px: int = 512,
    ) -> None:
        self.net = net
        self.name = name
        self.mpp = float(mpp)
        self.settings = settings
        self.k_negatives = int(k_negatives)
        self.input_size_px: int | None = None
        #: the pipeline's tile size when --tile-size is not given: larger tiles spend less of
        #: the network's time on overlaps and halos
        self.preferred_tile_px = int(preferred_tile_px)

    @property
    def max_nucleus_diameter_px(self) -> int:
        return self.settings.max_nucleus_diameter_px

    def __repr__(self) -> str:
        return f"TinySegmentor(name={self.name!r}, mpp={self.mpp}, settings={self.settings})"

    def segment_tiles(self, tiles: np.ndarray, prompts: Sequence[PromptBatch]) -> list[TileMasks]:
        """tiles: (B, H, W, 3) uint8; one PromptBatch per tile -> one TileMasks per tile."""
        tiles = tile_batches(tiles)
        if len(prompts) != len(tiles):
            raise ValueError(f"{len(tiles)} tiles but {len(prompts)} prompt batches")
        return self.segment_maps(self.net.predict_maps(tiles), prompts)

    def segment_maps(self, maps: np.ndarray, prompts: Sequence[PromptBatch]) -> list[TileMasks]:
        """maps: (B, 3, H, W) float32 from this model's network (e.g. stored by the prompter,
        `wsiseg.map_store`); one PromptBatch per tile -> one TileMasks per tile."""
        if len(prompts) != len(maps):
            raise ValueError(f"{len(maps)} map tiles but {len(prompts)} prompt batches")
        return [watershed_masks(m, b, self.settings) for m, b in zip(maps, prompts)]

    @property
    def map_key(self) -> str | None:
        """Identifies the maps (network weights, precision, tta); None when unknown."""
        return self.net.map_key

    @property
    def precision(self) -> str:
        """The arithmetic the network runs at: "fp32" or "bf16" ("auto" resolved for this device)."""
        return self.net.precision

    @classmethod
    def from_bundle(
        cls, bundle: Bundle | str | Path, *, input_size: int | None = None, device: str = "cpu",
        k_negatives: int | None = None, precision: str | None = None, tta: bool = False,
    ) -> TinySegmentor:
        """Build from a bundle's "segmentor" component (architecture "tiny_segmentor").

        input_size is accepted for the loader's signature; the model takes any tile size.
        tta: average the maps over the tile's flips (`MapSettings.tta`).
        """
        net, bundle, component = DenseMapNet.from_bundle(
            bundle, "segmentor", ARCHITECTURE, device=device, precision=precision, tta=tta
        )
        try:
            ws = WatershedSettings(
                foreground_threshold=float(component.config.get("foreground_threshold", 0.5)),
                max_nucleus_diameter_px=int(bundle.manifest.max_nucleus_diameter_px),
            )
        except ValueError as exc:
            raise ValueError(f"bundle {bundle.path}: {exc}") from exc
        return cls(
            net,
            name=bundle.manifest.name,
            mpp=bundle.manifest.mpp,
            settings=ws,
            k_negatives=bundle.manifest.k_negatives if k_negatives is None else int(k_negatives),
            preferred_tile_px=int(component.config.get("tile_px", 512)),
        )
