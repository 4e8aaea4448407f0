"""Reading the pixel files of a labelled dataset: RGB images, instance label maps, TIFF mpp.

Images: PNG, JPEG or TIFF, 8-bit grey, grey+alpha, RGB or RGBA; grey is repeated to RGB and
alpha is composited onto white (as the slide readers do), so a training image looks like a
tile the pipeline reads.  Label maps: a single-channel integer TIFF, PNG (8/16/32-bit) or
`.npy`; 0 is background, every other value one instance.  Ids are kept as they are.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from wsiseg.datasets.item import DatasetError

#: Suffixes of image files (lower case).
IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".tif", ".tiff", ".jpg", ".jpeg")
#: Suffixes of label-map files (lower case), after the `.labels` infix.
LABEL_SUFFIXES: tuple[str, ...] = (".tif", ".tiff", ".png", ".npy")
_TIFF = (".tif", ".tiff")
_INT32_MAX = np.iinfo(np.int32).max


def is_label_file(path: Path) -> bool:
    """True for `NAME.labels.<tif|tiff|png|npy>` (a label map, never an image)."""
    return path.suffix.lower() in LABEL_SUFFIXES and Path(path.stem).suffix.lower() == ".labels"


def is_image_file(path: Path) -> bool:
    """True for an image file (by suffix) that is not a `NAME.labels.*` label map."""
    return path.suffix.lower() in IMAGE_SUFFIXES and not is_label_file(path) and not path.name.startswith(".")


def list_image_files(folder: Path) -> list[Path]:
    """The image files directly in `folder`, sorted by name."""
    return sorted(p for p in folder.iterdir() if p.is_file() and is_image_file(p))


def find_beside(image: Path, suffixes: tuple[str, ...], *, infix: str = "") -> Path | None:
    """The first existing `<image stem><infix><suffix>` beside `image`, trying `suffixes` in
    order (each in lower and upper case), or None."""
    for suffix in suffixes:
        for variant in (suffix, suffix.upper()):
            candidate = image.with_name(f"{image.stem}{infix}{variant}")
            if candidate.is_file():
                return candidate
    return None


def read_rgb(path: Path) -> np.ndarray:
    """The image at `path` as (H, W, 3) uint8 RGB.

    Grey and grey+alpha are repeated to RGB; RGBA is composited onto white; palette images are
    expanded.  Raises DatasetError (naming the file) for anything else: 16-bit or float pixels,
    more than 4 channels, unreadable files.
    """
    try:
        pixels = _read_tiff_pixels(path) if path.suffix.lower() in _TIFF else _read_pil_pixels(path)
    except DatasetError:
        raise
    except Exception as exc:  # noqa: BLE001 - any decoder failure is a bad file
        raise DatasetError(f"{path}: cannot read the image ({type(exc).__name__}: {exc}); "
                           "re-save it as PNG or TIFF") from exc
    from wsiseg.readers.base import SlideError, rgb_on_white

    if pixels.dtype != np.uint8:
        raise DatasetError(f"{path}: pixels are {pixels.dtype}; convert the image to 8-bit RGB")
    if pixels.ndim not in (2, 3) or (pixels.ndim == 3 and pixels.shape[2] not in (1, 2, 3, 4)):
        raise DatasetError(f"{path}: image shape {pixels.shape} is not grey, RGB or RGBA; convert it to 8-bit RGB")
    try:
        return np.ascontiguousarray(rgb_on_white(pixels))
    except SlideError as exc:
        raise DatasetError(f"{path}: {exc}; convert the image to 8-bit RGB") from exc


def _read_tiff_pixels(path: Path) -> np.ndarray:
    import tifffile

    with tifffile.TiffFile(path) as tif:
        page = tif.pages.first
        pixels = page.asarray()
        axes = page.axes
    if pixels.ndim == 3 and axes.startswith("S"):  # planar configuration: samples first
        pixels = np.moveaxis(pixels, 0, -1)
    return np.asarray(pixels)


def _read_pil_pixels(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        if image.mode in ("P", "PA"):
            return np.asarray(image.convert("RGBA"))
        if image.mode not in ("L", "LA", "RGB", "RGBA"):
            raise DatasetError(f"{path}: image mode {image.mode} is not 8-bit grey or RGB(A); "
                               "convert the image to 8-bit RGB")
        return np.asarray(image)


def read_label_map(path: Path) -> np.ndarray:
    """The instance label map at `path` as (H, W) int32, ids exactly as stored.

    Accepts `.tif`/`.tiff` (first page), `.png` (8/16/32-bit grey) and `.npy` (2-D integer,
    bool, or float holding whole numbers; a trailing or leading axis of size 1 is squeezed).
    Raises DatasetError for colour label images, negative ids, ids above 2**31-1, fractional
    values, or unreadable files.
    """
    suffix = path.suffix.lower()
    try:
        if suffix in _TIFF:
            import tifffile

            labels = tifffile.imread(path, key=0)
        elif suffix == ".npy":
            labels = np.load(path, allow_pickle=False)
        else:
            from PIL import Image

            with Image.open(path) as image:
                if image.mode in ("RGB", "RGBA", "P", "PA", "LA", "CMYK", "YCbCr"):
                    raise DatasetError(f"{path}: label image has mode {image.mode}; save the labels as a "
                                       "single-channel integer image (one id per nucleus, 0 = background)")
                labels = np.asarray(image)
    except DatasetError:
        raise
    except Exception as exc:  # noqa: BLE001 - any decoder failure is a bad file
        raise DatasetError(f"{path}: cannot read the label map ({type(exc).__name__}: {exc}); "
                           "save it as a single-channel integer TIFF, PNG or .npy") from exc
    return checked_label_map(np.asarray(labels), path)


def checked_label_map(labels: np.ndarray, path: Path | str) -> np.ndarray:
    """`labels` as (H, W) int32, or DatasetError naming `path` (see read_label_map)."""
    if labels.ndim == 3 and 1 in (labels.shape[0], labels.shape[2]):
        labels = labels.reshape(labels.shape[1:] if labels.shape[0] == 1 else labels.shape[:2])
    if labels.ndim != 2:
        raise DatasetError(f"{path}: labels have shape {labels.shape}; save a 2-D instance map "
                           "(one id per nucleus, 0 = background)")
    if labels.dtype == bool:
        return labels.astype(np.int32)
    if labels.dtype.kind == "f":
        if not np.all(np.isfinite(labels)) or not np.array_equal(labels, np.round(labels)):
            raise DatasetError(f"{path}: labels hold fractional or non-finite values; save integer instance ids")
    elif labels.dtype.kind not in "iu":
        raise DatasetError(f"{path}: labels are {labels.dtype}; save integer instance ids")
    if labels.size and labels.min() < 0:
        raise DatasetError(f"{path}: labels hold negative ids; use 0 for background and positive ids for nuclei")
    if labels.size and labels.max() > _INT32_MAX:
        raise DatasetError(f"{path}: label ids exceed 2**31-1; renumber the nuclei 1..N")
    return labels.astype(np.int32)


def tiff_mpp(path: Path) -> float | None:
    """µm per pixel from a TIFF's resolution tags (inch or cm units), else None.

    None for non-TIFF files, TIFFs without (or with implausible) resolution tags, and
    unreadable files (their error comes when the pixels are read).
    """
    if path.suffix.lower() not in _TIFF:
        return None
    import tifffile

    from wsiseg.readers.image_reader import tiff_resolution_mpp

    try:
        with tifffile.TiffFile(path) as tif:
            page = tif.pages.first
            tags = {
                name: page.tags[name].value
                for name in ("XResolution", "YResolution", "ResolutionUnit")
                if name in page.tags
            }
    except Exception:  # noqa: BLE001 - unreadable: no mpp here; read_rgb reports the file
        return None
    mpp_xy = tiff_resolution_mpp(tags)
    return None if mpp_xy is None else (mpp_xy[0] + mpp_xy[1]) / 2.0


def resolve_mpp(image: Path, *stated: float | None, fallback: float | None) -> float:
    """µm per pixel of `image`: the first `stated` value that is not None (in the caller's order
    of trust, e.g. a manifest, then an annotation file), else the TIFF resolution tags, else
    `fallback` (the user's `mpp=`).  Raises DatasetError naming the file when there is none.
    """
    for value in (*stated, tiff_mpp(image), fallback):
        if value is not None:
            return float(value)
    raise DatasetError(f"{image}: no resolution (µm per pixel) in a manifest or the file; "
                       "pass --mpp (wsiseg eval) or --data-mpp (wsiseg train; data_mpp in a recipe; mpp= in Python), "
                       "e.g. 0.25 for 40x, 0.5 for 20x, or give an mpp column in a CSV manifest")
