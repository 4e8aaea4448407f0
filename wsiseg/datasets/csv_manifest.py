"""A CSV manifest: one row per image, `image,labels,mpp[,split][,name][,group]`.

    image,labels,mpp,split
    tiles/a.png,tiles/a.labels.tif,0.25,train
    slides/b.tif,slides/b.xml.gz,,val

Paths are relative to the CSV's folder (absolute paths are kept).  `labels` may be a label
map (.tif/.tiff/.png/.npy), an ImageScope .xml/.xml.gz, a QuPath .geojson or a HoVer-Net
.mat; the reader follows the suffix.  An empty mpp cell falls back to the file's own
resolution, then `mpp=`.  `split` ("train", "val" or "test"), when the column is present and
filled, fixes the split of every image; `name` overrides the item name (default: the image
stem); `group` feeds stratified splits.
"""

from __future__ import annotations

import csv
from pathlib import Path

from wsiseg.datasets.dataset import ItemRef
from wsiseg.datasets.dispatch import Annotated, make_refs
from wsiseg.datasets.item import DatasetError

_REQUIRED = ("image", "labels")


def read_csv_manifest(path: Path) -> list[Annotated]:
    """The rows of a CSV manifest, paths resolved against its folder.

    Raises DatasetError naming the CSV (and line) for missing columns, empty image/labels
    cells, non-numeric mpp, or no rows.
    """
    try:
        with open(path, newline="", encoding="utf-8-sig") as stream:
            reader = csv.DictReader(stream)
            columns = [c.strip().lower() for c in (reader.fieldnames or [])]
            rows = [{k.strip().lower(): (v or "").strip() for k, v in row.items() if k is not None} for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DatasetError(f"{path}: cannot read the CSV manifest ({exc}); save it as UTF-8 CSV") from exc
    missing = [c for c in _REQUIRED if c not in columns]
    if missing:
        raise DatasetError(f"{path}: missing column(s) {', '.join(missing)}; "
                           "the header must be image,labels,mpp[,split]")
    entries = []
    for line, row in enumerate(rows, start=2):
        if not row.get("image") or not row.get("labels"):
            raise DatasetError(f"{path}:{line}: empty image or labels cell; fill both or delete the row")
        image, labels = path.parent / row["image"], path.parent / row["labels"]
        mpp: float | None = None
        if row.get("mpp"):
            try:
                mpp = float(row["mpp"])
            except ValueError:
                raise DatasetError(f"{path}:{line}: mpp {row['mpp']!r} is not a number; give µm per pixel "
                                   "(e.g. 0.25) or leave it empty") from None
            if not mpp > 0:
                raise DatasetError(f"{path}:{line}: mpp must be positive µm per pixel, got {row['mpp']}")
        split = row.get("split", "").lower() or None
        entries.append(Annotated(image, labels, row.get("name") or image.stem, mpp, row.get("group") or None, split))
    if not entries:
        raise DatasetError(f"{path}: the manifest has no rows; add one row per image")
    return entries


def list_csv_manifest(path: Path, *, mpp: float | None = None,
                      offset_xy: tuple[float, float] = (0.0, 0.0)) -> list[ItemRef]:
    """One ItemRef per row of the CSV manifest at `path` (see the module docstring)."""
    return make_refs(read_csv_manifest(path), mpp=mpp, offset_xy=offset_xy)
