"""SAM as wsiseg's segmentor: SAM's own modules (from `segment_anything`), run at 256 px from
1024-format weights, with optional LoRA and a converter for official checkpoints.

Names load lazily, so `import wsiseg.models.sam` does not import torch:

    from wsiseg.models.sam import SamSegmentor
    seg = SamSegmentor.from_bundle("pannuke-vit_b/")          # or .from_checkpoint("sam_vit_b_01ec64.pth")
    logits, iou = seg.predict(tile, points, labels)            # (P, H, W) float32, (P,)
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {
    "SamSegmentor": "segmentor",
    "NEGATIVES_MODES": "segmentor",
    "resolve_device": "segmentor",
    "SamModel": "build",
    "SamArchitecture": "build",
    "SAM_ARCHITECTURES": "build",
    "SAM_PIXEL_MEAN": "build",
    "SAM_PIXEL_STD": "build",
    "build_sam": "build",
    "detect_variant": "build",
    "load_sam_weights": "build",
    "LoraConfig": "lora",
    "LoraQkvLinear": "lora",
    "apply_lora": "lora",
    "merge_lora": "lora",
    "has_lora": "lora",
    "lora_parameters": "lora",
    "convert_sam_checkpoint": "convert",
    "read_sam_checkpoint": "convert",
    "import_sam_modeling": "loading",
}

__all__ = [
    "NEGATIVES_MODES",
    "SAM_ARCHITECTURES",
    "SAM_PIXEL_MEAN",
    "SAM_PIXEL_STD",
    "LoraConfig",
    "LoraQkvLinear",
    "SamArchitecture",
    "SamModel",
    "SamSegmentor",
    "apply_lora",
    "build_sam",
    "convert_sam_checkpoint",
    "detect_variant",
    "has_lora",
    "import_sam_modeling",
    "load_sam_weights",
    "lora_parameters",
    "merge_lora",
    "read_sam_checkpoint",
    "resolve_device",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
