"""LoRA on SAM's q and v projections: fresh adapters change nothing, merging is exact, keys are official."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from wsiseg.models.sam import SamSegmentor, build_sam
from wsiseg.models.sam.lora import (
    LoraConfig,
    LoraQkvLinear,
    apply_lora,
    fresh_lora_state,
    has_lora,
    lora_parameters,
    merge_lora,
)


def random_model(seed: int = 0) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    model = build_sam("vit_test")
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(0.2 * noise if p.ndim > 1 else (name.endswith("weight") + 0.1 * noise))
    return model


def randomise_b(model: torch.nn.Module, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(0.1 * torch.randn(p.shape, generator=gen))


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    rng = np.random.default_rng(0)
    tiles = torch.from_numpy(rng.integers(0, 256, (2, 256, 256, 3), dtype=np.uint8))
    return build_sam("vit_test").preprocess(tiles)


def test_fresh_adapters_leave_the_model_unchanged(images: torch.Tensor) -> None:
    model = random_model()
    with torch.no_grad():
        before = model.encode(images)
        apply_lora(model, rank=4, alpha=8)
        after = model.encode(images)
    assert has_lora(model)
    assert torch.equal(before, after)


def test_merged_equals_unmerged_and_has_only_official_keys(images: torch.Tensor) -> None:
    model = random_model()
    official_keys = set(model.state_dict())
    apply_lora(model, rank=3, alpha=6)
    randomise_b(model)
    with torch.no_grad():
        unmerged = model.encode(images)
        merge_lora(model)
        merged = model.encode(images)
    assert not has_lora(model)
    assert set(model.state_dict()) == official_keys
    assert all(type(b.attn.qkv) is torch.nn.Linear for b in model.image_encoder.blocks)
    assert (unmerged - merged).abs().max() < 1e-4
    assert (unmerged - merged).abs().max() < 1e-3 * unmerged.abs().max()


def test_lora_touches_q_and_v_rows_only_with_scaling_alpha_over_rank() -> None:
    torch.manual_seed(0)
    base = torch.nn.Linear(8, 24)
    w0, b0 = base.weight.detach().clone(), base.bias.detach().clone()
    layer = LoraQkvLinear(base, LoraConfig(rank=2, alpha=5.0))
    with torch.no_grad():
        for p in (layer.lora_b_q.weight, layer.lora_b_v.weight):
            p.normal_()
    x = torch.randn(5, 8)
    s = 5.0 / 2
    dq = s * x @ (layer.lora_b_q.weight @ layer.lora_a_q.weight).T
    dv = s * x @ (layer.lora_b_v.weight @ layer.lora_a_v.weight).T
    want = x @ w0.T + b0 + torch.cat([dq, torch.zeros(5, 8), dv], dim=1)
    torch.testing.assert_close(layer(x), want)
    merged = layer.merged_linear()
    assert torch.equal(merged.weight[8:16], w0[8:16])  # k untouched
    assert not torch.equal(merged.weight[:8], w0[:8]) and not torch.equal(merged.weight[16:], w0[16:])
    torch.testing.assert_close(merged(x), want)


def test_lora_state_keys_and_shapes_are_as_documented() -> None:
    model = build_sam("vit_test")
    apply_lora(model, rank=4, alpha=4)
    state = model.state_dict()
    c, depth = 32, 2
    for n in range(depth):
        base = f"image_encoder.blocks.{n}.attn.qkv."
        assert tuple(state[base + "weight"].shape) == (3 * c, c)
        assert tuple(state[base + "lora_a_q.weight"].shape) == (4, c)
        assert tuple(state[base + "lora_b_q.weight"].shape) == (c, 4)
        assert tuple(state[base + "lora_a_v.weight"].shape) == (4, c)
        assert tuple(state[base + "lora_b_v.weight"].shape) == (c, 4)
        assert not state[base + "lora_b_q.weight"].any()
    assert len(lora_parameters(model)) == 4 * depth
    fresh = fresh_lora_state(c, depth, LoraConfig(4, 4))
    assert {k: v.shape for k, v in fresh.items()} == {k: v.shape for k, v in state.items() if ".lora_" in k}
    bound = 1 / np.sqrt(c)  # Kaiming-uniform (a = sqrt 5) on fan_in = C
    a = fresh["image_encoder.blocks.0.attn.qkv.lora_a_q.weight"]
    assert a.abs().max() <= bound and a.abs().max() > 0.5 * bound


def test_lora_state_loads_strictly_into_a_lora_model() -> None:
    source = apply_lora(random_model(), rank=2, alpha=2)
    randomise_b(source)
    target = apply_lora(build_sam("vit_test"), rank=2, alpha=2)
    target.load_state_dict(source.state_dict(), strict=True)
    for a, b in zip(lora_parameters(source), lora_parameters(target)):
        assert torch.equal(a, b)


def test_segmentor_predictions_are_the_same_merged_or_not() -> None:
    model = apply_lora(random_model(), rank=2, alpha=4)
    randomise_b(model)
    tile = np.random.default_rng(3).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    points = np.array([[[60.5, 70.5], [90.0, 80.0]]], np.float32)
    labels = np.array([[1, 0]])
    unmerged, iou_u = SamSegmentor(model).predict(tile, points, labels)
    merged, iou_m = SamSegmentor(merge_lora(model)).predict(tile, points, labels)
    np.testing.assert_allclose(merged, unmerged, atol=1e-3)
    np.testing.assert_allclose(iou_m, iou_u, atol=1e-4)


def test_bad_lora_settings_are_rejected() -> None:
    with pytest.raises(ValueError, match="rank"):
        LoraConfig(rank=0)
    with pytest.raises(ValueError, match="alpha"):
        LoraConfig(rank=4, alpha=-1)
    with pytest.raises(ValueError, match="unknown LoRA settings"):
        LoraConfig.from_dict({"rank": 4, "dropout": 0.1})
    model = apply_lora(build_sam("vit_test"), rank=2, alpha=2)
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(model, rank=2, alpha=2)
    with pytest.raises(ValueError, match="fused qkv"):
        LoraQkvLinear(torch.nn.Linear(8, 8), LoraConfig())
