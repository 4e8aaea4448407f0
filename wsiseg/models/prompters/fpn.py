"""Feature pyramid neck as PromptNucSeg's prompter builds it (mmdet's FPN, no norms, no activations).

Lateral 1x1 convs exist for every input level; 3x3 output convs only for the first `num_outs`
levels; the top-down path adds each level, nearest-upsampled to the size of the level below.
No extra levels are ever built.  Each conv is a plain Conv2d with bias stored under `.conv`
(the layout of mmcv's ConvModule without norm or activation), so the parameter names are
`lateral_convs.i.conv.{weight,bias}` and `fpn_convs.i.conv.{weight,bias}`.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class ConvUnit(nn.Module):
    """A Conv2d with bias, held as `.conv` (mmcv ConvModule with norm_cfg=None, act_cfg=None)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class FPN(nn.Module):
    """Maps L backbone maps (finest first) to `num_outs` maps of `out_channels`, finest first.

    inputs[i]: (B, in_channels[i], H_i, W_i); outputs[i]: (B, out_channels, H_i, W_i) for
    i < num_outs.
    """

    def __init__(self, in_channels: Sequence[int], out_channels: int, num_outs: int) -> None:
        super().__init__()
        if not 1 <= num_outs <= len(in_channels):
            raise ValueError(f"FPN num_outs must be in 1..{len(in_channels)}, got {num_outs}")
        self.in_channels = tuple(int(c) for c in in_channels)
        self.num_outs = int(num_outs)
        self.lateral_convs = nn.ModuleList([ConvUnit(c, out_channels, 1) for c in self.in_channels])
        self.fpn_convs = nn.ModuleList([ConvUnit(out_channels, out_channels, 3) for _ in range(num_outs)])

    def forward(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if len(inputs) != len(self.lateral_convs):
            raise ValueError(f"FPN expects {len(self.lateral_convs)} input maps, got {len(inputs)}")
        laterals = [conv(x) for conv, x in zip(self.lateral_convs, inputs, strict=True)]
        for i in range(len(laterals) - 1, 0, -1):
            below = laterals[i - 1]
            laterals[i - 1] = below + F.interpolate(laterals[i], size=below.shape[-2:], mode="nearest")
        return [self.fpn_convs[i](laterals[i]) for i in range(self.num_outs)]
