"""NucleusTable: the columnar batch of finished nuclei that stitching hands to the writers.

Every coordinate is level-0 pixels (OpenSlide frame, pixel-edge convention: pixel
(row i, column j) covers [j, j+1) x [i, i+1)).  Polygons are stored GeoArrow-style:
`coords` (M, 2) with `ring_offsets` (R+1,) ring -> coord starts and `geom_offsets`
(N+1,) polygon -> ring starts.  Rings are closed (first == last vertex); ring 0 of a
polygon is its exterior.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np
import shapely

#: Measurement columns every table carries, in the order writers emit them.
MEASUREMENTS: tuple[str, ...] = (
    "score",
    "iou",
    "area_um2",
    "perimeter_um",
    "solidity",
    "eccentricity",
    "major_axis_um",
    "minor_axis_um",
    "hematoxylin_od_mean",
)


@dataclass
class NucleusTable:
    """N nuclei with polygons and measurements (see module docstring for frames).

    centroid_l0: (N, 2) float64 polygon centroids, x, y.
    bbox_l0: (N, 4) float64 xmin, ymin, xmax, ymax.
    class_id: (N,) int16, -1 unclassified.
    area_px: (N,) float64 polygon area in level-0 px^2.
    measurements: name -> (N,) float32 for every name in MEASUREMENTS, all finite.
    touches_edge: (N,) bool, True when the mask reached its segmentor tile's outer edge.
    """

    coords: np.ndarray
    ring_offsets: np.ndarray
    geom_offsets: np.ndarray
    centroid_l0: np.ndarray
    bbox_l0: np.ndarray
    class_id: np.ndarray
    area_px: np.ndarray
    measurements: dict[str, np.ndarray]
    touches_edge: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))

    def __post_init__(self) -> None:
        n = len(self.geom_offsets) - 1
        self.coords = np.asarray(self.coords, np.float64).reshape(-1, 2)
        self.ring_offsets = np.asarray(self.ring_offsets, np.int64)
        self.geom_offsets = np.asarray(self.geom_offsets, np.int64)
        self.centroid_l0 = np.asarray(self.centroid_l0, np.float64).reshape(-1, 2)
        self.bbox_l0 = np.asarray(self.bbox_l0, np.float64).reshape(-1, 4)
        self.class_id = np.asarray(self.class_id, np.int16).reshape(-1)
        self.area_px = np.asarray(self.area_px, np.float64).reshape(-1)
        if len(self.touches_edge) == 0 and n > 0:
            self.touches_edge = np.zeros(n, bool)
        self.touches_edge = np.asarray(self.touches_edge, bool).reshape(-1)
        for name in (
            "centroid_l0",
            "bbox_l0",
            "class_id",
            "area_px",
            "touches_edge",
        ):
            if len(getattr(self, name)) != n:
                raise ValueError(f"NucleusTable.{name} has {len(getattr(self, name))} rows, expected {n}")
        missing = [m for m in MEASUREMENTS if m not in self.measurements]
        if missing:
            raise ValueError(f"NucleusTable lacks measurements {missing}")
        for name, values in list(self.measurements.items()):
            values = np.asarray(values, np.float32).reshape(-1)
            if len(values) != n:
                raise ValueError(f"measurement {name!r} has {len(values)} rows, expected {n}")
            if not np.isfinite(values).all():
                raise ValueError(f"measurement {name!r} has NaN or Inf values")
            self.measurements[name] = values

    def __len__(self) -> int:
        return len(self.geom_offsets) - 1

    @classmethod
    def empty(cls) -> NucleusTable:
        return cls(
            np.zeros((0, 2)),
            np.zeros(1, np.int64),
            np.zeros(1, np.int64),
            np.zeros((0, 2)),
            np.zeros((0, 4)),
            np.zeros(0, np.int16),
            np.zeros(0),
            {m: np.zeros(0, np.float32) for m in MEASUREMENTS},
            np.zeros(0, bool),
        )

    @classmethod
    def from_polygons(
        cls,
        polygons: Sequence[shapely.Polygon] | np.ndarray,
        class_id: np.ndarray,
        measurements: dict[str, np.ndarray],
        touches_edge: np.ndarray | None = None,
    ) -> NucleusTable:
        """Build a table from shapely polygons (level-0 px); centroid, bbox and area are derived."""
        polys = np.asarray(polygons, dtype=object)
        if len(polys) == 0:
            return cls.empty()
        geom_type, coords, (ring_offsets, geom_offsets) = shapely.to_ragged_array(polys)
        if geom_type != shapely.GeometryType.POLYGON:
            raise ValueError(f"expected polygons, got {geom_type!r}")
        cent = shapely.get_coordinates(shapely.centroid(polys))
        return cls(
            coords,
            ring_offsets,
            geom_offsets,
            cent,
            shapely.bounds(polys),
            class_id,
            shapely.area(polys),
            dict(measurements),
            np.zeros(len(polys), bool) if touches_edge is None else touches_edge,
        )

    def polygons(self) -> np.ndarray:
        """The nuclei as an object array of shapely Polygons."""
        if len(self) == 0:
            return np.zeros(0, dtype=object)
        return shapely.from_ragged_array(
            shapely.GeometryType.POLYGON, self.coords, (self.ring_offsets, self.geom_offsets)
        )

    def take(self, index: np.ndarray) -> NucleusTable:
        """Rows `index` (int array or bool mask) as a new table."""
        index = np.arange(len(self))[index]
        polys = self.polygons()[index]
        return NucleusTable.from_polygons(
            polys,
            self.class_id[index],
            {k: v[index] for k, v in self.measurements.items()},
            self.touches_edge[index],
        )

    @classmethod
    def concat(cls, tables: Sequence[NucleusTable]) -> NucleusTable:
        tables = [t for t in tables if len(t)]
        if not tables:
            return cls.empty()
        coord_base = np.cumsum([0] + [len(t.coords) for t in tables[:-1]])
        ring_base = np.cumsum([0] + [len(t.ring_offsets) - 1 for t in tables[:-1]])
        return cls(
            np.concatenate([t.coords for t in tables]),
            np.concatenate(
                [t.ring_offsets[:-1] + b for t, b in zip(tables, coord_base)]
                + [np.array([coord_base[-1] + tables[-1].ring_offsets[-1]])]
            ),
            np.concatenate(
                [t.geom_offsets[:-1] + b for t, b in zip(tables, ring_base)]
                + [np.array([ring_base[-1] + tables[-1].geom_offsets[-1]])]
            ),
            np.concatenate([t.centroid_l0 for t in tables]),
            np.concatenate([t.bbox_l0 for t in tables]),
            np.concatenate([t.class_id for t in tables]),
            np.concatenate([t.area_px for t in tables]),
            {m: np.concatenate([t.measurements[m] for t in tables]) for m in tables[0].measurements},
            np.concatenate([t.touches_edge for t in tables]),
        )

    def iter_rings(self, row: int) -> Iterator[np.ndarray]:
        """The rings of nucleus `row` as (k, 2) coordinate arrays, exterior first."""
        for r in range(self.geom_offsets[row], self.geom_offsets[row + 1]):
            yield self.coords[self.ring_offsets[r] : self.ring_offsets[r + 1]]
