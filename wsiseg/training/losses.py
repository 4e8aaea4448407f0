"""Mask losses for nucleus models, in torch ops (float32 in, scalar out).

- `sigmoid_focal_loss`: Lin et al., "Focal Loss for Dense Object Detection" (ICCV 2017),
  FL(p_t) = -alpha_t (1 - p_t)^gamma log(p_t) on per-pixel sigmoid probabilities, gamma = 2
  (the paper's default); alpha = None applies no class balancing.  Mean over pixels.
- `soft_dice_loss`: 1 - (2 sum(p g) + eps) / (sum(p) + sum(g) + eps) per mask (Milletari et
  al., V-Net, 2016), averaged over masks.
- `soft_iou`: sum(p g) / (sum(p) + sum(g) - sum(p g)) per mask, the IoU target of
  PromptNucSeg's IoU-prediction loss.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

_EPS = 1e-6


def sigmoid_focal_loss(
    logits: torch.Tensor, targets: torch.Tensor, *, gamma: float = 2.0, alpha: float | None = None
) -> torch.Tensor:
    """Mean focal loss of logits against {0, 1} targets of the same shape (any shape)."""
    import torch.nn.functional as F

    logits = logits.float()
    targets = targets.float()
    # log(p_t) computed stably from the logits: -BCE-with-logits is log(p) for t = 1, log(1 - p) for t = 0
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p = logits.sigmoid()
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = ce * (1 - p_t).pow(gamma)
    if alpha is not None:
        loss = loss * (alpha * targets + (1 - alpha) * (1 - targets))
    return loss.mean()


def soft_dice_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over masks of the soft Dice loss; logits and targets (N, H, W)."""
    p = logits.float().sigmoid().flatten(1)
    t = targets.float().flatten(1)
    inter = (p * t).sum(1)
    dice = (2 * inter + _EPS) / (p.sum(1) + t.sum(1) + _EPS)
    return (1 - dice).mean()


def soft_iou(probs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(N,) soft IoU of probabilities in [0, 1] against {0, 1} targets, both (N, H, W)."""
    p = probs.float().flatten(1)
    t = targets.float().flatten(1)
    inter = (p * t).sum(1)
    return (inter + _EPS) / (p.sum(1) + t.sum(1) - inter + _EPS)
