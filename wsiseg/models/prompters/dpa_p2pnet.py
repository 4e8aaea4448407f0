"""DPA-P2PNet, the point prompter of PromptNucSeg (Shui et al.), with its checkpoint's parameter names.

Anchors every `space` px propose points; a deformable step moves each anchor by an offset read
from the stride-4 FPN map; features sampled from every FPN level at the moved points are
concatenated, mixed by a 3x3 conv over the anchor grid, and decoded into a refinement offset
and `num_classes + 1` logits (last = background).  An auxiliary head predicts a nuclear
foreground logit map from a second single-output FPN.

Coordinates here are the *pixel-index* frame the original model was trained in (the centre of
pixel (row i, column j) is (j, i)); the prompter adds 0.5 at its boundary.  Quirks of the
original that change numbers are reproduced on purpose and marked "quirk".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from wsiseg.models.prompters.convnext import ConvNeXtConfig, build_convnext
from wsiseg.models.prompters.fpn import FPN


@dataclass(frozen=True)
class DPAP2PNetConfig:
    """Architecture of a DPA-P2PNet.

    depths, dims: ConvNeXt blocks and channels per stage.
    num_classes: nucleus classes (5 for PanNuke, 1 for Kumar / CPM-17); the logits add background.
    num_levels: FPN outputs used for point features (3 PanNuke, 4 Kumar / CPM-17), strides 4, 8, ...
    space: anchor spacing in px (8 PanNuke, 16 Kumar / CPM-17); inputs are padded to a multiple.
    hidden_dim: FPN and head width (256 in every released model).
    dropout: of the MLP heads (inactive at inference).
    backbone_impl: "wsiseg", "timm" or "auto" (see convnext.build_convnext).
    """

    depths: tuple[int, ...] = (3, 3, 27, 3)
    dims: tuple[int, ...] = (96, 192, 384, 768)
    num_classes: int = 5
    num_levels: int = 3
    space: int = 8
    hidden_dim: int = 256
    dropout: float = 0.1
    backbone_impl: str = "wsiseg"

    def __post_init__(self) -> None:
        backbone = ConvNeXtConfig(self.depths, self.dims)  # validates depths and dims
        object.__setattr__(self, "depths", backbone.depths)
        object.__setattr__(self, "dims", backbone.dims)
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")
        if not 1 <= self.num_levels <= 4:
            raise ValueError(f"num_levels must be 1..4, got {self.num_levels}")
        if self.space < 1:
            raise ValueError(f"space must be >= 1 px, got {self.space}")
        if self.hidden_dim < 1:
            raise ValueError(f"hidden_dim must be >= 1, got {self.hidden_dim}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @classmethod
    def with_backbone(cls, name: str, **kwargs: object) -> DPAP2PNetConfig:
        """A config whose depths and dims are those of the named ConvNeXt size."""
        backbone = ConvNeXtConfig.named(name)
        return cls(depths=backbone.depths, dims=backbone.dims, **kwargs)  # type: ignore[arg-type]


class DPAOutput(NamedTuple):
    """Raw model outputs for a (B, 3, H, W) input; A = (H // space) * (W // space) anchors.

    coords: (B, A, 2) float32 x, y in pixel-index frame, anchors row-major (y then x).
    logits: (B, A, num_classes + 1), last index background.
    mask_logits: (B, 1, H, W) nuclear-foreground logits, None when not asked for.
    """

    coords: torch.Tensor
    logits: torch.Tensor
    mask_logits: torch.Tensor | None


class MLP(nn.Module):
    """Linear -> ReLU -> Dropout -> Linear, parameters at `layers.0` and `layers.3`."""

    def __init__(self, dim: int, out_dim: int, dropout: float) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            [nn.Linear(dim, dim), nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(dim, out_dim)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class PrompterBackbone(nn.Module):
    """ConvNeXt plus two FPN necks: `neck` (num_levels outputs) and `neck1` (one, for the mask)."""

    def __init__(self, config: DPAP2PNetConfig) -> None:
        super().__init__()
        self.backbone = build_convnext(ConvNeXtConfig(config.depths, config.dims), config.backbone_impl)
        self.neck = FPN(config.dims, config.hidden_dim, config.num_levels)
        self.neck1 = FPN(config.dims, config.hidden_dim, 1)

    def forward(
        self, images: torch.Tensor, with_mask: bool = True
    ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        feats = self.backbone(images)
        return self.neck(feats), self.neck1(feats)[0] if with_mask else None


def anchor_points(height: int, width: int, space: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Anchor grid (ceil(H/space), ceil(W/space), 2) float32, x then y, pixel-index frame.

    Anchor (i, j) sits at (j * space + ox, i * space + oy) with o = ((size % space) or space) / 2,
    i.e. at cell centres ((j + 0.5) * space) when the size is a multiple of space.
    """
    rows = -(-height // space)
    cols = -(-width // space)
    ox = ((width % space) or space) / 2
    oy = ((height % space) or space) / 2
    xs = torch.arange(cols, dtype=torch.float32, device=device) * space + ox
    ys = torch.arange(rows, dtype=torch.float32, device=device) * space + oy
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([grid_x, grid_y], dim=-1)


def sample_at_points(feature: torch.Tensor, points: torch.Tensor, stride: int) -> torch.Tensor:
    """Bilinear features (B, C, Ha, Wa) of `feature` (B, C, h, w) at `points` (B, Ha, Wa, 2) px.

    Quirk: the grid is 2 * p / stride / (w, h) - 1 with the *actual* map size and
    align_corners=True, so the sampled map index is (p / stride) * (size - 1) / size.
    """
    size = torch.tensor([feature.shape[-1], feature.shape[-2]], dtype=points.dtype, device=points.device)
    grid = 2.0 * points / stride / size - 1.0
    return F.grid_sample(feature, grid.to(feature.dtype), mode="bilinear", align_corners=True)


class DPAP2PNet(nn.Module):
    """(B, 3, H, W) normalised images, H and W multiples of `space` -> DPAOutput.

    with_mask=False skips the auxiliary mask branch (neck1 and mask head), which only
    mask-aided filtering reads; the points are the same either way.
    """

    def __init__(self, config: DPAP2PNetConfig) -> None:
        super().__init__()
        self.config = config
        hidden = config.hidden_dim
        self.backbone = PrompterBackbone(config)
        self.strides = [2 ** (i + 2) for i in range(config.num_levels)]
        self.deform_layer = MLP(hidden, 2, config.dropout)
        self.reg_head = MLP(hidden, 2, config.dropout)
        self.cls_head = MLP(hidden, config.num_classes + 1, config.dropout)
        self.conv = nn.Conv2d(hidden * config.num_levels, hidden, kernel_size=3, padding=1)
        self.mask_head = nn.Sequential(
            nn.Conv2d(hidden, hidden, kernel_size=3, padding=1),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            # quirk: a 1x1 conv with padding=1 makes the map (h + 2, w + 2) before the resize
            nn.Conv2d(hidden, 1, kernel_size=1, padding=1),
        )

    def forward(self, images: torch.Tensor, with_mask: bool = True) -> DPAOutput:
        height, width = images.shape[-2:]
        feats, mask_feat = self.backbone(images, with_mask)
        anchors = anchor_points(height, width, self.config.space, images.device)
        anchors = anchors.expand(images.shape[0], *anchors.shape)

        # deformable proposal: move each anchor by an offset read at the stride-4 level
        first = sample_at_points(feats[0], anchors, self.strides[0])
        deformed = anchors + self.deform_layer(first.permute(0, 2, 3, 1)).to(anchors.dtype)

        # multi-scale features at the moved points, mixed over the 2-D anchor grid
        sampled = [sample_at_points(f, deformed, s) for f, s in zip(feats, self.strides, strict=True)]
        point_feat = self.conv(torch.cat(sampled, dim=1)).permute(0, 2, 3, 1)
        coords = deformed + self.reg_head(point_feat).to(deformed.dtype)
        logits = self.cls_head(point_feat)

        mask_logits = None
        if mask_feat is not None:
            mask_logits = F.interpolate(
                self.mask_head(mask_feat), size=(height, width), mode="bilinear", align_corners=True
            )
        return DPAOutput(coords.flatten(1, 2), logits.flatten(1, 2), mask_logits)
