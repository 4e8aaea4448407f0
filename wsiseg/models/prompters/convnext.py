"""ConvNeXt feature extractor with timm's parameter names, returning the four stage outputs.

PromptNucSeg's prompter uses timm's ConvNeXt (head removed) as its backbone.  timm cannot
always be imported (it needs torchvision), so this module re-implements the network with the
same parameter names, which lets released checkpoints load strictly:

    stem.0 (Conv2d 3->C0, 4x4, stride 4), stem.1 (LayerNorm2d)
    stages.i.downsample.0 (LayerNorm2d), stages.i.downsample.1 (Conv2d 2x2, stride 2), i >= 1
    stages.i.blocks.j.{conv_dw (7x7 depthwise), norm (LayerNorm), mlp.fc1, mlp.fc2, gamma}

Input (B, 3, H, W) float32, normalised; outputs (B, C_i, H / s_i, W / s_i) for strides
s = 4, 8, 16, 32 (floored when H, W are not multiples of 32).  LayerNorm eps is 1e-6 as in
timm.  With `implementation="timm"` the stem and stages come from timm itself (same names).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

#: name -> (blocks per stage, channels per stage); the first two are ConvNeXt-T/S (Liu et al.
#: 2022), "convnext_test" is a tiny configuration for tests.
CONVNEXT_SIZES: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "convnext_tiny": ((3, 3, 9, 3), (96, 192, 384, 768)),
    "convnext_small": ((3, 3, 27, 3), (96, 192, 384, 768)),
    "convnext_base": ((3, 3, 27, 3), (128, 256, 512, 1024)),
    "convnext_test": ((1, 1, 1, 1), (8, 16, 32, 64)),
}

_LN_EPS = 1e-6


@dataclass(frozen=True)
class ConvNeXtConfig:
    """Blocks and channels per stage (four stages)."""

    depths: tuple[int, ...]
    dims: tuple[int, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "depths", tuple(int(d) for d in self.depths))
        object.__setattr__(self, "dims", tuple(int(d) for d in self.dims))
        if len(self.depths) != 4 or len(self.dims) != 4:
            raise ValueError(f"ConvNeXt needs 4 stages, got depths {self.depths} and dims {self.dims}")
        if min(self.depths) < 1 or min(self.dims) < 1:
            raise ValueError(f"ConvNeXt depths and dims must be >= 1, got {self.depths}, {self.dims}")

    @classmethod
    def named(cls, name: str) -> ConvNeXtConfig:
        if name not in CONVNEXT_SIZES:
            raise ValueError(f"unknown ConvNeXt size {name!r}; choose one of {sorted(CONVNEXT_SIZES)}")
        depths, dims = CONVNEXT_SIZES[name]
        return cls(depths, dims)

    @property
    def size_name(self) -> str | None:
        """The registry name of this configuration, or None when it has none."""
        for name, (depths, dims) in CONVNEXT_SIZES.items():
            if depths == self.depths and dims == self.dims:
                return name
        return None


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a (B, C, H, W) tensor."""

    def __init__(self, channels: int) -> None:
        super().__init__(channels, eps=_LN_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class _Mlp(nn.Module):
    """fc1 -> GELU -> fc2 on channels-last input."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class ConvNeXtBlock(nn.Module):
    """7x7 depthwise conv, LayerNorm, MLP (x4), layer scale `gamma`, residual."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv_dw = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=_LN_EPS)
        self.mlp = _Mlp(dim, 4 * dim)
        self.gamma = nn.Parameter(torch.full((dim,), 1e-6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv_dw(x).permute(0, 2, 3, 1)
        y = self.mlp(self.norm(y)) * self.gamma
        return x + y.permute(0, 3, 1, 2)


class ConvNeXtStage(nn.Module):
    """Optional downsample (LayerNorm2d + 2x2 stride-2 conv), then `depth` blocks."""

    def __init__(self, in_dim: int, out_dim: int, depth: int, downsample: bool) -> None:
        super().__init__()
        self.downsample: nn.Module
        if downsample:
            self.downsample = nn.Sequential(LayerNorm2d(in_dim), nn.Conv2d(in_dim, out_dim, 2, stride=2))
        else:
            self.downsample = nn.Identity()
        self.blocks = nn.Sequential(*[ConvNeXtBlock(out_dim) for _ in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.downsample(x))


class ConvNeXtFeatures(nn.Module):
    """ConvNeXt without a head: (B, 3, H, W) -> four maps at strides 4, 8, 16, 32."""

    def __init__(self, config: ConvNeXtConfig) -> None:
        super().__init__()
        self.config = config
        dims = config.dims
        self.stem = nn.Sequential(nn.Conv2d(3, dims[0], kernel_size=4, stride=4), LayerNorm2d(dims[0]))
        self.stages = nn.Sequential(
            *[
                ConvNeXtStage(dims[max(i - 1, 0)], dims[i], config.depths[i], downsample=i > 0)
                for i in range(4)
            ]
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        outs: list[torch.Tensor] = []
        for stage in self.stages:
            x = stage(x)
            outs.append(x)
        return outs


def build_convnext(config: ConvNeXtConfig, implementation: str = "wsiseg") -> nn.Module:
    """The backbone module; `implementation` "wsiseg" (this file), "timm", or "auto".

    "timm" builds timm's ConvNeXt and keeps its `stem` and `stages` (the parameter names are the
    same, so checkpoints load either way); "auto" uses timm when it imports and this module
    otherwise.  Both give the same outputs.
    """
    if implementation not in ("wsiseg", "timm", "auto"):
        raise ValueError(f"implementation must be 'wsiseg', 'timm' or 'auto', got {implementation!r}")
    module = ConvNeXtFeatures(config)
    if implementation == "wsiseg":
        return module
    try:
        from timm.models.convnext import ConvNeXt  # optional; needs torchvision
    except ImportError:
        if implementation == "timm":
            raise ImportError(
                "implementation='timm' needs the optional packages timm and torchvision "
                "(pip install timm torchvision); use implementation='wsiseg' instead"
            ) from None
        return module
    expected = set(module.state_dict())
    try:
        model = ConvNeXt(depths=config.depths, dims=config.dims, num_classes=0, global_pool="")
        names = {k for k in model.state_dict() if k.startswith(("stem.", "stages."))}
    except Exception as exc:  # timm's constructor signature varies between releases
        names, model = set(), None
        logger.info("timm's ConvNeXt could not be built: %s", exc)
    if model is None or names != expected:
        if implementation == "timm":
            raise ValueError(
                "this timm version's ConvNeXt does not match the expected layout; use implementation='wsiseg'"
            )
        logger.info("using wsiseg's own ConvNeXt: timm's does not match the expected parameter layout")
        return module
    module.stem = model.stem
    module.stages = model.stages
    return module
