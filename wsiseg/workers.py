"""What a worker process keeps between tasks: models and open slides, built once each.

Tasks carry specs (names and paths, cheap to ship), not models or readers; `spec.load()` /
`spec.open()` build the object on first use in a process and reuse it afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from wsiseg.models.protocols import Prompter, Segmentor

@dataclass(frozen=True)
class ModelSpec:
    """How a worker builds the models: names/paths, not objects (cheap to ship)."""

    model: str
    prompter: str | None
    device: str
    k_negatives: int | None
    prompter_options: tuple[tuple[str, Any], ...] = ()

    def load(self) -> tuple[Prompter | None, Segmentor]:
        key = ("models", self)
        if key not in WORKER_CACHE:
            WORKER_CACHE[key] = _load_models(self)
        return WORKER_CACHE[key]


def _load_models(spec: ModelSpec) -> tuple[Prompter | None, Segmentor]:
    from wsiseg.models import load_prompter, load_segmentor

    segmentor = load_segmentor(spec.model, device=spec.device, k_negatives=spec.k_negatives)
    prompter_name = spec.prompter or spec.model
    if spec.prompter is None and not _has_prompter(spec.model):
        return None, segmentor  # a segmentor-only model: prompts come from --prompter or --prompts
    prompter = load_prompter(prompter_name, device=spec.device, **dict(spec.prompter_options))
    if abs(prompter.mpp - segmentor.mpp) > 0.02 * segmentor.mpp:
        from wsiseg.models.classical import ClassicalPrompter, ClassicalSegmentor

        # the classical models' sizes are in µm: they adapt to a learned partner's resolution
        if isinstance(prompter, ClassicalPrompter):
            prompter = replace(prompter, mpp=segmentor.mpp)
        elif isinstance(segmentor, ClassicalSegmentor):
            segmentor = replace(segmentor, mpp=prompter.mpp)
        else:
            raise ValueError(
                f"prompter {prompter_name!r} works at {prompter.mpp} µm/px but segmentor {spec.model!r} at "
                f"{segmentor.mpp} µm/px; use models made for the same resolution"
            )
    return prompter, segmentor


def _has_prompter(model: str) -> bool:
    from wsiseg.models.bundles import open_bundle
    from wsiseg.models.cache import resolve_model

    target = resolve_model(model)
    if target == "classical":
        return True
    if target.is_file() and target.suffix.lower() in (".pth", ".pt"):
        return False  # a raw SAM checkpoint
    return open_bundle(target).has("prompter")


WORKER_CACHE: dict[Any, Any] = {}


@dataclass(frozen=True)
class SlideSpec:
    """How a worker opens the slide at the working mpp."""

    path: Path
    mpp_override: float | None
    target_mpp: float

    def open(self) -> Any:
        key = ("slide", self)
        if key not in WORKER_CACHE:
            from wsiseg.readers import open_slide
            from wsiseg.readers.scaled import ScaledSlide

            reader = open_slide(self.path, mpp=self.mpp_override)
            WORKER_CACHE[key] = ScaledSlide(reader, self.target_mpp)
        return WORKER_CACHE[key]
