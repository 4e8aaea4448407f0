"""UNet probability prompter: point selection rules on probability maps with known answers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from wsiseg.models.bundles import write_bundle
from wsiseg.models.prompters.probability import (
    PointSelection,
    ProbabilityPrompter,
    centroid_points,
    negative_points,
    sampled_points,
)
from wsiseg.models.prompters.unet import UNet, UNetConfig
from wsiseg.models.protocols import NUCLEUS, Prompter

torch.set_num_threads(1)


def disks(shape: tuple[int, int], centres: list[tuple[float, float]], radius: float) -> np.ndarray:
    """Probability map: 0.9 inside disks centred at (x, y) pixel centres, 0.02 elsewhere."""
    rows, cols = np.mgrid[: shape[0], : shape[1]]
    prob = np.full(shape, 0.02, np.float32)
    for x, y in centres:
        prob[(cols - x) ** 2 + (rows - y) ** 2 <= radius**2] = 0.9
    return prob


class FixedLogits(nn.Module):
    """A stand-in model whose output is a fixed logit map, whatever the input."""

    def __init__(self, prob: np.ndarray) -> None:
        super().__init__()
        p = torch.from_numpy(np.clip(prob, 1e-6, 1 - 1e-6))
        self.register_buffer("logits", torch.log(p / (1 - p))[None, None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(x.shape[0], 1, *self.logits.shape[-2:])


def test_unet_keeps_the_input_size_and_prompter_pads_odd_tiles() -> None:
    net = UNet(UNetConfig(levels=4, base_channels=4)).eval()
    with torch.no_grad():
        assert net(torch.randn(2, 3, 32, 40)).shape == (2, 1, 32, 40)
    with pytest.raises(ValueError, match="multiples of 8"):
        net(torch.randn(1, 3, 30, 40))
    prompter = ProbabilityPrompter(net)
    tiles = np.random.default_rng(0).integers(0, 256, (2, 29, 35, 3), dtype=np.uint8)
    prob = prompter.predict_probability(tiles)
    assert prob.shape == (2, 29, 35) and prob.dtype == np.float32
    assert np.all((prob >= 0) & (prob <= 1))


def test_centroid_selection_returns_component_centroids_in_edge_frame() -> None:
    centres = [(10.0, 12.0), (40.0, 30.0), (25.0, 50.0)]
    prob = disks((64, 64), centres, radius=5)
    prob[60:62, 2:4] = 0.9  # a 4-pixel speck, below min_area_px
    points = centroid_points(prob, PointSelection(min_area_px=16))
    got = sorted(map(tuple, points.xy.tolist()))
    assert got == sorted((x + 0.5, y + 0.5) for x, y in centres)
    np.testing.assert_allclose(points.score, 0.9, rtol=1e-6)
    assert set(points.class_id.tolist()) == {0}


def test_centroid_outside_a_crescent_moves_onto_the_component() -> None:
    rows, cols = np.mgrid[:40, :40]
    ring = ((cols - 20) ** 2 + (rows - 20) ** 2 <= 12**2) & ((cols - 20) ** 2 + (rows - 20) ** 2 >= 8**2)
    prob = np.where(ring & (cols <= 22), 0.9, 0.0).astype(np.float32)  # a "C" whose centroid is hollow
    ((x, y),) = centroid_points(prob, PointSelection()).xy
    assert prob[int(y), int(x)] > 0.5


def test_centroid_selection_keeps_the_most_probable_components() -> None:
    prob = disks((40, 80), [(10, 20), (40, 20), (70, 20)], radius=4)
    prob[:, 30:50][prob[:, 30:50] > 0.5] = 0.99
    points = centroid_points(prob, PointSelection(points_per_tile=1))
    np.testing.assert_allclose(points.xy, [[40.5, 20.5]])


def test_probability_sampling_respects_threshold_spacing_count_and_seed() -> None:
    prob = disks((64, 64), [(16, 16), (48, 48)], radius=10)
    selection = PointSelection(method="probability", points_per_tile=12, min_spacing_px=5.0, seed=3)
    points = sampled_points(prob, selection)
    assert 2 <= len(points) <= 12
    cells = (points.xy - 0.5).astype(int)
    assert np.all(prob[cells[:, 1], cells[:, 0]] > 0.5)
    gaps = np.hypot(*(points.xy[:, None] - points.xy[None]).transpose(2, 0, 1))
    assert gaps[~np.eye(len(points), dtype=bool)].min() > 5.0
    again = sampled_points(prob, selection)
    np.testing.assert_array_equal(points.xy, again.xy)


def test_negatives_lie_in_background_far_from_nuclei() -> None:
    prob = disks((64, 64), [(20, 20), (44, 44)], radius=8)
    negatives = negative_points(prob, PointSelection(negatives_per_tile=5, min_spacing_px=10))
    assert 1 <= len(negatives) <= 5
    cells = (negatives - 0.5).astype(int)
    assert np.all(prob[cells[:, 1], cells[:, 0]] < 0.1)
    first = negatives[0]  # the farthest background pixel from both disks is a corner
    assert min(np.hypot(first[0] - 20.5, first[1] - 20.5), np.hypot(first[0] - 44.5, first[1] - 44.5)) > 25


def test_prompter_exposes_positives_and_keeps_negatives_for_users() -> None:
    centres = [(10.0, 10.0), (30.0, 22.0)]
    prob = disks((32, 48), centres, radius=4)
    prompter = ProbabilityPrompter(FixedLogits(prob), pad_multiple=1)
    assert isinstance(prompter, Prompter)
    assert prompter.classes == (NUCLEUS,) and prompter.nms_radius_px == 8.0
    tiles = np.zeros((2, 32, 48, 3), np.uint8)
    np.testing.assert_allclose(prompter.predict_probability(tiles)[0], prob, atol=1e-5)
    points = prompter.predict_points(tiles)
    assert len(points) == 2
    assert sorted(map(tuple, points[1].xy.tolist())) == [(10.5, 10.5), (30.5, 22.5)]
    (prompts, _) = prompter.predict_prompts(tiles)
    assert len(prompts.negative_xy) > 0


def test_selection_settings_are_validated() -> None:
    with pytest.raises(ValueError, match="selection must be"):
        PointSelection(method="random")
    with pytest.raises(ValueError, match="negative_threshold"):
        PointSelection(threshold=0.3, negative_threshold=0.5)


def test_from_bundle_round_trip_with_overrides(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = UNet(UNetConfig(levels=3, base_channels=4)).eval()
    manifest = {
        "name": "unet-test",
        "mpp": 0.5,
        "nms_radius_px": 8,
        "components": {
            "prompter": {
                "architecture": "unet_prompter",
                "config": {"levels": 3, "base_channels": 4, "selection": "probability", "threshold": 0.4},
            }
        },
    }
    bundle = write_bundle(tmp_path / "b", manifest, {"prompter": net.state_dict()})
    loaded = ProbabilityPrompter.from_bundle(bundle, selection="centroid", min_area_px=4)
    assert loaded.mpp == 0.5 and loaded.name == "unet-test"
    assert loaded.selection.method == "centroid" and loaded.selection.threshold == 0.4
    assert loaded.selection.min_area_px == 4
    tiles = np.random.default_rng(1).integers(0, 256, (1, 24, 24, 3), dtype=np.uint8)
    reference = ProbabilityPrompter(net)
    np.testing.assert_array_equal(loaded.predict_probability(tiles), reference.predict_probability(tiles))
    with pytest.raises(ValueError, match="unexpected options"):
        ProbabilityPrompter.from_bundle(bundle, colour="red")
