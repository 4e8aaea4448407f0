"""Nucleus models: the prompter/segmentor protocols, bundles, the model cache and loaders.

    from wsiseg.models import load_prompter, load_segmentor
    prompter = load_prompter("pannuke123-vit_b")          # a cached bundle, a path, or "classical"
    segmentor = load_segmentor("bundle.zip", input_size=256, device="cuda")

`import wsiseg.models` is cheap: nothing here imports torch, and every name below is
loaded on first use.
"""

from __future__ import annotations

import importlib

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wsiseg._lazy import lazy_attributes

if TYPE_CHECKING:
    from wsiseg.models.bundles import (
        Bundle,
        BundleError,
        Component,
        Manifest,
        open_bundle,
        verify_bundle,
        write_bundle,
    )
    from wsiseg.models.cache import ModelNotFoundError, import_bundle, list_bundles, resolve_model
    from wsiseg.models.protocols import NucleusClass, PointSet, PromptBatch, Prompter, Segmentor, TileMasks
    from wsiseg.models.pull import KNOWN_MODELS, PullError, pull

_LAZY: dict[str, str] = {
    **dict.fromkeys(
        ("NucleusClass", "PointSet", "PromptBatch", "Prompter", "Segmentor", "TileMasks"), "wsiseg.models.protocols"
    ),
    **dict.fromkeys(
        ("Bundle", "BundleError", "Component", "Manifest", "open_bundle", "verify_bundle", "write_bundle"),
        "wsiseg.models.bundles",
    ),
    **dict.fromkeys(("ModelNotFoundError", "import_bundle", "list_bundles", "resolve_model"), "wsiseg.models.cache"),
    **dict.fromkeys(("KNOWN_MODELS", "PullError", "pull"), "wsiseg.models.pull"),
}

__all__ = [
    "KNOWN_MODELS",
    "Bundle",
    "BundleError",
    "Component",
    "Manifest",
    "ModelNotFoundError",
    "NucleusClass",
    "PointSet",
    "PromptBatch",
    "Prompter",
    "PullError",
    "Segmentor",
    "TileMasks",
    "check_network_options",
    "has_prompter",
    "import_bundle",
    "list_bundles",
    "load_prompter",
    "load_segmentor",
    "model_info",
    "open_bundle",
    "pull",
    "resolve_model",
    "takes_tta",
    "verify_bundle",
    "write_bundle",
]

#: segmentor architecture -> (module, class) whose `from_bundle` builds it.
SEGMENTOR_BUILDERS: dict[str, tuple[str, str]] = {
    "sam": ("wsiseg.models.sam", "SamSegmentor"),
    "tiny_segmentor": ("wsiseg.models.tiny", "TinySegmentor"),
}
#: prompter architecture -> (module, class) whose `from_bundle` builds it.
PROMPTER_BUILDERS: dict[str, tuple[str, str]] = {
    "dpa_p2pnet": ("wsiseg.models.prompters", "PointPrompter"),
    "unet_prompter": ("wsiseg.models.prompters", "ProbabilityPrompter"),
    "tiny_prompter": ("wsiseg.models.tiny", "TinyPrompter"),
}
_CHECKPOINT_SUFFIXES = (".pth", ".pt")
#: architectures that take tta=True (test-time augmentation: dense maps averaged over flips)
TTA_ARCHITECTURES = ("tiny_segmentor", "tiny_prompter")


def takes_tta(path_or_name: str | os.PathLike[str], role: str) -> bool:
    """Whether the model's `role` ("segmentor" or "prompter") component takes tta=True."""
    from wsiseg.models.bundles import open_bundle
    from wsiseg.models.cache import resolve_model

    target = resolve_model(path_or_name)
    if target == "classical" or target.is_file() and target.suffix.lower() in _CHECKPOINT_SUFFIXES:
        return False
    bundle = open_bundle(target)
    return bundle.has(role) and bundle.component(role).architecture in TTA_ARCHITECTURES


def has_prompter(path_or_name: str | os.PathLike[str]) -> bool:
    """Whether the model brings its own prompter ("classical" and bundles with a "prompter"
    component do; segmentor-only bundles and raw SAM checkpoints do not)."""
    from wsiseg.models.bundles import open_bundle
    from wsiseg.models.cache import resolve_model

    target = resolve_model(path_or_name)
    if target == "classical":
        return True
    if target.is_file() and target.suffix.lower() in _CHECKPOINT_SUFFIXES:
        return False  # a raw SAM checkpoint
    return open_bundle(target).has("prompter")


def _require_tta(name: str | os.PathLike[str], target: Any, role: str, option: str = "--tta") -> None:
    """ValueError unless the model's `role` component is a dense-map network (`takes_tta`), the
    only kind that takes --tta and --precision."""
    if not takes_tta(target, role):
        what = {
            "--tta": "averages the dense maps of a wsiseg-tiny-type network over flips",
            "--precision": "sets the arithmetic of a wsiseg-tiny-type network",
        }[option]
        raise ValueError(f"{option} {what}; model {str(name)!r} has no such {role}: run it without {option}")


def check_network_options(model: str, prompter: str | None, *, tta: bool = False, precision: str | None = None) -> None:
    """ValueError, one line naming the option, when --tta or --precision cannot apply to a run of
    `model` with `prompter` (None: the model's own): --tta needs a dense-map (wsiseg-tiny-type)
    segmentor, --precision such a segmentor or prompter."""
    if tta:
        _require_tta(model, model, "segmentor")
    if precision is None or takes_tta(model, "segmentor"):
        return
    if (prompter is not None or has_prompter(model)) and takes_tta(prompter or model, "prompter"):
        return
    raise ValueError(
        f"--precision sets the arithmetic of a wsiseg-tiny-type network; neither model {model!r} nor its "
        "prompter has one: run it without --precision"
    )


__getattr__, __dir__ = lazy_attributes(__name__, _LAZY, globals(), __all__)


def _builder(table: dict[str, tuple[str, str]], architecture: str) -> Any:
    module, cls = table[architecture]
    return getattr(importlib.import_module(module), cls)


def load_segmentor(
    path_or_name: str | os.PathLike[str],
    *,
    input_size: int | None = None,
    device: str = "cpu",
    k_negatives: int | None = None,
    tta: bool = False,
    precision: str | None = None,
) -> Segmentor:
    """The segmentor of a bundle (folder, .zip or cached name), of "classical", or of a raw
    SAM .pth checkpoint (official or PromptNucSeg).

    input_size: tile px the model runs at (None: the bundle's); k_negatives: negatives per
    prompt (None: the bundle's); device: "cpu", "cuda" or "auto" (ignored by "classical");
    tta: test-time augmentation, for the architectures in `TTA_ARCHITECTURES` (ValueError for others);
    precision: "auto", "fp32" or "bf16" for those architectures (None: the bundle's own;
    `wsiseg.models.tiny.maps.resolve_precision`; ValueError for others).
    """
    from wsiseg.models.bundles import open_bundle
    from wsiseg.models.cache import resolve_model

    target = resolve_model(path_or_name)
    if tta:  # only a bundle's tiny segmentor takes it: the branches below for others are not reached
        _require_tta(path_or_name, target, "segmentor")
    if precision is not None:
        _require_tta(path_or_name, target, "segmentor", "--precision")
    if target == "classical":
        from wsiseg.models.classical import ClassicalSegmentor

        return ClassicalSegmentor() if k_negatives is None else ClassicalSegmentor(k_negatives=k_negatives)
    options = {k: v for k, v in (("input_size", input_size), ("k_negatives", k_negatives)) if v is not None}
    if target.is_file() and target.suffix.lower() in _CHECKPOINT_SUFFIXES:
        from wsiseg.models.sam import SamSegmentor

        return SamSegmentor.from_checkpoint(target, device=device, **options)  # type: ignore[no-any-return]
    bundle = open_bundle(target)
    cls = _builder(SEGMENTOR_BUILDERS, bundle.component("segmentor").architecture)
    extra: dict[str, Any] = {"tta": True} if tta else {}
    if precision is not None:
        extra["precision"] = precision
    return cls.from_bundle(  # type: ignore[no-any-return]
        bundle, input_size=input_size, device=device, k_negatives=k_negatives, **extra
    )


def load_prompter(path_or_name: str | os.PathLike[str], *, device: str = "cpu", **options: Any) -> Prompter:
    """The prompter of a bundle (folder, .zip or cached name) or of "classical".

    options: passed to the model's builder (e.g. selection= for "unet_prompter", tta=True or
    precision= for the architectures in `TTA_ARCHITECTURES` (ValueError for others); the
    ClassicalPrompter's parameters for "classical").
    """
    from wsiseg.models.bundles import BundleError, open_bundle
    from wsiseg.models.cache import resolve_model

    target = resolve_model(path_or_name)
    if options.get("tta"):
        _require_tta(path_or_name, target, "prompter")
    if options.get("precision") is not None:
        _require_tta(path_or_name, target, "prompter", "--precision")
    if target == "classical":
        from wsiseg.models.classical import ClassicalPrompter

        return ClassicalPrompter(**options)
    if target.is_file() and target.suffix.lower() in _CHECKPOINT_SUFFIXES:
        raise BundleError(
            f"model {target}: a raw .pth checkpoint is not a prompter bundle; convert it with "
            "`wsiseg models import promptnucseg PROMPTER.pth SEGMENTOR.pth -o BUNDLE`"
        )
    bundle = open_bundle(target)
    cls = _builder(PROMPTER_BUILDERS, bundle.component("prompter").architecture)
    return cls.from_bundle(bundle, device=device, **options)  # type: ignore[no-any-return]


def model_info(path_or_name: str | os.PathLike[str]) -> dict[str, Any]:
    """A JSON-ready summary of a model: its manifest (architecture, mpp, input size, classes,
    ...), weight file sizes and sha256, and where it came from (source.json) when pulled."""
    from wsiseg.models.bundles import open_bundle, sha256_of_file
    from wsiseg.models.cache import BUILTIN_MODELS, resolve_model

    target = resolve_model(path_or_name)
    if target == "classical":
        return {"name": "classical", "builtin": True, "description": BUILTIN_MODELS["classical"]}
    if target.is_file() and target.suffix.lower() in _CHECKPOINT_SUFFIXES:
        return {
            "name": target.stem,
            "kind": "sam-checkpoint",
            "path": str(target),
            "size_bytes": target.stat().st_size,
            "sha256": sha256_of_file(target),
        }
    bundle = open_bundle(target)
    info = bundle.manifest.to_dict()
    info.pop("format")
    for role, comp in info["components"].items():
        comp["size_bytes"] = bundle.weights_path(role).stat().st_size
    info.update(kind="bundle", path=str(bundle.path), bundle_sha256=bundle.sha256)
    source = Path(bundle.root) / "source.json"
    if source.is_file():
        info["source"] = json.loads(source.read_text(encoding="utf-8"))
    return info
