"""Colour deconvolution: RGB H&E pixels -> optical density -> stain amounts.

Beer-Lambert: the optical density of channel c is OD_c = -log10(I_c / I0) with I0 = 255
(white glass).  A stain with unit OD vector s contributes c * s to the OD of a pixel, so
the stain amounts c of a pixel solve OD = M^T c with M the rows of stain vectors
(Ruifrok & Johnston, "Quantification of histochemical staining by color deconvolution",
Anal. Quant. Cytol. Histol. 23(4):291-299, 2001).  Their standard vectors are used;
per-slide stain estimation is not done.

Amounts are in OD units along each (unit-length) stain vector: a pure haematoxylin pixel
with amount 1.0 has an OD vector of length 1.  On typical H&E at 20-40x, nuclei reach a
haematoxylin amount above about 0.3-0.5 and stroma stays below about 0.2.

Every function is pixel-wise (no neighbourhood), so a tile and the whole image give
bit-identical values at the same pixel.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Ruifrok & Johnston (2001) stain OD vectors (R, G, B), before normalisation.
HEMATOXYLIN_OD = (0.65, 0.70, 0.29)
EOSIN_OD = (0.07, 0.99, 0.11)
DAB_OD = (0.27, 0.57, 0.78)

#: The smallest intensity used in the OD transform: I = 0 reads as I = 1 (OD 2.41).
_MIN_INTENSITY = 1.0


def _unit(v: tuple[float, float, float] | np.ndarray) -> np.ndarray:
    a = np.asarray(v, dtype=np.float64)
    n = float(np.linalg.norm(a))
    if not np.isfinite(n) or n == 0.0:
        raise ValueError(f"stain vector {a.tolist()} has zero or non-finite length")
    return a / n


@dataclass(frozen=True)
class StainMatrix:
    """Up to three stain OD vectors (R, G, B); a missing third is the cross product.

    names: one name per stain, e.g. ("hematoxylin", "eosin", "residual").
    """

    names: tuple[str, str, str]
    vectors: tuple[tuple[float, float, float], ...]

    def __post_init__(self) -> None:
        if len(self.vectors) not in (2, 3):
            raise ValueError(f"StainMatrix needs 2 or 3 stain vectors, got {len(self.vectors)}")
        if len(self.names) != 3:
            raise ValueError(f"StainMatrix needs 3 names, got {self.names!r}")
        if any(len(v) != 3 for v in self.vectors):
            raise ValueError(f"every stain vector has 3 components (R, G, B), got {self.vectors!r}")
        rows = [_unit(v) for v in self.vectors]
        if np.linalg.norm(np.cross(rows[0], rows[1])) < 1e-6 or abs(float(np.linalg.det(self.matrix()))) < 1e-6:
            raise ValueError(f"stain vectors {[list(v) for v in self.vectors]} are linearly dependent")

    def matrix(self) -> np.ndarray:
        """(3, 3) float64, one unit stain vector per row (R, G, B columns)."""
        rows = [_unit(v) for v in self.vectors]
        if len(rows) == 2:
            rows.append(_unit(np.cross(rows[0], rows[1])))
        return np.stack(rows)

    def unmixing(self) -> np.ndarray:
        """(3, 3) float64 U with amounts = OD @ U (OD a row vector per pixel)."""
        return np.linalg.inv(self.matrix())


#: Haematoxylin and eosin; the third channel is their cross product (what neither explains).
HE = StainMatrix(("hematoxylin", "eosin", "residual"), (HEMATOXYLIN_OD, EOSIN_OD))
#: Haematoxylin, eosin and DAB, as in Ruifrok & Johnston's H-E-DAB example.
HED = StainMatrix(("hematoxylin", "eosin", "dab"), (HEMATOXYLIN_OD, EOSIN_OD, DAB_OD))

# OD of every uint8 intensity: OD[i] = -log10(max(i, 1) / 255), float64 (exact table).
_OD_TABLE = -np.log10(np.maximum(np.arange(256, dtype=np.float64), _MIN_INTENSITY) / 255.0)


def _check_rgb(rgb: np.ndarray) -> np.ndarray:
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[-1] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB image, got shape {rgb.shape}")
    if rgb.dtype != np.uint8:
        raise ValueError(f"expected uint8 RGB pixels, got dtype {rgb.dtype}; convert with np.clip(x, 0, 255).astype(np.uint8)")
    return rgb


def rgb_to_od(rgb: np.ndarray) -> np.ndarray:
    """Optical density per channel: (H, W, 3) uint8 RGB -> (H, W, 3) float32 >= 0."""
    rgb = _check_rgb(rgb)
    return _OD_TABLE.astype(np.float32)[rgb]


def _channel_tables(stains: StainMatrix, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-channel lookup tables whose sum is the amount of stain `index` (float32)."""
    u = stains.unmixing()[:, index]
    return tuple((_OD_TABLE * u[c]).astype(np.float32) for c in range(3))  # type: ignore[return-value]


_HEMATOXYLIN_TABLES = _channel_tables(HE, 0)
_HEMATOXYLIN_TABLE_STACK = np.stack(_HEMATOXYLIN_TABLES)


def hematoxylin_tables() -> np.ndarray:
    """(3, 256) float32 per-channel tables: `hematoxylin_od` of a pixel (r, g, b) is
    max(t[0, r] + t[1, g] + t[2, b], 0), summed in that order in float32."""
    return _HEMATOXYLIN_TABLE_STACK


def stain_amount(rgb: np.ndarray, index: int, stains: StainMatrix = HE, *, clip: bool = True) -> np.ndarray:
    """Amount of one stain (OD units): (H, W, 3) uint8 RGB -> (H, W) float32.

    index: row of `stains` (0 = haematoxylin).  clip: set negative amounts to 0.
    """
    rgb = _check_rgb(rgb)
    if not 0 <= index < 3:
        raise ValueError(f"stain index must be 0, 1 or 2, got {index}")
    tables = _HEMATOXYLIN_TABLES if (stains is HE and index == 0) else _channel_tables(stains, index)
    out = tables[0][rgb[..., 0]]
    out += tables[1][rgb[..., 1]]
    out += tables[2][rgb[..., 2]]
    if clip:
        np.maximum(out, 0.0, out=out)
    return out


def hematoxylin_od(rgb: np.ndarray) -> np.ndarray:
    """Haematoxylin amount (OD units, >= 0): (H, W, 3) uint8 RGB -> (H, W) float32.

    Nuclei on H&E are typically > 0.3, stroma < 0.2, white glass 0.
    """
    return stain_amount(rgb, 0, HE)


def separate_stains(rgb: np.ndarray, stains: StainMatrix = HE) -> np.ndarray:
    """All three stain amounts: (H, W, 3) uint8 RGB -> (H, W, 3) float32 (not clipped)."""
    od = rgb_to_od(rgb)
    return (od.reshape(-1, 3) @ stains.unmixing().astype(np.float32)).reshape(od.shape)


def stains_to_rgb(amounts: np.ndarray, stains: StainMatrix = HE) -> np.ndarray:
    """Inverse of separate_stains: (H, W, 3) amounts -> (H, W, 3) uint8 RGB (for synthetic images)."""
    amounts = np.asarray(amounts, dtype=np.float64)
    if amounts.ndim < 1 or amounts.shape[-1] != 3:
        raise ValueError(f"expected (..., 3) stain amounts, got shape {amounts.shape}")
    od = amounts @ stains.matrix()
    return np.clip(np.round(255.0 * np.power(10.0, -od)), 0, 255).astype(np.uint8)
