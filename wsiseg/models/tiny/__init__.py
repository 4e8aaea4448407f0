"""wsiseg-tiny: a compact learned prompter + promptable segmentor for CPUs.

One small UNet (`wsiseg.models.prompters.unet.UNet`, 3 output maps) predicts, per pixel, the
nuclear foreground probability, a centre heatmap and a normalised distance-to-boundary map
(the targets are defined in `wsiseg.training.targets`).  The prompter takes one point per
peak of the centre heatmap; the segmentor turns every prompt (and its negatives) into a mask
by a seeded watershed of the distance map inside the foreground, one seed per prompt.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from wsiseg._lazy import lazy_attributes

if TYPE_CHECKING:
    from wsiseg.models.tiny.maps import DenseMapNet, MapSettings
    from wsiseg.models.tiny.prompter import TinyPrompter
    from wsiseg.models.tiny.segmentor import TinySegmentor

_LAZY = {
    "DenseMapNet": "wsiseg.models.tiny.maps",
    "MapSettings": "wsiseg.models.tiny.maps",
    "TinyPrompter": "wsiseg.models.tiny.prompter",
    "TinySegmentor": "wsiseg.models.tiny.segmentor",
}
__all__ = list(_LAZY)
__getattr__, __dir__ = lazy_attributes(__name__, _LAZY, globals(), __all__)
