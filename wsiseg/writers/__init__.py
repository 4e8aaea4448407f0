"""Output writers: QuPath GeoJSON, the nuclei Zarr store (table + label pyramid), run reports.

Writers stream: the pipeline calls ``write(table)`` once per batch of nuclei, then
``close()`` (or ``abort()`` on error, which leaves nothing under the final name).
Names load lazily so ``import wsiseg.writers`` stays cheap (zarr loads on first use).
"""

from __future__ import annotations


from wsiseg._lazy import lazy_attributes

_EXPORTS = {
    "GeoJSONWriter": "wsiseg.writers.geojson",
    "GeoJSONSummary": "wsiseg.writers.geojson",
    "check_qupath_geojson": "wsiseg.writers.geojson",
    "make_qupath_valid": "wsiseg.writers.geojson",
    "ZarrWriter": "wsiseg.writers.zarr_store",
    "NucleiStore": "wsiseg.writers.zarr_store",
    "NucleiStoreError": "wsiseg.writers.zarr_store",
    "open_nuclei": "wsiseg.writers.zarr_store",
    "rasterize_polygons": "wsiseg.writers.labels",
    "write_report": "wsiseg.writers.report",
    "write_report_html": "wsiseg.writers.report",
    "density_map": "wsiseg.writers.report",
}

__all__ = [
    "GeoJSONSummary",
    "GeoJSONWriter",
    "NucleiStore",
    "NucleiStoreError",
    "ZarrWriter",
    "check_qupath_geojson",
    "density_map",
    "make_qupath_valid",
    "open_nuclei",
    "rasterize_polygons",
    "write_report",
    "write_report_html",
]


__getattr__, __dir__ = lazy_attributes(__name__, _EXPORTS, globals(), __all__)