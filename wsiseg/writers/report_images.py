"""Pictures of the per-slide HTML report, drawn with numpy and PIL and inlined as PNG data URIs.

Frames: level-0 px (OpenSlide frame, pixel edges) for every coordinate passed in; the
thumbnail frame is level-0 px / `downsample`; a crop's frame is level-0 px minus its origin,
times its magnification.  Colours are RGB uint8.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "DensityGrid",
    "colorbar_rgb",
    "colorize",
    "density_grid",
    "density_image",
    "draw_crop",
    "draw_overview",
    "nice_ceiling",
    "png_data_uri",
    "tissue_fraction",
]

#: Tissue outline on the overview thumbnail.
TISSUE_RGB = (0, 170, 70)
#: Density-map cells with less tissue than this share are left uncoloured (their per-mm²
#: density rests on too little tissue to mean anything).
MIN_TISSUE_SHARE = 0.25
#: Smallest density-map cell (µm): a dozen or more nuclei at usual densities, so a cell's value
#: is not mostly counting noise.
MIN_CELL_UM = 100.0

# Anchors of a perceptually ordered dark-blue -> teal -> yellow ramp (viridis-like), 0..1.
_RAMP = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], np.float64)


def png_data_uri(rgb: np.ndarray) -> str:
    """(H, W, 3) uint8 -> ``data:image/png;base64,...``."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def nice_ceiling(value: float) -> float:
    """The smallest of 1, 1.5, 2, 2.5, 3, 4, 5, 6, 8 x 10^k that is >= value (1.0 for value <= 0)."""
    if not value > 0 or not math.isfinite(value):
        return 1.0
    base = 10.0 ** math.floor(math.log10(value))
    for step in (1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0):
        if step * base >= value * (1 - 1e-12):
            return step * base
    return 10.0 * base


def _rings_l0(geometry: object) -> list[np.ndarray]:
    """Every ring (exterior and holes) of a shapely (Multi)Polygon, as (K, 2) float arrays."""
    import shapely

    if geometry is None or shapely.is_empty(geometry):
        return []
    rings = shapely.get_rings(shapely.get_parts(geometry))
    return [np.asarray(shapely.get_coordinates(r), np.float64) for r in rings]


def tissue_fraction(tissue_l0: object, grid_hw: tuple[int, int], cell_l0: float, *, supersample: int = 8) -> np.ndarray:
    """Share of each grid cell covered by tissue, (gh, gw) float32 in [0, 1].

    tissue_l0: shapely (Multi)Polygon in level-0 px, or None (every cell counts as tissue).
    Cell (r, c) covers [c, c+1) x [r, r+1) times `cell_l0` level-0 px.  Coverage is the share of
    sample points (a `supersample` x `supersample` lattice of sub-cell centres) inside the tissue.
    """
    import shapely
    from skimage.draw import polygon as fill_polygon

    gh, gw = grid_hw
    if tissue_l0 is None:
        return np.ones((gh, gw), np.float32)
    s = max(1, int(supersample))
    raster = np.zeros((gh * s, gw * s), bool)
    for part in shapely.get_parts(tissue_l0):
        if shapely.is_empty(part):
            continue
        for k, ring in enumerate([part.exterior, *part.interiors]):
            # sub-cell i has its centre at (i + 0.5) sub-cells: shift so that centres fall on integers
            xy = np.asarray(ring.coords) * (s / cell_l0) - 0.5
            rr, cc = fill_polygon(xy[:, 1], xy[:, 0], raster.shape)
            raster[rr, cc] = k == 0
    return raster.reshape(gh, s, gw, s).mean(axis=(1, 3)).astype(np.float32)


@dataclass(frozen=True)
class DensityGrid:
    """Nuclei per mm² of tissue on a square grid over the slide.

    counts: (gh, gw) int64 nuclei per cell; per_mm2: (gh, gw) float64, NaN where a cell has
    less than MIN_TISSUE_SHARE tissue; cell_l0: cell side in level-0 px; cell_um: in µm.
    """

    counts: np.ndarray
    per_mm2: np.ndarray
    tissue: np.ndarray
    cell_l0: float
    cell_um: float


def density_grid(
    centroids_l0: np.ndarray, size_l0: tuple[int, int], mpp: float, tissue_l0: object = None, *, max_cells: int = 64
) -> DensityGrid:
    """Nuclei per mm² of tissue in square cells of a round size (>= MIN_CELL_UM, <= max_cells a side).

    centroids_l0: (N, 2) x, y level-0 px (points off the slide or not finite are ignored).
    size_l0: (width, height) level-0 px.  mpp: µm per level-0 px (> 0).
    """
    if not mpp > 0:
        raise ValueError(f"density_grid needs mpp > 0 µm/px, got {mpp}")
    w, h = size_l0
    cell_um = nice_ceiling(max(MIN_CELL_UM, max(w, h) * mpp / max_cells))
    cell_l0 = cell_um / mpp
    gh, gw = max(1, math.ceil(h / cell_l0)), max(1, math.ceil(w / cell_l0))
    pts = np.asarray(centroids_l0, np.float64).reshape(-1, 2)
    pts = pts[np.isfinite(pts).all(axis=1)]
    gx = np.floor(pts[:, 0] / cell_l0).astype(np.int64)
    gy = np.floor(pts[:, 1] / cell_l0).astype(np.int64)
    ok = (gx >= 0) & (gx < gw) & (gy >= 0) & (gy < gh)
    counts = np.bincount(gy[ok] * gw + gx[ok], minlength=gh * gw).reshape(gh, gw)
    share = tissue_fraction(tissue_l0, (gh, gw), cell_l0)
    # the last row and column may run past the slide: only the part on the slide is tissue
    on_slide = np.outer(np.clip(h / cell_l0 - np.arange(gh), 0, 1), np.clip(w / cell_l0 - np.arange(gw), 0, 1))
    share = np.minimum(share, on_slide)
    area_mm2 = share * (cell_um / 1000.0) ** 2
    with np.errstate(divide="ignore", invalid="ignore"):
        per_mm2 = np.where(share >= MIN_TISSUE_SHARE, counts / area_mm2, np.nan)
    return DensityGrid(counts, per_mm2, share, float(cell_l0), float(cell_um))


def colorize(values: np.ndarray, vmax: float) -> np.ndarray:
    """(...) values -> (..., 3) uint8 on the ramp from 0 to vmax (clipped); NaN -> white."""
    v = np.asarray(values, np.float64)
    t = np.clip(np.nan_to_num(v, nan=0.0) / max(vmax, 1e-12), 0.0, 1.0) * (len(_RAMP) - 1)
    anchors = np.arange(len(_RAMP))
    rgb = np.stack([np.interp(t, anchors, _RAMP[:, c]) for c in range(3)], axis=-1)
    rgb[np.isnan(v)] = 255
    return np.round(rgb).astype(np.uint8)


def colorbar_rgb(width: int = 256, height: int = 14) -> np.ndarray:
    """The ramp from 0 (left) to vmax (right) as an (height, width, 3) uint8 strip."""
    return np.repeat(colorize(np.linspace(0.0, 1.0, width), 1.0)[None], height, axis=0)


def density_image(grid: DensityGrid, thumbnail_rgb: np.ndarray, downsample: float, vmax: float) -> np.ndarray:
    """The density grid at thumbnail size (H, W, 3) uint8: cells coloured, non-tissue a pale thumbnail."""
    h, w = thumbnail_rgb.shape[:2]
    rows = np.minimum(((np.arange(h) + 0.5) * downsample / grid.cell_l0).astype(np.int64), grid.per_mm2.shape[0] - 1)
    cols = np.minimum(((np.arange(w) + 0.5) * downsample / grid.cell_l0).astype(np.int64), grid.per_mm2.shape[1] - 1)
    values = grid.per_mm2[np.ix_(rows, cols)]
    out = colorize(values, vmax)
    pale = (255 - (255 - thumbnail_rgb[:, :, :3].astype(np.float32)) * 0.35).astype(np.uint8)
    blank = np.isnan(values)
    out[blank] = pale[blank]
    return out


def _font(size: int) -> object:
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def draw_overview(
    thumbnail_rgb: np.ndarray,
    downsample: float,
    tissue_l0: object = None,
    boxes_l0: Sequence[tuple[str, float, float, float, float]] = (),
) -> np.ndarray:
    """The thumbnail with the tissue outline and lettered crop boxes, (H, W, 3) uint8 (a copy).

    boxes_l0: (label, x0, y0, x1, y1) level-0 px.
    """
    from PIL import Image, ImageDraw

    img = Image.fromarray(np.ascontiguousarray(thumbnail_rgb[:, :, :3]))
    draw = ImageDraw.Draw(img)
    line = max(2, round(max(img.size) / 300))
    for ring in _rings_l0(tissue_l0):
        pts = [tuple(p) for p in ring / downsample]
        if len(pts) >= 2:
            draw.line(pts, fill=TISSUE_RGB, width=line, joint="curve")
    font = _font(max(14, round(max(img.size) / 32)))
    for label, x0, y0, x1, y1 in boxes_l0:
        a = (x0 / downsample, y0 / downsample)
        b = (max(x1 / downsample, a[0] + 3), max(y1 / downsample, a[1] + 3))
        draw.rectangle((a, b), outline=(0, 0, 0), width=line)
        draw.rectangle((a[0] - 1, a[1] - 1, b[0] + 1, b[1] + 1), outline=(255, 230, 0), width=1)
        tx, ty = b[0] + 3, a[1]
        box = draw.textbbox((tx, ty), label, font=font)  # type: ignore[arg-type]
        if box[2] + 2 > img.width:  # no room right of the box: inside its top-right corner
            shift = box[2] - box[0] + 2 * line + 6
            tx, box = tx - shift, (box[0] - shift, box[1], box[2] - shift, box[3])
        draw.rectangle((box[0] - 2, box[1] - 1, box[2] + 2, box[3] + 1), fill=(0, 0, 0))
        draw.text((tx, ty), label, fill=(255, 230, 0), font=font)  # type: ignore[arg-type]
    return np.asarray(img)


def draw_crop(
    pixels_rgb: np.ndarray,
    origin_l0: tuple[float, float],
    rings_l0: Sequence[np.ndarray],
    colors: Sequence[tuple[int, int, int]],
    *,
    magnify: int = 1,
    scale_bar_l0: float | None = None,
) -> np.ndarray:
    """A level-0 crop, magnified `magnify` times (each pixel a block), with nucleus outlines.

    pixels_rgb: (h, w, 3) uint8 read at level 0 from origin_l0 (x, y).  rings_l0: one closed
    exterior ring (K, 2) per nucleus in level-0 px (pixel edges); colors: one per ring.
    scale_bar_l0: length of a scale bar (level-0 px) drawn bottom left, or None.
    Returns (h * magnify, w * magnify, 3) uint8.
    """
    from PIL import Image, ImageDraw

    m = max(1, int(magnify))
    img = Image.fromarray(np.ascontiguousarray(pixels_rgb[:, :, :3]))
    if m > 1:
        img = img.resize((img.width * m, img.height * m), Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(img)
    width = 2 if m >= 2 else 1
    ox, oy = origin_l0
    for ring, rgb in zip(rings_l0, colors):
        pts = (np.asarray(ring, np.float64) - (ox, oy)) * m
        if len(pts) >= 2:
            draw.line([tuple(p) for p in pts], fill=tuple(int(c) for c in rgb), width=width, joint="curve")
    if scale_bar_l0 is not None and 0 < scale_bar_l0 * m < img.width - 16:
        x0, y1 = 8, img.height - 8
        draw.rectangle((x0 - 1, y1 - 6, x0 + scale_bar_l0 * m + 1, y1 + 1), fill=(0, 0, 0))
        draw.rectangle((x0, y1 - 5, x0 + scale_bar_l0 * m, y1), fill=(255, 255, 255))
    return np.asarray(img)
