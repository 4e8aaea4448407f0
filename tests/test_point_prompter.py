"""DPA-P2PNet point prompter and the PromptNucSeg checkpoint converter, on tiny random models."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
import torch

from wsiseg.models.prompters.convert import convert_promptnucseg_prompter, infer_architecture
from wsiseg.models.prompters.convnext import ConvNeXtConfig, ConvNeXtFeatures
from wsiseg.models.prompters.dpa_p2pnet import (
    DPAP2PNet,
    DPAP2PNetConfig,
    anchor_points,
    sample_at_points,
)
from wsiseg.models.prompters.fpn import FPN
from wsiseg.models.prompters.point import PANNUKE_CLASSES, PointPrompter, decode_points
from wsiseg.models.prompters.point_nms import point_nms
from wsiseg.models.protocols import NUCLEUS, Prompter

torch.set_num_threads(1)


def tiny_model(num_classes: int = 5, num_levels: int = 3, space: int = 8, seed: int = 0) -> DPAP2PNet:
    torch.manual_seed(seed)
    config = DPAP2PNetConfig.with_backbone(
        "convnext_test", num_classes=num_classes, num_levels=num_levels, space=space, hidden_dim=16
    )
    model = DPAP2PNet(config).eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so a state-dict round trip is checked
        model.mask_head[1].running_mean.uniform_(-0.1, 0.1)
        model.mask_head[1].running_var.uniform_(0.5, 1.5)
    return model


def force_heads(model: DPAP2PNet, *, winner: int, offset: tuple[float, float] = (0.0, 0.0)) -> None:
    """Make every anchor predict class `winner` (last = background) at anchor + offset."""
    with torch.no_grad():
        for head in (model.deform_layer, model.reg_head, model.cls_head):
            head.layers[3].weight.zero_()
            head.layers[3].bias.zero_()
        model.cls_head.layers[3].bias[winner] = 20.0
        model.reg_head.layers[3].bias.copy_(torch.tensor(offset))


def random_tiles(batch: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (batch, height, width, 3), dtype=np.uint8)


# --- backbone and neck -------------------------------------------------------------------


def test_convnext_parameter_names_follow_timm() -> None:
    keys = set(ConvNeXtFeatures(ConvNeXtConfig.named("convnext_test")).state_dict())
    assert {"stem.0.weight", "stem.1.bias", "stages.0.blocks.0.gamma"} <= keys
    assert {"stages.3.blocks.0.mlp.fc2.weight", "stages.3.blocks.0.conv_dw.bias"} <= keys
    assert {"stages.1.downsample.0.weight", "stages.1.downsample.1.weight"} <= keys
    assert not any(k.startswith("stages.0.downsample") for k in keys)
    assert not any(k.startswith(("head", "norm_pre")) for k in keys)


def test_convnext_small_matches_the_published_shapes() -> None:
    small = ConvNeXtFeatures(ConvNeXtConfig.named("convnext_small")).state_dict()
    assert sum(k.endswith("conv_dw.weight") for k in small) == 3 + 3 + 27 + 3
    assert small["stem.0.weight"].shape == (96, 3, 4, 4)
    assert small["stages.2.blocks.26.mlp.fc1.weight"].shape == (4 * 384, 384)
    assert small["stages.3.downsample.1.weight"].shape == (768, 384, 2, 2)


def test_convnext_returns_four_maps_at_strides_4_to_32() -> None:
    net = ConvNeXtFeatures(ConvNeXtConfig.named("convnext_test")).eval()
    with torch.no_grad():
        outs = net(torch.randn(1, 3, 64, 96))
    assert [tuple(o.shape[1:]) for o in outs] == [(8, 16, 24), (16, 8, 12), (32, 4, 6), (64, 2, 3)]


def test_fpn_has_laterals_for_all_levels_and_output_convs_for_num_outs() -> None:
    keys = set(FPN([8, 16, 32, 64], 16, num_outs=3).state_dict())
    assert {f"lateral_convs.{i}.conv.weight" for i in range(4)} <= keys
    assert {f"fpn_convs.{i}.conv.bias" for i in range(3)} <= keys
    assert "fpn_convs.3.conv.weight" not in keys


def test_fpn_adds_nearest_upsampled_coarser_levels() -> None:
    fpn = FPN([1, 1], 1, num_outs=1)
    with torch.no_grad():
        for unit in [*fpn.lateral_convs]:
            unit.conv.weight.fill_(1.0)
            unit.conv.bias.zero_()
        fpn.fpn_convs[0].conv.weight.zero_()
        fpn.fpn_convs[0].conv.weight[0, 0, 1, 1] = 1.0  # identity 3x3
        fpn.fpn_convs[0].conv.bias.zero_()
        fine = torch.zeros(1, 1, 4, 5)
        coarse = torch.arange(6.0).view(1, 1, 2, 3)
        (out,) = fpn([fine, coarse])
    expected = torch.nn.functional.interpolate(coarse, size=(4, 5), mode="nearest")
    assert torch.equal(out, expected)


# --- anchors, sampling, mask head --------------------------------------------------------


def test_anchors_sit_at_cell_centres_of_a_padded_input() -> None:
    anchors = anchor_points(16, 24, 8)
    assert anchors.shape == (2, 3, 2)
    assert anchors[..., 0][0].tolist() == [4.0, 12.0, 20.0]
    assert anchors[..., 1][:, 0].tolist() == [4.0, 12.0]


def test_anchor_origin_of_an_unpadded_size_follows_the_reference_formula() -> None:
    anchors = anchor_points(8, 20, 8)  # 20 % 8 = 4 -> origin 2
    assert anchors[0, :, 0].tolist() == [2.0, 10.0, 18.0]


def _manual_bilinear(feature: np.ndarray, x: float, y: float) -> np.ndarray:
    x0, y0 = int(np.floor(x)), int(np.floor(y))
    fx, fy = x - x0, y - y0
    h, w = feature.shape[1:]

    def at(yy: int, xx: int) -> np.ndarray:
        return feature[:, yy, xx] if 0 <= yy < h and 0 <= xx < w else np.zeros(feature.shape[0])

    return (
        at(y0, x0) * (1 - fx) * (1 - fy)
        + at(y0, x0 + 1) * fx * (1 - fy)
        + at(y0 + 1, x0) * (1 - fx) * fy
        + at(y0 + 1, x0 + 1) * fx * fy
    )


def test_grid_sample_normalisation_matches_manual_bilinear() -> None:
    torch.manual_seed(1)
    feature = torch.randn(1, 3, 7, 9, dtype=torch.float64)  # not a power of two on purpose
    points = torch.tensor([[[[5.0, 3.0], [17.3, 11.9], [30.0, 20.5]]]], dtype=torch.float64)
    stride = 4
    got = sample_at_points(feature, points, stride)[0, :, 0].numpy()
    f = feature[0].numpy()
    for k, (x, y) in enumerate(points[0, 0].tolist()):
        # quirk: index = (p / stride) * (size - 1) / size with the actual map size
        ix, iy = x / stride * (9 - 1) / 9, y / stride * (7 - 1) / 7
        np.testing.assert_allclose(got[:, k], _manual_bilinear(f, ix, iy), rtol=1e-10, atol=1e-12)


def test_mask_head_output_is_quarter_size_plus_two_before_the_resize() -> None:
    model = tiny_model()
    seen: list[tuple[int, ...]] = []
    model.mask_head.register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape)))
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 48))
    assert seen == [(2, 1, 32 // 4 + 2, 48 // 4 + 2)]
    assert out.mask_logits.shape == (2, 1, 32, 48)
    assert out.coords.shape == (2, (32 // 8) * (48 // 8), 2)
    assert out.logits.shape == (2, 24, 6)


def test_zero_heads_return_the_anchors_row_major() -> None:
    model = tiny_model()
    force_heads(model, winner=0)
    with torch.no_grad():
        out = model(torch.randn(1, 3, 32, 40))
    expected = anchor_points(32, 40, 8).reshape(-1, 2)
    assert torch.equal(out.coords[0], expected)


# --- post-processing ---------------------------------------------------------------------


def test_point_nms_visits_by_score_and_ignores_classes() -> None:
    xy = np.array([[0.0, 0.0], [12.0, 0.0], [24.0, 0.0], [100.0, 100.0], [100.0, 112.1]])
    score = np.array([0.9, 0.8, 0.7, 0.5, 0.6])
    # (12, 0) is within 12 of (0, 0): suppressed; it then suppresses nothing, so (24, 0) stays;
    # (100, 112.1) is 12.1 away from (100, 100): both stay
    assert point_nms(xy, score, 12.0).tolist() == [0, 2, 3, 4]
    assert point_nms(xy, score, 0.0).tolist() == [0, 1, 2, 3, 4]
    assert point_nms(xy[[1, 0]], score[[1, 0]], 12.0).tolist() == [1]


def test_decode_keeps_only_non_background_argmax_and_clips_before_filtering() -> None:
    coords = np.array([[2.0, 2.0], [40.0, 3.0], [5.0, 5.0], [-4.0, 9.0]], np.float32)
    probs = np.array(
        [[0.6, 0.1, 0.3], [0.2, 0.5, 0.3], [0.3, 0.2, 0.5], [0.45, 0.1, 0.45]], np.float32
    )  # last column background; row 2 background wins; row 3 ties -> first (foreground)
    mask = np.full((10, 20), -1.0, np.float32)
    mask[2, 2] = mask[3, 19] = mask[9, 0] = 1.0
    got = decode_points(coords, probs, mask, size_hw=(10, 20), nms_radius_px=0.0)
    np.testing.assert_allclose(got.xy, [[2.5, 2.5], [19.5, 3.5], [0.5, 9.5]])
    np.testing.assert_allclose(got.score, [0.6, 0.5, 0.45])
    assert got.class_id.tolist() == [0, 1, 0]
    mask[9, 0] = -1.0  # the clipped point (0, 9) is read at its clipped position
    assert len(decode_points(coords, probs, mask, size_hw=(10, 20), nms_radius_px=0.0)) == 2


def test_background_bias_gives_no_points() -> None:
    model = tiny_model()
    force_heads(model, winner=5)
    prompter = PointPrompter(model)
    result = prompter.predict_points(random_tiles(2, 32, 32))
    assert [len(p) for p in result] == [0, 0]


def test_forced_class_gives_one_point_per_anchor_in_edge_frame() -> None:
    model = tiny_model()
    force_heads(model, winner=2)
    prompter = PointPrompter(model, nms_radius_px=5.0)
    (points,) = prompter.predict_points(random_tiles(1, 32, 40))
    expected = anchor_points(32, 40, 8).reshape(-1, 2).numpy() + 0.5
    np.testing.assert_allclose(points.xy, expected)
    assert set(points.class_id.tolist()) == {2}
    assert np.all(points.score > 0.99)


def test_points_are_clipped_to_the_unpadded_tile() -> None:
    model = tiny_model()
    force_heads(model, winner=0, offset=(1000.0, -1000.0))
    prompter = PointPrompter(model, nms_radius_px=12.0)
    (points,) = prompter.predict_points(random_tiles(1, 21, 30))  # padded to 24 x 32 inside
    np.testing.assert_allclose(points.xy, [[29.5, 0.5]])  # all collapse to one corner, NMS keeps one


def test_mask_aided_filtering_follows_the_mask_logit() -> None:
    model = tiny_model()
    force_heads(model, winner=0)
    tiles = random_tiles(1, 32, 32)
    with torch.no_grad():
        model.mask_head[3].bias.fill_(-100.0)
    assert len(PointPrompter(model, filtering=True, nms_radius_px=5.0).predict_points(tiles)[0]) == 0
    assert len(PointPrompter(model, filtering=False, nms_radius_px=5.0).predict_points(tiles)[0]) == 16
    with torch.no_grad():
        model.mask_head[3].bias.fill_(100.0)
    assert len(PointPrompter(model, filtering=True, nms_radius_px=5.0).predict_points(tiles)[0]) == 16


def test_batched_prediction_equals_one_tile_at_a_time() -> None:
    prompter = PointPrompter(tiny_model(seed=3), nms_radius_px=6.0)
    tiles = random_tiles(3, 40, 40, seed=5)
    batched = prompter.predict_points(tiles)
    for b in range(3):
        (single,) = prompter.predict_points(tiles[b : b + 1])
        np.testing.assert_allclose(batched[b].xy, single.xy, atol=1e-4)
        assert batched[b].class_id.tolist() == single.class_id.tolist()


def test_prompter_fulfils_the_protocol_and_rejects_bad_tiles() -> None:
    prompter = PointPrompter(tiny_model())
    assert isinstance(prompter, Prompter)
    assert prompter.classes == PANNUKE_CLASSES
    assert PointPrompter(tiny_model(num_classes=1)).classes == (NUCLEUS,)
    with pytest.raises(ValueError, match="uint8"):
        prompter.predict_points(np.zeros((1, 16, 16, 3), np.float32))
    with pytest.raises(ValueError, match=r"\(B, H, W, 3\)"):
        prompter.predict_points(np.zeros((16, 16, 3), np.uint8))
    with pytest.raises(ValueError, match="classes"):
        PointPrompter(tiny_model(), classes=(NUCLEUS,))
    assert prompter.predict_points(np.zeros((0, 16, 16, 3), np.uint8)) == []


# --- converter ---------------------------------------------------------------------------


def save_checkpoint(model: DPAP2PNet, path: Path, **extra: object) -> Path:
    state = {k: v.clone() for k, v in model.state_dict().items()}
    torch.save({"model": state, "metrics": "f1 0.8", "f1": 0.8, "epoch": 12, **extra}, path)
    return path


def test_converter_round_trip_reproduces_the_points(tmp_path: Path) -> None:
    model = tiny_model(num_classes=1, num_levels=4, space=16, seed=7)
    pth = save_checkpoint(model, tmp_path / "best.pth")
    bundle_path = convert_promptnucseg_prompter(pth, tmp_path / "bundle", name="kumar-test", dataset="kumar")
    loaded = PointPrompter.from_bundle(bundle_path)
    assert loaded.name == "kumar-test" and loaded.mpp == 0.25
    assert loaded.nms_radius_px == 11.0 and loaded.filtering and loaded.model.config.space == 16
    assert loaded.classes == (NUCLEUS,)
    reference = PointPrompter(model, nms_radius_px=11.0, filtering=True)
    tiles = random_tiles(2, 48, 64, seed=2)
    for a, b in zip(loaded.predict_points(tiles), reference.predict_points(tiles), strict=True):
        np.testing.assert_array_equal(a.xy, b.xy)
        np.testing.assert_array_equal(a.score, b.score)


def test_converter_infers_the_architecture_and_prefers_ema(tmp_path: Path) -> None:
    model = tiny_model(num_classes=5, num_levels=3, seed=1)
    arch = infer_architecture(model.state_dict(), where="x")
    assert arch == {
        "depths": [1, 1, 1, 1],
        "dims": [8, 16, 32, 64],
        "num_levels": 3,
        "num_classes": 5,
        "hidden_dim": 16,
    }
    ema = tiny_model(num_classes=5, num_levels=3, seed=2)
    extra = {"model_ema": ema.state_dict(), "args": argparse.Namespace(lr=1)}  # as in latest.pth
    pth = save_checkpoint(model, tmp_path / "latest.pth", **extra)
    out = convert_promptnucseg_prompter(pth, tmp_path / "b", name="p", dataset="pannuke")
    bundle = PointPrompter.from_bundle(out)
    assert bundle.classes == PANNUKE_CLASSES and not bundle.filtering and bundle.nms_radius_px == 12.0
    got = bundle.model.state_dict()["cls_head.layers.3.bias"]
    assert torch.equal(got, ema.state_dict()["cls_head.layers.3.bias"])


def test_converter_errors_are_clear(tmp_path: Path) -> None:
    model = tiny_model(num_classes=5, num_levels=3)
    good = save_checkpoint(model, tmp_path / "good.pth")
    with pytest.raises(ValueError, match="dataset='kumar'"):
        convert_promptnucseg_prompter(good, tmp_path / "o1", name="x", dataset="kumar")
    with pytest.raises(ValueError, match="dataset must be one of"):
        convert_promptnucseg_prompter(good, tmp_path / "o2", name="x", dataset="monuseg")
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        convert_promptnucseg_prompter(tmp_path / "missing.pth", tmp_path / "o3", name="x")
    broken = {k: v for k, v in model.state_dict().items() if "neck1.fpn_convs" not in k}
    torch.save({"model": broken}, tmp_path / "broken.pth")
    with pytest.raises(ValueError, match=r"broken\.pth: weights do not fit.*neck1\.fpn_convs"):
        convert_promptnucseg_prompter(tmp_path / "broken.pth", tmp_path / "o4", name="x")
    torch.save({"model": {"image_encoder.pos_embed": torch.zeros(1)}}, tmp_path / "sam.pth")
    with pytest.raises(ValueError, match="not a PromptNucSeg prompter"):
        convert_promptnucseg_prompter(tmp_path / "sam.pth", tmp_path / "o5", name="x")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pth: not a readable"):
        convert_promptnucseg_prompter(tmp_path / "junk.pth", tmp_path / "o6", name="x")
    assert not (tmp_path / "o4").exists()


def test_skipping_the_mask_branch_leaves_the_points_unchanged() -> None:
    model = tiny_model(seed=4)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        full, lean = model(x), model(x, with_mask=False)
    assert lean.mask_logits is None
    assert torch.equal(full.coords, lean.coords) and torch.equal(full.logits, lean.logits)


def test_converter_joins_a_segmentor_bundle(tmp_path: Path) -> None:
    from wsiseg.models.bundles import open_bundle, write_bundle

    segmentor_state = {"mask_decoder.iou_token.weight": torch.arange(4.0).view(1, 4)}
    seg_manifest = {
        "name": "seg",
        "mpp": 0.25,
        "input_size": 256,
        "k_negatives": 1,
        "components": {"segmentor": {"architecture": "sam", "config": {"variant": "vit_b"}}},
    }
    seg = write_bundle(tmp_path / "seg", seg_manifest, {"segmentor": segmentor_state})
    pth = save_checkpoint(tiny_model(), tmp_path / "best.pth")
    out = convert_promptnucseg_prompter(pth, tmp_path / "both", name="both", segmentor_bundle=seg.path)
    both = open_bundle(out)
    assert both.has("prompter") and both.has("segmentor")
    assert both.manifest.input_size == 256 and both.manifest.k_negatives == 1
    stored = both.load_weights("segmentor")["mask_decoder.iou_token.weight"]
    assert torch.equal(stored, segmentor_state["mask_decoder.iou_token.weight"])
    with pytest.raises(ValueError, match="mpp"):
        convert_promptnucseg_prompter(pth, tmp_path / "x", name="x", mpp=0.5, segmentor_bundle=seg.path)


def test_read_only_tiles_become_the_same_tensor_without_a_warning() -> None:
    import warnings

    from wsiseg.models.prompters.point import IMAGENET_MEAN, IMAGENET_STD, tiles_to_tensor

    tiles = np.random.default_rng(3).integers(0, 256, (2, 40, 24, 3), dtype=np.uint8)
    frozen = tiles.copy()
    frozen.flags.writeable = False  # e.g. an image decoded into read-only memory
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = tiles_to_tensor(frozen, IMAGENET_MEAN, IMAGENET_STD, 16, "cpu")
    want = tiles_to_tensor(tiles, IMAGENET_MEAN, IMAGENET_STD, 16, "cpu")
    assert tuple(got.shape) == (2, 3, 48, 32) and torch.equal(got, want)
