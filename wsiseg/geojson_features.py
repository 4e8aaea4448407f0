"""The Features of a parsed GeoJSON document, in the layouts wsiseg reads.

A FeatureCollection (its `features`), one Feature, or a bare list of Features (the layout of
QuPath's "Export objects as GeoJSON").  The readers of prompt points
(`wsiseg.models.prompters.file_prompts`), QuPath datasets (`wsiseg.datasets.qupath`) and weak
labels (`wsiseg.training.weak_labels`) share it; each raises its own error, naming the file
and the fix, for a document that is none of these.
"""

from __future__ import annotations

from typing import Any

__all__ = ["geojson_features"]


def geojson_features(data: Any) -> list[Any] | None:
    """The Features of `data` (a document as `json.load` returns it), in file order.

    A FeatureCollection gives its `features` (none when absent or null), a Feature gives
    itself, a list is returned as it is; anything else gives None.  The Features themselves
    are not checked: a caller rejects or skips entries that are not dicts as it needs.
    """
    if isinstance(data, dict) and data.get("type") == "FeatureCollection":
        return data.get("features") or []
    if isinstance(data, dict) and data.get("type") == "Feature":
        return [data]
    if isinstance(data, list):
        return data
    return None
