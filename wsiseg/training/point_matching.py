"""One-to-one matching of DPA-P2PNet's anchor proposals to true nucleus points, and its losses.

Matching (PromptNucSeg `prompter/matcher.py`): per image, the Hungarian assignment
(`scipy.optimize.linear_sum_assignment`) minimising

    cost(a, g) = point_cost * ||coords_a - point_g||_2 - class_cost * p_a(class_g)

over proposals a and truths g (point_cost 0.1, class_cost 1.0 in every released config);
with more truths than proposals only as many truths are matched as there are proposals.

Losses (PromptNucSeg `prompter/criterion.py`, coefficients of its configs):
- classification: cross-entropy over every proposal, matched ones labelled with their
  truth's class, the rest background (the last logit), the background class weighted
  `eos_coef` (0.4 PanNuke, 0.2 Kumar, 0.25 CPM-17);
- regression: mean squared error between matched proposals and their truths (x and y, px),
  weighted 5e-3;
- auxiliary mask: focal loss of the nuclear-foreground logits against `labels > 0`, weight 1.

Coordinates are the model's pixel-index frame (pixel (i, j) centred at (j, i)).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from scipy.optimize import linear_sum_assignment

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class MatchWeights:
    """Matching costs and loss weights (PromptNucSeg's Kumar configuration by default)."""

    point_cost: float = 0.1
    class_cost: float = 1.0
    eos_coef: float = 0.2
    reg_weight: float = 5e-3
    mask_weight: float = 1.0

    def __post_init__(self) -> None:
        if min(self.point_cost, self.class_cost, self.reg_weight, self.mask_weight) < 0 or not 0 < self.eos_coef <= 1:
            raise ValueError(f"match costs and loss weights must be >= 0 and eos_coef in (0, 1], got {self}")


def match_points(
    coords: np.ndarray, probs: np.ndarray, points: np.ndarray, classes: np.ndarray, weights: MatchWeights
) -> tuple[np.ndarray, np.ndarray]:
    """(proposal indices, truth indices) of the optimal one-to-one matching of one image.

    coords: (A, 2) proposals; probs: (A, C + 1) softmax probabilities; points: (G, 2) truths;
    classes: (G,) int truth classes in 0..C-1.  Returns two int64 arrays of length min(A, G).
    """
    if len(points) == 0 or len(coords) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    distance = np.sqrt(((coords[:, None, :] - points[None, :, :]) ** 2).sum(-1))
    cost = weights.point_cost * distance - weights.class_cost * probs[:, classes]
    rows, cols = linear_sum_assignment(cost)
    return rows.astype(np.int64), cols.astype(np.int64)


def point_losses(
    coords: torch.Tensor,
    logits: torch.Tensor,
    mask_logits: torch.Tensor | None,
    points: list[np.ndarray],
    classes: list[np.ndarray],
    foreground: torch.Tensor,
    weights: MatchWeights,
) -> dict[str, torch.Tensor]:
    """Loss terms of a batch.

    coords: (B, A, 2); logits: (B, A, C + 1); mask_logits: (B, 1, H, W) or None;
    points[b]: (G_b, 2) float truths; classes[b]: (G_b,) int; foreground: (B, H, W) {0, 1}.
    Returns "loss" (weighted sum) and its terms "cls", "reg", "mask" (0-d float32 tensors).
    """
    import torch
    import torch.nn.functional as F

    from wsiseg.training.losses import sigmoid_focal_loss

    coords = coords.float()
    logits = logits.float()
    n_classes = logits.shape[-1] - 1
    with torch.no_grad():
        probs = logits.softmax(-1).cpu().numpy()
        coords_np = coords.detach().cpu().numpy()
    target = torch.full(logits.shape[:2], n_classes, dtype=torch.int64, device=logits.device)
    matched_pred: list[torch.Tensor] = []
    matched_true: list[np.ndarray] = []
    for b in range(len(points)):
        rows, cols = match_points(coords_np[b], probs[b], points[b], classes[b], weights)
        if len(rows) == 0:
            continue
        idx = torch.from_numpy(rows).to(logits.device)
        target[b, idx] = torch.from_numpy(classes[b][cols].astype(np.int64)).to(logits.device)
        matched_pred.append(coords[b, idx])
        matched_true.append(points[b][cols])
    class_weight = torch.ones(n_classes + 1, device=logits.device)
    class_weight[-1] = weights.eos_coef
    cls = F.cross_entropy(logits.flatten(0, 1), target.flatten(), weight=class_weight)
    if matched_pred:
        pred = torch.cat(matched_pred)
        true = torch.from_numpy(np.concatenate(matched_true).astype(np.float32)).to(pred.device)
        reg = F.mse_loss(pred, true)
    else:
        reg = coords.sum() * 0.0
    mask = sigmoid_focal_loss(mask_logits[:, 0], foreground) if mask_logits is not None else reg * 0.0
    loss = cls + weights.reg_weight * reg + weights.mask_weight * mask
    return {"loss": loss, "cls": cls, "reg": reg, "mask": mask}
