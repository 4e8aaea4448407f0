"""Convert PromptNucSeg's released prompter checkpoint (.pth) into a wsiseg bundle.

The checkpoint is read with torch.load(weights_only=True) (argparse.Namespace, present in
`latest.pth`, is the only extra type allowed).  Its state dict ("model_ema" when present, as the
reference evaluation prefers, else "model") holds `backbone.backbone.*` (ConvNeXt),
`backbone.neck.*`, `backbone.neck1.*`, `deform_layer.*`, `reg_head.*`, `cls_head.*`, `conv.*`
and `mask_head.*`; the architecture (ConvNeXt depths and dims, FPN levels, classes, width) is
read from the tensor shapes and the weights load strictly.  Dataset settings follow the
reference configs: space 8 / 16, NMS radius 12 / 11 / 12 px, mask filtering off / on / on for
PanNuke / Kumar / CPM-17.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wsiseg.models.prompters.point import DEFAULT_CONTEXT_PX, IMAGENET_MEAN, IMAGENET_STD, default_classes

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DatasetSettings:
    """Reference inference settings of one training dataset."""

    space: int
    num_levels: int
    num_classes: int
    nms_radius_px: float
    filtering: bool


#: From PromptNucSeg's prompter/config/{pannuke123,kumar,cpm17}.py.
DATASET_SETTINGS: dict[str, DatasetSettings] = {
    "pannuke": DatasetSettings(space=8, num_levels=3, num_classes=5, nms_radius_px=12, filtering=False),
    "kumar": DatasetSettings(space=16, num_levels=4, num_classes=1, nms_radius_px=11, filtering=True),
    "cpm17": DatasetSettings(space=16, num_levels=4, num_classes=1, nms_radius_px=12, filtering=True),
}

_BLOCK = re.compile(r"^backbone\.backbone\.stages\.(\d+)\.blocks\.(\d+)\.conv_dw\.weight$")
_FPN_CONV = re.compile(r"^backbone\.neck\.fpn_convs\.(\d+)\.conv\.weight$")


def read_checkpoint(pth: str | Path, *, use_ema: bool = True) -> dict[str, Any]:
    """The prompter state dict inside a PromptNucSeg checkpoint (tensors by name)."""
    import argparse

    import torch

    pth = Path(pth)
    if not pth.is_file():
        raise FileNotFoundError(f"{pth}: no such checkpoint file")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            ckpt = torch.load(pth, map_location="cpu", weights_only=True)
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(
            f"{pth}: not a readable PyTorch checkpoint with plain tensors ({reason}); "
            "re-save only its state dict (torch.save(ckpt['model'], path))"
        ) from exc
    if not isinstance(ckpt, dict):
        raise ValueError(f"{pth}: expected a dict checkpoint, got {type(ckpt).__name__}")
    if use_ema and isinstance(ckpt.get("model_ema"), dict):
        state = ckpt["model_ema"]
    elif isinstance(ckpt.get("model"), dict):
        state = ckpt["model"]
    elif ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        state = ckpt
    else:
        raise ValueError(f"{pth}: no 'model' state dict in the checkpoint (keys: {sorted(ckpt)[:8]})")
    for prefix in ("module.", "ema."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    if not any(k.startswith("backbone.backbone.") for k in state):
        raise ValueError(
            f"{pth}: not a PromptNucSeg prompter checkpoint (no 'backbone.backbone.*' keys; "
            f"first keys {sorted(state)[:3]})"
        )
    return dict(state)


def infer_architecture(state: dict[str, Any], *, where: str) -> dict[str, Any]:
    """depths, dims, num_levels, num_classes, hidden_dim of a prompter state dict."""
    try:
        blocks: dict[int, int] = {}
        dims: dict[int, int] = {}
        for key, value in state.items():
            match = _BLOCK.match(key)
            if match:
                stage, block = int(match[1]), int(match[2])
                blocks[stage] = max(blocks.get(stage, 0), block + 1)
                dims[stage] = int(value.shape[0])
        levels = [int(m[1]) for m in map(_FPN_CONV.match, state) if m]
        hidden = int(state["conv.weight"].shape[0])
        num_classes = int(state["cls_head.layers.3.weight"].shape[0]) - 1
    except KeyError as exc:
        raise ValueError(f"{where}: the prompter checkpoint lacks {exc.args[0]!r}") from None
    if sorted(blocks) != [0, 1, 2, 3]:
        raise ValueError(f"{where}: expected 4 ConvNeXt stages, found stages {sorted(blocks)}")
    num_levels = max(levels) + 1 if levels else 0
    if not 1 <= num_levels <= 4 or int(state["conv.weight"].shape[1]) != hidden * num_levels:
        raise ValueError(
            f"{where}: FPN levels ({num_levels}) disagree with conv.weight "
            f"{tuple(state['conv.weight'].shape)}"
        )
    return {
        "depths": [blocks[i] for i in range(4)],
        "dims": [dims[i] for i in range(4)],
        "num_levels": num_levels,
        "num_classes": num_classes,
        "hidden_dim": hidden,
    }


def convert_promptnucseg_prompter(
    pth: str | Path,
    out_dir: str | Path,
    *,
    name: str,
    dataset: str = "pannuke",
    mpp: float = 0.25,
    segmentor_bundle: str | Path | None = None,
    use_ema: bool = True,
) -> Path:
    """Write a bundle with the prompter of `pth` (and the segmentor of `segmentor_bundle`).

    dataset: "pannuke", "kumar" or "cpm17", the data the checkpoint was trained on; it sets the
    anchor spacing, NMS radius and mask filtering, and must agree with the checkpoint's classes
    and FPN levels.  mpp: micrometres per pixel of the training images (0.25 for PanNuke /
    Kumar / CPM-17 at 40x).  Returns the bundle path.
    """
    from wsiseg.models.bundles import write_bundle
    from wsiseg.models.prompters.dpa_p2pnet import DPAP2PNet
    from wsiseg.models.prompters.point import load_state, model_config_from_dict

    if dataset not in DATASET_SETTINGS:
        raise ValueError(f"dataset must be one of {sorted(DATASET_SETTINGS)}, got {dataset!r}")
    if mpp <= 0:
        raise ValueError(f"mpp must be > 0, got {mpp}")
    settings = DATASET_SETTINGS[dataset]
    state = read_checkpoint(pth, use_ema=use_ema)
    where = str(pth)
    arch = infer_architecture(state, where=where)
    if (arch["num_classes"], arch["num_levels"]) != (settings.num_classes, settings.num_levels):
        raise ValueError(
            f"{where}: the checkpoint has {arch['num_classes']} classes and {arch['num_levels']} FPN levels, "
            f"but dataset={dataset!r} models have {settings.num_classes} and {settings.num_levels}; "
            "pass the dataset the checkpoint was trained on"
        )
    state = {k: v.detach().contiguous() for k, v in state.items()}
    config = {
        **arch,
        "space": settings.space,
        "filtering": settings.filtering,
        "context_px": DEFAULT_CONTEXT_PX,
        "source": f"PromptNucSeg prompter {Path(pth).name} ({dataset})",
    }
    model = DPAP2PNet(model_config_from_dict(config, where=where))
    load_state(model, state, where=where)  # strict: every key used, every shape right
    classes = default_classes(arch["num_classes"])
    manifest: dict[str, Any] = {
        "format": "wsiseg-bundle/1",
        "name": name,
        "version": "1.0",
        "description": f"PromptNucSeg DPA-P2PNet prompter trained on {dataset}",
        "mpp": float(mpp),
        "input_size": None,
        "normalisation": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
        "k_negatives": 0,
        "nms_radius_px": settings.nms_radius_px,
        "max_nucleus_diameter_px": 64,
        "classes": [{"id": c.id, "name": c.name, "color": list(c.color)} for c in classes],
        "components": {"prompter": {"architecture": "dpa_p2pnet", "config": config}},
    }
    weights: dict[str, dict[str, Any]] = {"prompter": model.state_dict()}
    if segmentor_bundle is not None:
        _add_segmentor(manifest, weights, segmentor_bundle)
    bundle = write_bundle(out_dir, manifest, weights)
    logger.info("wrote prompter bundle %s from %s", bundle.path, pth)
    return Path(bundle.path)


def _add_segmentor(manifest: dict[str, Any], weights: dict[str, dict[str, Any]], source: str | Path) -> None:
    """Copy the segmentor component (and its bundle-level settings) of another bundle."""
    from wsiseg.models.bundles import BundleError, open_bundle

    other = open_bundle(source)
    if not other.has("segmentor"):
        raise BundleError(f"{other.path}: segmentor_bundle has no 'segmentor' component")
    if abs(float(other.manifest.mpp) - float(manifest["mpp"])) > 1e-6:
        raise BundleError(
            f"{other.path}: the segmentor was trained at {other.manifest.mpp} mpp but the prompter at "
            f"{manifest['mpp']} mpp; pass mpp={other.manifest.mpp} or a matching segmentor bundle"
        )
    seg = other.manifest.components["segmentor"]
    manifest["components"]["segmentor"] = {"architecture": seg.architecture, "config": dict(seg.config)}
    for key in ("input_size", "k_negatives", "max_nucleus_diameter_px"):
        manifest[key] = getattr(other.manifest, key)
    weights["segmentor"] = other.load_weights("segmentor")
