"""PointPrompter: PromptNucSeg's DPA-P2PNet as a wsiseg Prompter (one point per nucleus).

Inference follows the reference: each tile is padded bottom/right to a multiple of the anchor
spacing (reflect-101, like albumentations' PadIfNeeded), normalised with ImageNet mean/std on
0-255 input, and run whole.  Per anchor: softmax over classes + background; a point is kept
when the argmax is not background (no score threshold), scored by its largest probability,
clipped to the unpadded tile, optionally kept only where the mask logit is > 0 (read at the
truncated integer pixel), then point-NMS'd (radius `nms_radius_px`, classes ignored).

The model predicts pixel-index coordinates; points leave here in the pixel-edge frame (+0.5).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from wsiseg.models.prompters.point_nms import point_nms
from wsiseg.models.protocols import NUCLEUS, NucleusClass, PointSet

if TYPE_CHECKING:
    import torch

    from wsiseg.models.bundles import Bundle
    from wsiseg.models.prompters.dpa_p2pnet import DPAP2PNet

logger = logging.getLogger(__name__)

IMAGENET_MEAN: tuple[float, float, float] = (123.675, 116.28, 103.53)
IMAGENET_STD: tuple[float, float, float] = (58.395, 57.12, 57.375)

#: PanNuke's five nucleus types in the order of its label maps; colours follow QuPath's
#: defaults where a counterpart exists (Tumor, Immune cells, Stroma, Necrosis).
PANNUKE_CLASSES: tuple[NucleusClass, ...] = (
    NucleusClass(0, "Neoplastic", (200, 0, 0)),
    NucleusClass(1, "Inflammatory", (160, 90, 160)),
    NucleusClass(2, "Connective", (150, 200, 150)),
    NucleusClass(3, "Dead", (50, 50, 50)),
    NucleusClass(4, "Epithelial", (255, 200, 0)),
)

#: Our estimate of how far image content changes a point: the anchor grid conv reaches one
#: anchor (<= 16 px) and the deformable offsets are nucleus-sized, while the ConvNeXt's
#: effective receptive field, not its theoretical one, decays within a few nucleus diameters.
DEFAULT_CONTEXT_PX = 64
#: ConvNeXt's last downsampling needs a 2x2 map at stride 16, so inputs are at least 32 px.
_MIN_INPUT_PX = 32


def default_classes(num_classes: int) -> tuple[NucleusClass, ...]:
    """PanNuke's classes for 5, "Nucleus" for 1, "Class i" (grey) otherwise."""
    if num_classes == 5:
        return PANNUKE_CLASSES
    if num_classes == 1:
        return (NUCLEUS,)
    return tuple(NucleusClass(i, f"Class {i}", (128, 128, 128)) for i in range(num_classes))


def resolve_device(device: str) -> torch.device:
    """The torch.device for "cpu", "cuda", "cuda:N" or "auto" (cuda when available)."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"device must be 'cpu', 'cuda', 'cuda:N' or 'auto', got {device!r}") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but no CUDA GPU is available; use device 'cpu' or 'auto' (--device cpu on the command line)")
    return resolved


def tiles_to_tensor(
    tiles: np.ndarray,
    mean: Sequence[float],
    std: Sequence[float],
    multiple: int,
    device: torch.device,
    min_size_px: int = 0,
) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H', W') float32 normalised, padded bottom/right.

    H', W' are the smallest multiples of `multiple` that are >= the tile and >= min_size_px.
    Padding is reflect-101 (replicate where the tile is too small to reflect).
    """
    import torch
    import torch.nn.functional as F

    tiles = np.asarray(tiles)
    if tiles.ndim != 4 or tiles.shape[-1] != 3 or tiles.dtype != np.uint8:
        raise ValueError(f"tiles must be a (B, H, W, 3) uint8 array, got {tiles.shape} {tiles.dtype}")
    data = np.ascontiguousarray(tiles)
    if not data.flags.writeable:  # torch.from_numpy warns on read-only memory (nothing here writes it)
        data = data.copy()
    x = torch.from_numpy(data).to(device).permute(0, 3, 1, 2).float()
    mean_t = torch.tensor(mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    x = (x - mean_t) / std_t
    height, width = tiles.shape[1:3]
    pad_h, pad_w = -height % multiple, -width % multiple
    if min_size_px:  # tiny tiles: pad up to the smallest size the network accepts
        pad_h += max(0, -(-(min_size_px - height - pad_h) // multiple) * multiple)
        pad_w += max(0, -(-(min_size_px - width - pad_w) // multiple) * multiple)
    if pad_h or pad_w:
        mode = "reflect" if pad_h < height and pad_w < width else "replicate"
        x = F.pad(x, (0, pad_w, 0, pad_h), mode=mode)
    return x


def decode_points(
    coords: np.ndarray,
    probs: np.ndarray,
    mask_logits: np.ndarray | None,
    *,
    size_hw: tuple[int, int],
    nms_radius_px: float,
) -> PointSet:
    """Points of one tile from raw outputs (see module docstring for the rule).

    coords: (A, 2) pixel-index x, y; probs: (A, C + 1) softmax, last = background;
    mask_logits: (H', W') or None for no mask filtering; size_hw: the unpadded tile size.
    Returns a PointSet in the pixel-edge frame.
    """
    height, width = size_hw
    classes = probs.argmax(axis=1)
    keep = classes < probs.shape[1] - 1
    xy = coords.astype(np.float32, copy=True)
    np.clip(xy[:, 0], 0, width - 1, out=xy[:, 0])
    np.clip(xy[:, 1], 0, height - 1, out=xy[:, 1])
    xy, score, classes = xy[keep], probs[keep].max(axis=1), classes[keep]
    if mask_logits is not None and len(xy):
        inside = mask_logits[xy[:, 1].astype(np.int64), xy[:, 0].astype(np.int64)] > 0
        xy, score, classes = xy[inside], score[inside], classes[inside]
    kept = point_nms(xy, score, nms_radius_px)
    return PointSet(xy[kept] + 0.5, score[kept], classes[kept])


class PointPrompter:
    """A DPA-P2PNet as a Prompter: (B, H, W, 3) uint8 tiles at `mpp` -> points per tile.

    model: a DPAP2PNet (weights loaded); name, mpp: for provenance and resampling.
    classes: one per model class (default: PanNuke's five, or "Nucleus" for one class).
    nms_radius_px: point NMS radius (12 PanNuke / CPM-17, 11 Kumar); filtering: mask-aided
    filtering (True for Kumar / CPM-17); context_px: see DEFAULT_CONTEXT_PX.
    mean, std: per-channel normalisation on 0-255 input; device: "cpu", "cuda" or "auto".
    """

    def __init__(
        self,
        model: DPAP2PNet,
        *,
        name: str = "dpa_p2pnet",
        mpp: float = 0.25,
        classes: Sequence[NucleusClass] | None = None,
        nms_radius_px: float = 12.0,
        filtering: bool = False,
        context_px: int = DEFAULT_CONTEXT_PX,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        device: str = "cpu",
    ) -> None:
        num_classes = model.config.num_classes
        classes = tuple(classes) if classes else default_classes(num_classes)
        if len(classes) != num_classes:
            raise ValueError(f"prompter {name!r} has {num_classes} classes but {len(classes)} were named")
        if mpp <= 0:
            raise ValueError(f"mpp must be > 0, got {mpp}")
        if nms_radius_px < 0 or context_px < 0:
            raise ValueError(f"nms_radius_px and context_px must be >= 0, got {nms_radius_px}, {context_px}")
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"mean and std need 3 values with std > 0, got {mean}, {std}")
        self.name = name
        self.mpp = float(mpp)
        self.classes = classes
        self.nms_radius_px = float(nms_radius_px)
        self.context_px = int(context_px)
        self.filtering = bool(filtering)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()

    def __repr__(self) -> str:
        return (
            f"PointPrompter(name={self.name!r}, mpp={self.mpp}, classes={len(self.classes)}, "
            f"space={self.model.config.space}, device={self.device})"
        )

    def predict_points(self, tiles: np.ndarray) -> list[PointSet]:
        """tiles: (B, H, W, 3) uint8 -> one PointSet per tile (tile px, pixel-edge frame)."""
        import torch

        height, width = np.asarray(tiles).shape[1:3] if np.ndim(tiles) == 4 else (0, 0)
        x = tiles_to_tensor(
            tiles, self.mean, self.std, self.model.config.space, self.device, min_size_px=_MIN_INPUT_PX
        )
        if len(x) == 0:
            return []
        with torch.inference_mode():
            out = self.model(x, with_mask=self.filtering)
            probs = out.logits.float().softmax(dim=-1).cpu().numpy()
            coords = out.coords.float().cpu().numpy()
            masks = None if out.mask_logits is None else out.mask_logits[:, 0].float().cpu().numpy()
        return [
            decode_points(
                coords[b],
                probs[b],
                None if masks is None else masks[b],
                size_hw=(height, width),
                nms_radius_px=self.nms_radius_px,
            )
            for b in range(len(coords))
        ]

    @classmethod
    def from_bundle(
        cls, bundle: Bundle | str | Path, *, device: str = "cpu", **overrides: Any
    ) -> PointPrompter:
        """Build from a bundle's "prompter" component (architecture "dpa_p2pnet").

        Component config keys: depths, dims (or backbone: a ConvNeXt size name), num_classes,
        num_levels, space, hidden_dim, filtering, context_px.  `overrides` may set
        nms_radius_px, filtering or context_px.
        """
        from wsiseg.models.prompters.dpa_p2pnet import DPAP2PNet

        bundle, component = open_component(bundle, "prompter", "dpa_p2pnet")
        manifest = bundle.manifest
        config = dict(component.config)
        unknown = set(overrides) - {"nms_radius_px", "filtering", "context_px"}
        if unknown:
            raise TypeError(f"PointPrompter.from_bundle got unexpected options {sorted(unknown)}")
        model = DPAP2PNet(model_config_from_dict(config, where=f"bundle {bundle.path}"))
        load_state(model, bundle.load_weights("prompter"), where=f"bundle {bundle.path}")
        classes = _bundle_classes(bundle, model.config.num_classes)
        mean, std = manifest_normalisation(manifest)
        settings: dict[str, Any] = {
            "nms_radius_px": manifest.nms_radius_px,
            "filtering": config.get("filtering", False),
            "context_px": config.get("context_px", DEFAULT_CONTEXT_PX),
            **overrides,
        }
        return cls(
            model,
            name=manifest.name,
            mpp=manifest.mpp,
            classes=classes,
            nms_radius_px=float(settings["nms_radius_px"]),
            filtering=bool(settings["filtering"]),
            context_px=int(settings["context_px"]),
            mean=mean,
            std=std,
            device=device,
        )


def _bundle_classes(bundle: Bundle, num_classes: int) -> tuple[NucleusClass, ...]:
    """The manifest's classes, or the defaults when it names only the generic "Nucleus"."""
    from wsiseg.models.bundles import BundleError

    classes = tuple(bundle.manifest.classes)
    if len(classes) == num_classes:
        return classes
    if classes in ((), (NUCLEUS,)):
        return default_classes(num_classes)
    raise BundleError(
        f"bundle {bundle.path}: the prompter predicts {num_classes} classes "
        f"but the manifest lists {len(classes)}"
    )


def model_config_from_dict(config: dict[str, Any], *, where: str) -> Any:
    """A DPAP2PNetConfig from a bundle component config; errors name `where`."""
    from wsiseg.models.prompters.dpa_p2pnet import DPAP2PNetConfig

    fields = {k: config[k] for k in ("num_classes", "num_levels", "space", "hidden_dim") if k in config}
    try:
        if "depths" in config and "dims" in config:
            return DPAP2PNetConfig(depths=tuple(config["depths"]), dims=tuple(config["dims"]), **fields)
        return DPAP2PNetConfig.with_backbone(str(config.get("backbone", "convnext_small")), **fields)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: invalid dpa_p2pnet prompter config: {exc}") from exc


def open_component(bundle: Bundle | str | Path, role: str, architecture: str) -> tuple[Bundle, Any]:
    """The bundle (opened if a path) and its `role` component, checked to be `architecture`."""
    from wsiseg.models.bundles import BundleError, open_bundle

    if isinstance(bundle, (str, Path)):
        bundle = open_bundle(bundle)
    component = bundle.component(role)
    if component.architecture != architecture:
        raise BundleError(
            f"bundle {bundle.path}: the {role} is a {component.architecture!r} model, "
            f"expected {architecture!r}"
        )
    return bundle, component


def manifest_normalisation(manifest: Any) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) from a manifest's normalisation (object with mean/std, mapping or pair)."""
    norm = getattr(manifest, "normalisation", None)
    if norm is None:
        return IMAGENET_MEAN, IMAGENET_STD
    if isinstance(norm, dict):
        mean, std = norm["mean"], norm["std"]
    elif hasattr(norm, "mean"):
        mean, std = norm.mean, norm.std
    else:
        mean, std = norm
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def load_state(model: Any, state: dict[str, Any], *, where: str) -> None:
    """Strict load_state_dict with a one-line error naming `where` and the first bad keys."""
    model_keys = set(model.state_dict())
    missing = sorted(model_keys - set(state))
    unexpected = sorted(set(state) - model_keys)
    if missing or unexpected:
        raise ValueError(
            f"{where}: weights do not fit the model: {len(missing)} missing (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})"
        )
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        lines = str(exc).strip().splitlines()
        reason = lines[-1].strip() if lines else type(exc).__name__
        raise ValueError(f"{where}: weights do not fit the model: {reason}") from exc
