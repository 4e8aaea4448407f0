"""SAM as wsiseg's segmentor: SAM's own modules (from `segment_anything`), run at 256 px from
1024-format weights, with optional LoRA and a converter for official checkpoints.

Names load lazily, so `import wsiseg.models.sam` does not import torch:

    from wsiseg.models.sam import SamSegmentor
    seg = SamSegmentor.from_bundle("pannuke-vit_b/")          # or .from_checkpoint("sam_vit_b_01ec64.pth")
    logits, iou = seg.predict(tile, points, labels)            # (P, H, W) float32, (P,)
"""

from __future__ import annotations


from wsiseg._lazy import lazy_attributes

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


__getattr__, __dir__ = lazy_attributes(
    __name__, {k: f"{__name__}.{v}" for k, v in _EXPORTS.items()}, globals(), __all__
)