"""Convert SAM checkpoints (official `sam_vit_{b,l,h}_*.pth`, PromptNucSeg segmentors) into bundles.

Accepted inputs, all read with `torch.load(weights_only=True)` (a pickle that would build any
other Python object, let alone run code, is refused) or as safetensors:

- an official SAM release file: a plain state dict with the official keys;
- a PromptNucSeg segmentor checkpoint: a dict whose "model" entry is such a state dict
  (its other entries, e.g. epoch or optimizer state, are ignored);
- either of them with LoRA adapter keys (see `wsiseg.models.sam.lora`), given the LoRA
  alpha, which is not stored in the tensors.

The variant is detected from the tensor shapes and the state dict must then match it
exactly (strict key and shape match).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from wsiseg.models.sam.build import (
    SAM_ARCHITECTURES,
    SAM_PIXEL_MEAN,
    SAM_PIXEL_STD,
    build_sam,
    check_state_dict,
    detect_variant,
)
from wsiseg.models.sam.lora import LoraConfig, apply_lora, fresh_lora_state, lora_rank_of

logger = logging.getLogger(__name__)


def read_sam_checkpoint(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The SAM state dict (official keys, maybe plus LoRA keys) in a .pth/.pt or .safetensors file, on the CPU.

    Raises FileNotFoundError for a missing file and ValueError (naming the file) for anything
    that is not a plain tensor state dict, including pickles holding other Python objects.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"SAM checkpoint {path}: no such file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            obj: Any = load_file(str(path), device="cpu")
        except Exception as exc:  # safetensors raises several types for a bad header
            raise ValueError(f"SAM checkpoint {path}: not a readable safetensors file ({exc})") from exc
    else:
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:  # UnpicklingError for code-running pickles, others for garbage
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ValueError(
                f"refused to load SAM checkpoint {path}: it is not a plain tensor checkpoint ({reason}); "
                "only state dicts of tensors are read, never arbitrary pickled objects"
            ) from exc
    if isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping):
        obj = obj["model"]  # PromptNucSeg: {"model": state_dict, "epoch": ..., ...}
    if not isinstance(obj, Mapping) or not obj:
        raise ValueError(f"SAM checkpoint {path}: expected a state dict (or a dict with a 'model' state dict)")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"SAM checkpoint {path}: entries {bad[:5]} are not tensors; expected a state dict")
    state = dict(obj)
    if all(k.startswith("module.") for k in state):  # saved from DistributedDataParallel
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def resolve_variant(state: Mapping[str, torch.Tensor], variant: str | None, *, source: str) -> str:
    """`variant` checked against the state dict's shapes, or detected from them when None."""
    if variant is not None and variant not in SAM_ARCHITECTURES:
        raise ValueError(f"{source}: unknown SAM variant {variant!r}; choose one of {sorted(SAM_ARCHITECTURES)}")
    try:
        detected = detect_variant(state)
    except ValueError as exc:
        raise ValueError(f"{source}: {exc}") from None
    if variant is not None and variant != detected:
        raise ValueError(f"{source}: the weights are a SAM {detected}, not {variant}; pass variant={detected!r}")
    return detected


def check_lora(state: Mapping[str, torch.Tensor], lora: LoraConfig | None, *, source: str) -> bool:
    """True when the state dict holds LoRA adapters; then `lora` must be given with their rank."""
    rank = lora_rank_of(state)
    if rank is None:
        return False
    if lora is None:
        raise ValueError(f"{source} has LoRA adapters (rank {rank}); pass lora=LoraConfig(rank={rank}, alpha=...)")
    if rank != lora.rank:
        raise ValueError(f"{source} has LoRA adapters of rank {rank}, but lora.rank is {lora.rank}")
    return True


def convert_sam_checkpoint(
    pth_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    name: str,
    mpp: float = 0.25,
    input_size: int = 256,
    k_negatives: int = 0,
    lora: LoraConfig | None = None,
    variant: str | None = None,
    negatives_mode: str = "with",
    max_nucleus_diameter_px: int = 64,
    description: str = "",
    lora_seed: int = 0,
) -> Path:
    """Write a segmentor bundle from a SAM checkpoint; returns the bundle folder.

    mpp: micrometres per pixel the weights were trained at (PromptNucSeg: 0.25 for PanNuke,
    Kumar and CPM-17 at 40x).  input_size: the tile size to run at (256 for PromptNucSeg
    segmentors; 1024 for stock SAM used as in its release).  k_negatives and negatives_mode:
    PromptNucSeg uses 0 / "with", except its CPM-17 ViT-H (1 / "best_of_both").
    lora: when the checkpoint holds LoRA adapters, their rank and alpha (required, alpha is
    not stored); when it holds none, fresh adapters (B = 0, so outputs are unchanged) are
    added so the bundle is ready for LoRA fine-tuning.
    """
    from wsiseg.models.bundles import sha256_of_file, write_bundle
    from wsiseg.models.sam.segmentor import NEGATIVES_MODES

    if negatives_mode not in NEGATIVES_MODES:
        raise ValueError(f"negatives_mode must be one of {NEGATIVES_MODES}, got {negatives_mode!r}")

    pth_path = Path(pth_path)
    source = f"SAM checkpoint {pth_path}"
    state = read_sam_checkpoint(pth_path)
    variant = resolve_variant(state, variant, source=source)
    arch = SAM_ARCHITECTURES[variant]
    if not check_lora(state, lora, source=source) and lora is not None:
        state.update(fresh_lora_state(arch.embed_dim, arch.depth, lora, seed=lora_seed))
        logger.info("added fresh LoRA adapters (rank %d, alpha %g) to %s", lora.rank, lora.alpha, pth_path)

    with torch.device("meta"):  # shapes only: no memory for a second copy of the weights
        reference = build_sam(variant, input_size=input_size)
        if lora is not None:
            apply_lora(reference, lora.rank, lora.alpha)
    check_state_dict(reference, state, source=source)

    config: dict[str, Any] = {"variant": variant, "negatives_mode": negatives_mode}
    if lora is not None:
        config["lora"] = lora.to_dict()
    manifest = {
        "name": name,
        "version": "1.0",
        "description": description or f"SAM {variant} segmentor converted from {pth_path.name}",
        "mpp": mpp,
        "input_size": input_size,
        "normalisation": {"mean": list(SAM_PIXEL_MEAN), "std": list(SAM_PIXEL_STD)},
        "k_negatives": k_negatives,
        "max_nucleus_diameter_px": max_nucleus_diameter_px,
        "components": {"segmentor": {"architecture": "sam", "config": config}},
        "converted_from": {"file": pth_path.name, "sha256": sha256_of_file(pth_path)},
    }
    bundle = write_bundle(out_dir, manifest, {"segmentor": state})
    logger.info("converted %s (SAM %s) into bundle %s", pth_path, variant, bundle.path)
    return Path(bundle.path)
