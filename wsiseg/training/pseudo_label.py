"""`wsiseg pseudo-label`: weak labels (points or boxes) + SAM -> instance masks, as a pairs dataset (All-in-SAM).

All-in-SAM prompts a pretrained SAM with each weak label and takes its masks as pixel labels
for fine-tuning.  Here:

1. Each image is resampled to the model's mpp (a bundle's; a raw .pth runs at the image's own
   resolution) and cut into tiles of SAM's input size S at a stride of S - 2 D, D the largest
   nucleus diameter (model px).  Each prompt is decoded once, in the tile whose centre is
   nearest to it (its point, or its box's centre), so every nucleus it can describe lies in
   that tile; the tile is encoded once for all its prompts.
2. A point prompt is the point (plus, with k_negatives > 0, the K nearest other points as
   negatives, as PromptNucSeg); a box prompt is the box, passed to SAM's prompt encoder as
   the centres of its extreme pixels (x0, y0, x1 - 1, y1 - 1 in the pixel-index frame SAM
   uses).  SamSegmentor decodes points only, so both go through SamModel's own modules.
3. Each mask (logits > 0) is limited to what its label allows: a box's mask to the box; a
   point's mask to the disc of radius D around the point, then to its connected component
   holding the point (a mask that misses its point is dropped).
4. Overlaps: masks are painted in increasing predicted IoU, so the higher IoU wins a contested
   pixel (PromptNucSeg's painting order); a point whose own pixel went to another mask is
   dropped (two points, one predicted nucleus).  Ids are renumbered 1..n.
5. Masks are resampled back to the image (nearest) and written as a pairs dataset:
   NAME.png + NAME.labels.tif + manifest.json (items with name, image, labels, mpp), which
   `wsiseg.datasets.open_dataset` and `wsiseg train segmentor --data` read.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy import ndimage as ndi

from wsiseg.training.weak_labels import WeakLabels, find_weak_labels, read_weak_csv, read_weak_geojson

if TYPE_CHECKING:
    import torch

    from wsiseg.models.sam.build import SamModel

log = logging.getLogger(__name__)

_DECODER_ROWS = 64


@dataclass(frozen=True)
class PseudoLabelConfig:
    """model: a SAM bundle (folder, zip, cached name) or an official / PromptNucSeg .pth.
    label_prompts: what an instance label image gives, "points" (centroids) or "boxes".
    mpp: µm/px of images that state none (manifest.json beside them or TIFF tags win).
    input_size: SAM's input size for a .pth (a bundle states its own).
    max_nucleus_diameter_px: D in model px (None: the bundle's, 64 for a .pth).
    k_negatives: nearest other points sent as negatives with each point prompt.
    device: "cpu", "cuda" or "auto" (bfloat16 autocast on CUDA)."""

    model: str
    label_prompts: str = "boxes"
    mpp: float | None = None
    input_size: int = 256
    max_nucleus_diameter_px: int | None = None
    k_negatives: int = 0
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.label_prompts not in ("points", "boxes"):
            raise ValueError(f"label_prompts must be 'points' or 'boxes', got {self.label_prompts!r}")
        if self.k_negatives < 0 or (self.max_nucleus_diameter_px is not None and self.max_nucleus_diameter_px < 1):
            raise ValueError("k_negatives must be >= 0 and max_nucleus_diameter_px >= 1")
        if self.mpp is not None and not 0.01 < self.mpp < 100:
            raise ValueError(f"mpp must be µm per pixel (e.g. 0.25), got {self.mpp}")


@dataclass
class LoadedSam:
    model: SamModel
    mpp: float | None
    max_nucleus_diameter_px: int
    device: torch.device


def load_sam(config: PseudoLabelConfig) -> LoadedSam:
    """The SAM of `config.model` (LoRA merged) on its device, with its mpp (None for a .pth)."""
    from wsiseg.models.bundles import open_bundle
    from wsiseg.models.cache import resolve_model
    from wsiseg.models.sam import SamSegmentor
    from wsiseg.training.settings import torch_device

    device = torch_device(config.device)
    target = resolve_model(config.model)
    if target == "classical":
        raise ValueError("pseudo-labelling needs a SAM model (bundle or .pth), not 'classical'")
    if target.is_file() and target.suffix.lower() in (".pth", ".pt"):
        seg = SamSegmentor.from_checkpoint(target, input_size=config.input_size, device=device)
        return LoadedSam(seg.model, None, config.max_nucleus_diameter_px or 64, device)
    bundle = open_bundle(target)
    seg = SamSegmentor.from_bundle(bundle, device=device)
    diameter = config.max_nucleus_diameter_px or bundle.manifest.max_nucleus_diameter_px
    return LoadedSam(seg.model, bundle.manifest.mpp, diameter, device)


def tile_origins(size: int, tile: int, stride: int) -> np.ndarray:
    """Origins (px) of tiles of `tile` px along an axis of `size` px: 0, stride, ..., size - tile."""
    if size <= tile:
        return np.zeros(1, np.int64)
    origins = list(range(0, size - tile, stride)) + [size - tile]
    return np.unique(np.asarray(origins, np.int64))


def _decode(model: SamModel, embedding: torch.Tensor, weak: WeakLabels, negatives: np.ndarray | None,
            device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Low-res logits (P, 4h, 4w) and IoU (P,) of P prompts (tile px) on one tile's embedding (1, C, h, w)."""
    import torch

    from wsiseg.training.settings import autocast

    n = len(weak)
    tile_index = torch.zeros(n, dtype=torch.int64, device=device)
    if weak.kind == "points":
        pts = weak.coords[:, None, :]
        lab = np.ones((n, 1), np.int64)
        if negatives is not None and negatives.shape[1]:
            pts = np.concatenate([pts, negatives], axis=1)
            lab = np.concatenate([lab, np.zeros(negatives.shape[:2], np.int64)], axis=1)
        with autocast(device):
            low, iou = model.decode(embedding, tile_index, torch.from_numpy(pts.astype(np.float32)).to(device),
                                    torch.from_numpy(lab).to(device))
        return low.float(), iou.float()
    box = weak.coords.astype(np.float32)
    corners = np.stack([box[:, 0], box[:, 1], box[:, 2] - 1, box[:, 3] - 1], axis=1)  # extreme pixels' centres
    with torch.autocast(device_type=device.type, enabled=False):
        sparse, dense = model.prompt_encoder(points=None, boxes=torch.from_numpy(corners).to(device), masks=None)
        image_pe = model.prompt_encoder.get_dense_pe()
    dense = embedding.index_select(0, tile_index) + dense
    with autocast(device):
        masks, iou = model.mask_decoder(  # as SamModel.decode: image embedding folded into the dense one
            image_embeddings=embedding.new_zeros((1, embedding.shape[1], 1, 1)), image_pe=image_pe,
            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=False,
        )
    return masks[:, 0].float(), iou[:, 0].float()


def _limit(mask: np.ndarray, kind: str, coords: np.ndarray, radius_px: float) -> np.ndarray:
    """Restrict one (h, w) tile mask to its label's allowance (see module docstring, step 3)."""
    h, w = mask.shape
    cols = np.arange(w) + 0.5
    rows = np.arange(h) + 0.5
    if kind == "boxes":
        x0, y0, x1, y1 = coords
        return mask & ((rows >= y0) & (rows < y1))[:, None] & ((cols >= x0) & (cols < x1))[None, :]
    x, y = coords
    mask = mask & (((rows[:, None] - y) ** 2 + (cols[None, :] - x) ** 2) <= radius_px**2)
    r, c = int(np.floor(y)), int(np.floor(x))
    if not (0 <= r < h and 0 <= c < w) or not mask[r, c]:
        return np.zeros_like(mask)
    components, _ = ndi.label(mask)
    return components == components[r, c]


def segment_weak(sam: LoadedSam, image: np.ndarray, weak: WeakLabels, *, k_negatives: int = 0) -> np.ndarray:
    """(H, W) int32 instance map (ids 1..n) of SAM's masks for `weak` on an (H, W, 3) uint8 image
    at the model's resolution (steps 1-4 of the module docstring)."""
    import torch

    from wsiseg.training.settings import autocast

    model, device = sam.model, sam.device
    size = model.input_size
    diameter = sam.max_nucleus_diameter_px
    stride = size - 2 * diameter
    if stride < size // 4:
        raise ValueError(f"a largest nucleus of {diameter} px leaves too little of a {size} px SAM tile; "
                         "lower max_nucleus_diameter_px or use a larger input size")
    height, width = image.shape[:2]
    ys, xs = tile_origins(height, size, stride), tile_origins(width, size, stride)
    anchors = weak.anchors()
    tile_w, tile_h = min(size, width), min(size, height)
    col = np.abs(anchors[:, 0:1] - (xs + tile_w / 2)[None]).argmin(axis=1)
    row = np.abs(anchors[:, 1:2] - (ys + tile_h / 2)[None]).argmin(axis=1)
    found: list[tuple[float, int, int, int, np.ndarray]] = []  # (iou, prompt, y0, x0, mask)
    with torch.inference_mode():
        for r, c in sorted(set(zip(row.tolist(), col.tolist()))):
            owned = np.flatnonzero((row == r) & (col == c))
            y0, x0 = int(ys[r]), int(xs[c])
            tile = np.ascontiguousarray(image[y0 : y0 + tile_h, x0 : x0 + tile_w])
            with autocast(device):
                embedding = model.encode(model.preprocess(torch.from_numpy(tile[None]).to(device)))
            shift = np.array([x0, y0] * (2 if weak.kind == "boxes" else 1), np.float64)
            for start in range(0, len(owned), _DECODER_ROWS):
                chunk = owned[start : start + _DECODER_ROWS]
                local = WeakLabels(weak.kind, weak.coords[chunk] - shift)
                negatives = _negatives(weak, chunk, k_negatives, shift[:2]) if weak.kind == "points" else None
                low, iou = _decode(model, embedding, local, negatives, device)
                logits = model.upsample_logits(low, tile_h, tile_w).cpu().numpy()
                for n, prompt in enumerate(chunk):
                    mask = _limit(logits[n] > 0, weak.kind, local.coords[n], diameter)
                    rows, cols = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
                    if len(rows):  # kept cropped to its box
                        box = mask[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
                        found.append((float(iou[n]), int(prompt), y0 + int(rows[0]), x0 + int(cols[0]), box))
    return _paint(found, weak, (height, width))


def _negatives(weak: WeakLabels, chunk: np.ndarray, k: int, shift: np.ndarray) -> np.ndarray:
    """(p, k', 2) the k nearest other points of each prompt in `chunk`, tile px (k' = min(k, N - 1))."""
    pts = weak.coords
    k = min(k, len(pts) - 1)
    if k <= 0:
        return np.zeros((len(chunk), 0, 2))
    d2 = ((pts[chunk, None, :] - pts[None, :, :]) ** 2).sum(-1)
    d2[np.arange(len(chunk)), chunk] = np.inf
    nearest = np.argsort(d2, axis=1, kind="stable")[:, :k]
    return pts[nearest] - shift


def _paint(
    found: list[tuple[float, int, int, int, np.ndarray]], weak: WeakLabels, shape: tuple[int, int]
) -> np.ndarray:
    """Paint masks in increasing IoU (ties: prompt order), drop points that lost their pixel, renumber."""
    from skimage.segmentation import relabel_sequential

    canvas = np.zeros(shape, np.int32)
    for _iou, prompt, y0, x0, mask in sorted(found, key=lambda f: (f[0], f[1])):
        view = canvas[y0 : y0 + mask.shape[0], x0 : x0 + mask.shape[1]]
        view[mask] = prompt + 1
    if weak.kind == "points":
        kept = np.zeros(len(weak) + 1, bool)
        for _iou, prompt, *_ in found:
            x, y = weak.coords[prompt]
            r, c = int(np.floor(y)), int(np.floor(x))
            kept[prompt + 1] = 0 <= r < shape[0] and 0 <= c < shape[1] and canvas[r, c] == prompt + 1
        canvas[~kept[canvas]] = 0
    return relabel_sequential(canvas)[0].astype(np.int32)


def list_images(images: Path | list[Path]) -> list[Path]:
    """Image files of a folder (label maps excluded) or the given list."""
    from wsiseg.datasets.image_files import is_image_file, list_image_files

    if isinstance(images, Path) and images.is_dir():
        found = list_image_files(images)
        if not found:
            raise ValueError(f"{images}: no images (.png, .tif, .jpg) in the folder")
        return found
    paths = [images] if isinstance(images, Path) else list(images)
    for p in paths:
        if not p.is_file() or not is_image_file(p):
            raise ValueError(f"{p}: not an image file (.png, .tif, .jpg); give images or a folder of them")
    return paths


def image_mpp(image: Path, fallback: float | None) -> float:
    """The image's mpp: a manifest.json beside it, its TIFF tags, else `fallback` (ValueError without)."""
    from wsiseg.datasets.image_files import resolve_mpp
    from wsiseg.datasets.manifest_json import find_manifest, read_manifest

    manifest = find_manifest(image.parent)
    stated = read_manifest(manifest).get(image.resolve()) if manifest is not None else None
    return resolve_mpp(image, stated.mpp if stated else None, fallback=fallback)


def _weak_table(weak: Path | None, paths: list[Path]) -> dict[str, WeakLabels] | None:
    """{image stem: labels} of a weak-label file (a CSV, or a GeoJSON for a single image); None
    for a folder or None (labels are then found beside each image)."""
    if weak is None or not weak.is_file():
        return None
    if weak.suffix.lower() in (".geojson", ".json"):
        if len(paths) != 1:
            raise ValueError(f"{weak}: a GeoJSON holds the labels of one image, but {len(paths)} images were given; "
                             "put NAME.geojson beside each image or use a CSV")
        return {paths[0].stem: read_weak_geojson(weak)}
    return read_weak_csv(weak)


def pseudo_label(
    images: Path | list[Path], out_dir: Path, config: PseudoLabelConfig, *, weak: Path | None = None
) -> list[dict[str, Any]]:
    """Pseudo-label every image and write the pairs dataset to out_dir; returns its manifest items.

    weak: a CSV for all images, a GeoJSON for a single image, or a folder holding
    NAME.geojson / NAME.labels.* (default: beside each image).  Raises ValueError (naming the file) for missing weak labels or
    mpp, and when out_dir already holds a manifest.json.
    """
    import cv2
    import tifffile
    from PIL import Image

    from wsiseg.datasets.image_files import read_rgb
    from wsiseg.training.augment import rescale

    out_dir = Path(out_dir)
    if (out_dir / "manifest.json").exists():
        raise ValueError(f"{out_dir} already holds a dataset (manifest.json); choose another output folder")
    paths = list_images(images)
    table = _weak_table(weak, paths)
    sam = load_sam(config)
    out_dir.mkdir(parents=True, exist_ok=True)
    items: list[dict[str, Any]] = []
    for path in paths:
        mpp = image_mpp(path, config.mpp)
        if table is not None:
            if path.stem not in table:
                raise ValueError(f"{weak}: no rows for image {path.name}; add them or leave the image out")
            labels_weak = table[path.stem]
        else:
            labels_weak = find_weak_labels(path, folder=weak, label_kind=config.label_prompts)
        rgb = read_rgb(path)
        factor = mpp / sam.mpp if sam.mpp else 1.0
        work, _ = rescale(rgb, np.zeros(rgb.shape[:2], np.int32), factor)
        instances = segment_weak(sam, work, labels_weak.scaled(factor), k_negatives=config.k_negatives)
        if instances.shape != rgb.shape[:2]:
            instances = cv2.resize(instances, (rgb.shape[1], rgb.shape[0]), interpolation=cv2.INTER_NEAREST)
        n = int(instances.max())
        Image.fromarray(rgb).save(out_dir / f"{path.stem}.png")
        tifffile.imwrite(out_dir / f"{path.stem}.labels.tif", instances.astype(np.uint16 if n < 65536 else np.uint32),
                         compression="zlib")
        log.info("%s: %d %s -> %d nuclei", path.name, len(labels_weak), labels_weak.kind, n)
        items.append({"name": path.stem, "image": f"{path.stem}.png", "labels": f"{path.stem}.labels.tif",
                      "mpp": mpp, "weak_labels": labels_weak.kind, "prompts": len(labels_weak), "nuclei": n})
    manifest = {"items": items, "pseudo_labels": {"model": str(config.model), "k_negatives": config.k_negatives}}
    tmp = out_dir / ".manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    tmp.replace(out_dir / "manifest.json")
    return items
