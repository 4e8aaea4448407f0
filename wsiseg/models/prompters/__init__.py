"""Prompters: models that propose one point per nucleus, and prompts read from files.

- `PointPrompter`: PromptNucSeg's DPA-P2PNet (ConvNeXt + FPN, anchor points, point NMS).
- `ProbabilityPrompter`: Segment Any Cell's UNet probability map, points by component
  centroids or thresholded sampling.
- `read_prompt_file`: user points from CSV/TSV or GeoJSON, in level-0 px.
- `convert_promptnucseg_prompter`: PromptNucSeg's released prompter .pth -> bundle.

Names load lazily, so importing this package does not import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from wsiseg._lazy import lazy_attributes

if TYPE_CHECKING:
    from wsiseg.models.prompters.convert import convert_promptnucseg_prompter
    from wsiseg.models.prompters.file_prompts import read_prompt_file
    from wsiseg.models.prompters.point import PANNUKE_CLASSES, PointPrompter
    from wsiseg.models.prompters.point_nms import point_nms
    from wsiseg.models.prompters.probability import PointSelection, ProbabilityPrompter

_LAZY = {
    "PointPrompter": "wsiseg.models.prompters.point",
    "PANNUKE_CLASSES": "wsiseg.models.prompters.point",
    "ProbabilityPrompter": "wsiseg.models.prompters.probability",
    "PointSelection": "wsiseg.models.prompters.probability",
    "read_prompt_file": "wsiseg.models.prompters.file_prompts",
    "point_nms": "wsiseg.models.prompters.point_nms",
    "convert_promptnucseg_prompter": "wsiseg.models.prompters.convert",
}

__all__ = [
    "PANNUKE_CLASSES",
    "PointPrompter",
    "PointSelection",
    "ProbabilityPrompter",
    "convert_promptnucseg_prompter",
    "point_nms",
    "read_prompt_file",
]


__getattr__, __dir__ = lazy_attributes(__name__, _LAZY, globals(), __all__)