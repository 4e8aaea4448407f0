"""A dataset folder's `manifest.json`: per-image mpp, group and label file.

Format (as in the project's training data):
    {"items": [{"name": "X", "image": "monuseg/X.jpg", "labels": "monuseg/X.labels.tif",
                "mpp": 0.25, "organ": "lung (TSS 18, ...)", ...}, ...]}
Paths are relative to the manifest's folder.  An item's group is its "group" value, else the
first word of its "organ" value (lower case), else None.  Other keys (including "split") are
ignored: a JSON manifest describes the data, it does not split it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from wsiseg.datasets.item import DatasetError

MANIFEST_NAME = "manifest.json"


@dataclass(frozen=True)
class ManifestEntry:
    """One image of a manifest.json: paths absolute, mpp in µm per pixel (None if absent)."""

    name: str
    image: Path
    labels: Path | None
    mpp: float | None
    group: str | None


def find_manifest(folder: Path) -> Path | None:
    """`folder/manifest.json`, else `folder/../manifest.json`, if it exists and holds "items"."""
    for candidate in (folder / MANIFEST_NAME, folder.parent / MANIFEST_NAME):
        if candidate.is_file():
            try:
                data = json.loads(candidate.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise DatasetError(f"{candidate}: not valid JSON ({exc}); fix or remove the manifest") from exc
            if isinstance(data, dict) and isinstance(data.get("items"), list):
                return candidate
    return None


def read_manifest(path: Path) -> dict[Path, ManifestEntry]:
    """{resolved image path: entry} for every item of `path` that names an image."""
    data = json.loads(path.read_text(encoding="utf-8"))
    entries: dict[Path, ManifestEntry] = {}
    for raw in data.get("items", []):
        if not isinstance(raw, dict) or not isinstance(raw.get("image"), str):
            continue
        image = (path.parent / raw["image"]).resolve()
        labels = (path.parent / raw["labels"]).resolve() if isinstance(raw.get("labels"), str) else None
        mpp = raw.get("mpp")
        if mpp is not None and (isinstance(mpp, bool) or not isinstance(mpp, (int, float)) or not mpp > 0):
            raise DatasetError(f"{path}: item {raw['image']!r} has mpp {mpp!r}; "
                               "give µm per pixel as a positive number")
        entries[image] = ManifestEntry(
            name=str(raw.get("name") or image.stem),
            image=image,
            labels=labels,
            mpp=float(mpp) if mpp is not None else None,
            group=_group(raw),
        )
    return entries


def _group(raw: dict[str, object]) -> str | None:
    if isinstance(raw.get("group"), str):
        return str(raw["group"])
    organ = raw.get("organ")
    if isinstance(organ, str):
        match = re.match(r"\s*([A-Za-z][A-Za-z-]*)", organ)
        if match:
            return match.group(1).lower()
    return None
