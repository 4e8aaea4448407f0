"""A narrower UNet started from a wider one's weights: the channels each layer keeps.

Network slimming (Z. Liu et al., "Learning Efficient Convolutional Networks through Network
Slimming", ICCV 2017) ranks a convolution's output channels by the magnitude of the BatchNorm
scale that follows it: a channel whose scale is small contributes little after normalisation.
`slim_unet_state` keeps, in every layer of a `wsiseg.models.prompters.unet.UNet`, the channels
with the largest |BatchNorm weight| (for the transposed up-convolutions, which have no
BatchNorm, the largest L1 norm of their weights), and cuts every weight tensor to the kept
output channels and to the kept channels of the layer that feeds it.  The result is a state for
a UNet with the same levels and a smaller `base_channels`; fine-tuning recovers what the
dropped channels carried.  If the dropped channels are exactly silent (zero scale and shift),
the narrow network computes the same function as the wide one (`tests/test_tiny_model.py`).
"""

from __future__ import annotations

from typing import Any

import torch

from wsiseg.models.prompters.unet import UNetConfig

BN_KEYS = ("weight", "bias", "running_mean", "running_var")


def _top(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """The indices of the `keep` largest scores, in increasing index order (ties: lower index)."""
    order = torch.argsort(-scores.abs().double(), stable=True)[:keep]
    return torch.sort(order).values


def slim_unet_state(state: dict[str, Any], wide: UNetConfig, narrow: UNetConfig) -> dict[str, Any]:
    """The (unfused, training-form) UNet state of `narrow` cut from `wide`'s state.

    state: a `UNet(wide).state_dict()` (BatchNorm layers present, not `fused_for_inference`).
    Raises ValueError when the two configs differ in levels or out_channels, or when `narrow`
    is wider than `wide`.
    """
    if (wide.levels, wide.out_channels) != (narrow.levels, narrow.out_channels):
        raise ValueError(
            f"a slimmed UNet keeps the levels and outputs: {wide.levels} levels / {wide.out_channels} outputs "
            f"against {narrow.levels} / {narrow.out_channels}"
        )
    if narrow.base_channels > wide.base_channels:
        raise ValueError(f"cannot widen a UNet by slimming ({wide.base_channels} -> {narrow.base_channels} channels)")
    levels = wide.levels
    keep = [narrow.base_channels * 2**i for i in range(levels)]
    width = [wide.base_channels * 2**i for i in range(levels)]
    out: dict[str, Any] = {}

    def conv_bn(prefix: str, conv_at: int, rows: torch.Tensor, cols: torch.Tensor) -> None:
        out[f"{prefix}.{conv_at}.weight"] = state[f"{prefix}.{conv_at}.weight"][rows][:, cols].clone()
        for key in BN_KEYS:
            out[f"{prefix}.{conv_at + 1}.{key}"] = state[f"{prefix}.{conv_at + 1}.{key}"][rows].clone()
        out[f"{prefix}.{conv_at + 1}.num_batches_tracked"] = state[f"{prefix}.{conv_at + 1}.num_batches_tracked"].clone()

    def block(prefix: str, level: int, cols: torch.Tensor) -> torch.Tensor:
        """A double-conv block fed by channels `cols`; returns the channels it keeps."""
        inner = _top(state[f"{prefix}.1.weight"], keep[level])
        outer = _top(state[f"{prefix}.4.weight"], keep[level])
        conv_bn(prefix, 0, inner, cols)
        conv_bn(prefix, 3, outer, inner)
        return outer

    skips = []
    feed = torch.arange(3)
    for i in range(levels):
        feed = block(f"down.{i}", i, feed)
        skips.append(feed)
    for i in range(levels - 2, -1, -1):
        up_w = state[f"up.{i}.weight"]  # (in, out, 2, 2)
        up_keep = _top(up_w.abs().sum(dim=(0, 2, 3)), keep[i])
        out[f"up.{i}.weight"] = up_w[feed][:, up_keep].clone()
        out[f"up.{i}.bias"] = state[f"up.{i}.bias"][up_keep].clone()
        feed = block(f"merge.{i}", i, torch.cat([skips[i], width[i] + up_keep]))
    out["head.weight"] = state["head.weight"][:, feed].clone()
    out["head.bias"] = state["head.bias"].clone()
    missing = sorted(set(state) - set(out))
    if missing:
        raise ValueError(f"UNet state has keys a slimmed state does not fill: {missing[:5]}")
    return out


def widen_unet_state(
    state: dict[str, Any], narrow: UNetConfig, wide: UNetConfig, fresh: dict[str, Any]
) -> dict[str, Any]:
    """The (unfused, training-form) UNet state of `wide` that computes what `narrow`'s `state`
    computes, the aim of Net2WiderNet (T. Chen, I. Goodfellow, J. Shlens, "Net2Net", ICLR 2016)
    by a simpler construction: every layer's first channels hold the narrow network's weights; the
    added channels keep `fresh`'s weights (a `UNet(wide).state_dict()`, its own initial state), so
    they compute something, but every weight by which an original channel (or the head) reads an
    added one is 0, so nothing reaches the output until training.  Those zero weights get gradients
    at once (their inputs are not zero), and the added channels' own weights once they are non-zero.

    Raises ValueError when the configs differ in levels or out_channels, or `wide` is narrower.
    """
    if (wide.levels, wide.out_channels) != (narrow.levels, narrow.out_channels):
        raise ValueError(
            f"a widened UNet keeps the levels and outputs: {narrow.levels} levels / {narrow.out_channels} outputs "
            f"against {wide.levels} / {wide.out_channels}"
        )
    if wide.base_channels < narrow.base_channels:
        raise ValueError(f"cannot slim a UNet by widening ({narrow.base_channels} -> {wide.base_channels} channels)")
    levels = wide.levels
    keep = [narrow.base_channels * 2**i for i in range(levels)]
    width = [wide.base_channels * 2**i for i in range(levels)]
    out = {key: value.clone() for key, value in fresh.items()}

    def conv_bn(prefix: str, conv_at: int, rows: int, cols: torch.Tensor) -> None:
        weight = out[f"{prefix}.{conv_at}.weight"]
        weight[:rows] = 0.0  # the original outputs read no added input
        weight[:rows, cols] = state[f"{prefix}.{conv_at}.weight"]
        bn = f"{prefix}.{conv_at + 1}"
        for key in BN_KEYS:
            out[f"{bn}.{key}"][:rows] = state[f"{bn}.{key}"]
        out[f"{bn}.num_batches_tracked"] = state[f"{bn}.num_batches_tracked"].clone()

    def block(prefix: str, level: int, cols: torch.Tensor) -> None:
        conv_bn(prefix, 0, keep[level], cols)
        conv_bn(prefix, 3, keep[level], torch.arange(keep[level]))

    block("down.0", 0, torch.arange(3))
    for i in range(1, levels):
        block(f"down.{i}", i, torch.arange(keep[i - 1]))
    for i in range(levels - 2, -1, -1):
        up_w = out[f"up.{i}.weight"]  # (in, out, 2, 2)
        up_w[:, : keep[i]] = 0.0
        up_w[: keep[i + 1], : keep[i]] = state[f"up.{i}.weight"]
        out[f"up.{i}.bias"][: keep[i]] = state[f"up.{i}.bias"]
        block(f"merge.{i}", i, torch.cat([torch.arange(keep[i]), width[i] + torch.arange(keep[i])]))
    out["head.weight"][:] = 0.0
    out["head.weight"][:, : keep[0]] = state["head.weight"]
    out["head.bias"] = state["head.bias"].clone()
    return out


def add_unet_outputs(state: dict[str, Any], fresh: dict[str, Any]) -> dict[str, Any]:
    """`state` (a UNet state) with the head's outputs beyond its own taken from `fresh` (a
    `UNet(config).state_dict()` of the same width with more outputs, its initial state), so the
    existing outputs stay exactly as they were and the added ones start from fresh weights.

    Raises ValueError when `fresh` has no more outputs than `state` or another width.
    """
    have, want = state["head.weight"], fresh["head.weight"]
    if want.shape[0] <= have.shape[0] or want.shape[1:] != have.shape[1:]:
        raise ValueError(f"cannot add outputs to a head of shape {tuple(have.shape)} from one of shape {tuple(want.shape)}")
    out = dict(state)
    out["head.weight"] = torch.cat([have, want[have.shape[0] :]]).clone()
    out["head.bias"] = torch.cat([state["head.bias"], fresh["head.bias"][have.shape[0] :]]).clone()
    return out
