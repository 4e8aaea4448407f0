"""The SAM segmentor: architectures, the 256-px forward pass, prompts, batching and the Segmentor API."""

from __future__ import annotations

import math
import subprocess
import sys
from functools import partial
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from wsiseg.models.protocols import PromptBatch, Segmentor, TileMasks
from wsiseg.models.sam import SAM_ARCHITECTURES, SamSegmentor, build_sam, import_sam_modeling
from wsiseg.models.sam.build import SAM_PIXEL_MEAN, SAM_PIXEL_STD, check_state_dict, detect_variant

MODELING = import_sam_modeling()


def randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights with O(1) activations: matrices N(0, 0.2), norm weights ~1, biases ~0."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.ndim > 1:
                p.copy_(0.2 * noise)
            else:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * noise)
    return model


def official_sam(embed_dim: int, depth: int, heads: int, global_idx: list[int], prompt_dim: int = 256,
                 mlp_dim: int = 2048, dec_heads: int = 8) -> torch.nn.Module:  # fmt: skip
    """A stock SAM built with the constructor arguments of the official release (1024 input)."""
    return MODELING.Sam(
        image_encoder=MODELING.ImageEncoderViT(
            depth=depth, embed_dim=embed_dim, img_size=1024, mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=heads, patch_size=16, qkv_bias=True,
            use_rel_pos=True, global_attn_indexes=global_idx, window_size=14, out_chans=prompt_dim,
        ),
        prompt_encoder=MODELING.PromptEncoder(
            embed_dim=prompt_dim, image_embedding_size=(64, 64), input_image_size=(1024, 1024), mask_in_chans=16
        ),
        mask_decoder=MODELING.MaskDecoder(
            num_multimask_outputs=3,
            transformer=MODELING.TwoWayTransformer(
                depth=2, embedding_dim=prompt_dim, mlp_dim=mlp_dim, num_heads=dec_heads
            ),
            transformer_dim=prompt_dim, iou_head_depth=3, iou_head_hidden_dim=prompt_dim,
        ),
    )  # fmt: skip


TEST_ARGS = (32, 2, 2, [1], 32, 64, 2)  # vit_test, in official_sam's argument order


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return randomise(build_sam("vit_test"))


@pytest.fixture(scope="module")
def seg(model: torch.nn.Module) -> SamSegmentor:
    return SamSegmentor(model, name="test", encoder_batch_size=3, decoder_batch_size=64)


@pytest.fixture(scope="module")
def tiles() -> np.ndarray:
    return np.random.default_rng(1).integers(0, 256, (3, 256, 256, 3), dtype=np.uint8)


def make_prompts(n: int, k: int, seed: int) -> PromptBatch:
    rng = np.random.default_rng(seed)
    points = rng.uniform(0, 256, (n, 1 + k, 2)).astype(np.float32)
    labels = np.zeros((n, 1 + k), np.int8)
    labels[:, 0] = 1
    if k:
        labels[rng.random(n) < 0.3, -1] = -1  # some padded negatives
    return PromptBatch(points, labels)


# ------------------------------------------------------------------------------ architectures


@pytest.mark.parametrize(
    "variant, args",
    [
        ("vit_b", (768, 12, 12, [2, 5, 8, 11])),
        ("vit_l", (1024, 24, 16, [5, 11, 17, 23])),
        ("vit_h", (1280, 32, 16, [7, 15, 23, 31])),
    ],
)
def test_official_variants_have_exactly_the_official_keys_and_shapes(variant: str, args: tuple) -> None:
    with torch.device("meta"):
        ours = build_sam(variant, input_size=256).state_dict()
        stock = official_sam(*args).state_dict()
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in stock.items()}
    c, hd = args[0], args[0] // args[2]
    assert tuple(ours["image_encoder.pos_embed"].shape) == (1, 64, 64, c)
    for i in range(args[1]):
        rows = 127 if i in args[3] else 27
        assert tuple(ours[f"image_encoder.blocks.{i}.attn.rel_pos_h"].shape) == (rows, hd)
    assert detect_variant(ours) == variant


def test_encoder_blocks_use_layernorm_eps_1e6_window_14_and_qkv_bias(model: torch.nn.Module) -> None:
    arch = SAM_ARCHITECTURES["vit_test"]
    for i, block in enumerate(model.image_encoder.blocks):
        assert block.norm1.eps == 1e-6 and block.norm2.eps == 1e-6
        assert block.window_size == (0 if i in arch.global_attn_indexes else 14)
        assert block.attn.qkv.bias is not None
    assert model.prompt_encoder.input_image_size == (256, 256)
    assert model.prompt_encoder.image_embedding_size == (16, 16)


def test_stock_1024_state_dict_loads_strictly_and_unknown_shapes_are_named() -> None:
    stock = randomise(official_sam(*TEST_ARGS), seed=3)
    ours = build_sam("vit_test", input_size=256)
    ours.load_state_dict(stock.state_dict(), strict=True)
    bad = dict(stock.state_dict())
    bad["image_encoder.pos_embed"] = torch.zeros(1, 16, 16, 32)
    del bad["mask_decoder.iou_token.weight"]
    with pytest.raises(
        ValueError, match=r"missing keys: mask_decoder.iou_token.weight.*wrong shapes: image_encoder.pos_embed"
    ):
        check_state_dict(ours, bad, source="x.pth")
    with pytest.raises(ValueError, match="unknown SAM variant"):
        build_sam("vit_x")
    with pytest.raises(ValueError, match="multiple of 16"):
        build_sam("vit_test", input_size=250)


# ------------------------------------------------------------------------------ forward pass


def reference_forward(model: torch.nn.Module, tile: np.ndarray, points: np.ndarray, labels: np.ndarray):
    """The PromptNucSeg 256-px forward pass written out from torch ops and SAM's Block/decoder."""
    enc, pe, size = model.image_encoder, model.prompt_encoder, tile.shape[0]
    grid = size // 16
    x = torch.from_numpy(tile).permute(2, 0, 1)[None].float()
    x = (x - torch.tensor(SAM_PIXEL_MEAN)[:, None, None]) / torch.tensor(SAM_PIXEL_STD)[:, None, None]
    x = F.conv2d(x, enc.patch_embed.proj.weight, enc.patch_embed.proj.bias, stride=16).permute(0, 2, 3, 1)
    pos = F.interpolate(enc.pos_embed.permute(0, 3, 1, 2), size=(grid, grid), mode="bicubic", align_corners=False)
    x = x + pos.permute(0, 2, 3, 1)
    for block in enc.blocks:
        x = block(x)

    def layer_norm_2d(t: torch.Tensor, ln: torch.nn.Module) -> torch.Tensor:
        t = (t - t.mean(1, keepdim=True)) / torch.sqrt(t.var(1, unbiased=False, keepdim=True) + 1e-6)
        return ln.weight[:, None, None] * t + ln.bias[:, None, None]

    x = layer_norm_2d(F.conv2d(x.permute(0, 3, 1, 2), enc.neck[0].weight), enc.neck[1])
    emb = layer_norm_2d(F.conv2d(x, enc.neck[2].weight, padding=1), enc.neck[3])

    gauss = pe.pe_layer.positional_encoding_gaussian_matrix

    def fourier(xy01: torch.Tensor) -> torch.Tensor:
        t = 2 * math.pi * ((2 * xy01 - 1) @ gauss)
        return torch.cat([torch.sin(t), torch.cos(t)], dim=-1)

    pts = torch.from_numpy(points).float() / size  # edge frame: pixel centre j + 0.5 -> (j + 0.5) / size
    lab = torch.from_numpy(labels).long()
    tokens = fourier(pts)
    tokens = torch.where((lab == -1)[..., None], pe.not_a_point_embed.weight, tokens)
    tokens = tokens + (lab == 0)[..., None] * pe.point_embeddings[0].weight
    tokens = tokens + (lab == 1)[..., None] * pe.point_embeddings[1].weight
    pad = pe.not_a_point_embed.weight.expand(len(pts), 1, -1)
    sparse = torch.cat([tokens, pad], dim=1)
    dense = pe.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(len(pts), -1, grid, grid)
    centres = (torch.arange(grid) + 0.5) / grid
    yy, xx = torch.meshgrid(centres, centres, indexing="ij")
    image_pe = fourier(torch.stack([xx, yy], dim=-1)).permute(2, 0, 1)[None]
    masks, iou = model.mask_decoder(emb, image_pe, sparse, dense, multimask_output=False)
    logits = F.interpolate(masks, size=(size, size), mode="bilinear", align_corners=False)[:, 0]
    return logits.numpy(), iou[:, 0].numpy()


def test_predict_at_256_matches_an_independent_forward_pass(seg: SamSegmentor, tiles: np.ndarray) -> None:
    prompts = make_prompts(7, 2, seed=2)
    with torch.no_grad():
        want_logits, want_iou = reference_forward(seg.model, tiles[0], prompts.points, prompts.labels)
    logits, iou = seg.predict(tiles[0], prompts.points, prompts.labels)
    assert logits.shape == (7, 256, 256) and logits.dtype == np.float32 and iou.shape == (7,)
    np.testing.assert_allclose(logits, want_logits, atol=2e-4, rtol=1e-4)
    np.testing.assert_allclose(iou, want_iou, atol=1e-5, rtol=1e-5)
    assert 0.05 < (logits > 0).mean() < 0.95  # the random model gives real masks, not all-empty


def test_input_1024_equals_stock_sam_with_index_frame_points() -> None:
    stock = randomise(official_sam(*TEST_ARGS), seed=4).eval()
    ours = build_sam("vit_test", input_size=1024)
    ours.load_state_dict(stock.state_dict(), strict=True)
    seg = SamSegmentor(ours)
    tile = np.random.default_rng(5).integers(0, 256, (1024, 1024, 3), dtype=np.uint8)
    points = np.array([[[100.5, 200.5], [140.0, 210.0]], [[700.25, 33.75], [0.5, 0.5]]], np.float32)
    labels = np.array([[1, 0], [1, -1]])
    logits, iou = seg.predict(tile, points, labels)
    batched = {
        "image": torch.from_numpy(tile).permute(2, 0, 1).float(),
        "original_size": (1024, 1024),
        "point_coords": torch.from_numpy(points - 0.5),  # SAM's own frame: pixel index
        "point_labels": torch.from_numpy(labels),
    }
    out = stock([batched], multimask_output=False)[0]
    np.testing.assert_allclose(iou, out["iou_predictions"][:, 0].numpy(), atol=1e-5)
    want = out["masks"][:, 0].numpy()
    sure = np.abs(logits) > 1e-3
    assert np.array_equal((logits > 0)[sure], want[sure])


def test_a_negative_prompt_on_a_neighbour_changes_the_mask(seg: SamSegmentor, tiles: np.ndarray) -> None:
    points = np.array([[[100.5, 100.5], [130.5, 100.5]]], np.float32)
    with_neg, _ = seg.predict(tiles[0], points, np.array([[1, 0]]))
    without, _ = seg.predict(tiles[0], points, np.array([[1, -1]]))
    alone, _ = seg.predict(tiles[0], points[:, :1], np.array([[1]]))
    assert np.abs(with_neg - without).max() > 1e-2
    assert np.abs(without - alone).max() > 0  # a padding token is still a token (as in SAM)


def test_segment_tiles_equals_per_tile_predict(seg: SamSegmentor, tiles: np.ndarray) -> None:
    prompts = [make_prompts(5, 1, seed=10), make_prompts(3, 0, seed=11), make_prompts(0, 1, seed=12)]
    out = seg.segment_tiles(tiles, prompts)
    assert len(out) == 3 and all(isinstance(t, TileMasks) for t in out)
    for tile, batch, got in zip(tiles, prompts, out):
        assert len(got) == len(batch)
        if not len(batch):
            continue
        logits, iou = seg.predict(tile, batch.points, batch.labels)
        want = TileMasks.from_dense(logits > 0, iou)
        np.testing.assert_array_equal(got.bbox_px, want.bbox_px)
        np.testing.assert_allclose(got.iou, want.iou, atol=1e-5)
        for a, b in zip(got.masks, want.masks):
            assert a.dtype == bool and np.array_equal(a, b)


def test_batch_sizes_do_not_change_results(model: torch.nn.Module, tiles: np.ndarray) -> None:
    prompts = [make_prompts(6, 1, seed=20 + i) for i in range(3)]
    small = SamSegmentor(model, encoder_batch_size=1, decoder_batch_size=1).segment_tiles(tiles, prompts)
    large = SamSegmentor(model, encoder_batch_size=3, decoder_batch_size=100).segment_tiles(tiles, prompts)
    for a, b in zip(small, large):
        np.testing.assert_array_equal(a.bbox_px, b.bbox_px)
        np.testing.assert_allclose(a.iou, b.iou, atol=1e-5)
        assert all(np.array_equal(x, y) for x, y in zip(a.masks, b.masks))


def test_best_of_both_keeps_the_higher_predicted_iou(model: torch.nn.Module, tiles: np.ndarray) -> None:
    batch = make_prompts(8, 2, seed=30)
    plain = SamSegmentor(model)
    with_neg, iou_with = plain.predict(tiles[1], batch.points, batch.labels)
    relabelled = np.where(batch.labels == 0, -1, batch.labels)
    without, iou_without = plain.predict(tiles[1], batch.points, relabelled)
    logits, iou = SamSegmentor(model, negatives_mode="best_of_both", decoder_batch_size=5).predict(
        tiles[1], batch.points, batch.labels
    )
    pick = iou_without > iou_with
    assert pick.any() and not pick.all()  # both branches exercised with this seed
    np.testing.assert_allclose(iou, np.where(pick, iou_without, iou_with), atol=1e-6)
    np.testing.assert_allclose(logits, np.where(pick[:, None, None], without, with_neg), atol=1e-5)


def test_tile_smaller_than_input_is_padded_like_sam(tiles: np.ndarray) -> None:
    model = randomise(build_sam("vit_test", pixel_mean=(120.0, 110.0, 100.0)), seed=6)
    seg = SamSegmentor(model)
    small = tiles[2][:200, :180]
    padded = np.empty((256, 256, 3), np.uint8)
    padded[:] = (120, 110, 100)  # normalises to zero, as SAM's padding
    padded[:200, :180] = small
    batch = make_prompts(4, 1, seed=40)
    logits, iou = seg.predict(small, batch.points, batch.labels)
    full, full_iou = seg.predict(padded, batch.points, batch.labels)
    assert logits.shape == (4, 200, 180)
    np.testing.assert_allclose(logits, full[:, :200, :180], atol=1e-5)
    np.testing.assert_allclose(iou, full_iou, atol=1e-6)


def test_out_of_memory_halves_the_batch_and_gives_the_same_result(
    model: torch.nn.Module, tiles: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    prompts = [make_prompts(4, 1, seed=50 + i) for i in range(3)]
    want = SamSegmentor(model).segment_tiles(tiles, prompts)
    seg = SamSegmentor(model, encoder_batch_size=4, decoder_batch_size=8)
    real_encode, real_decode = seg._encode, seg._decode_rows

    def encode(t: np.ndarray) -> torch.Tensor:
        if len(t) > 1:
            raise torch.cuda.OutOfMemoryError("fake")
        return real_encode(t)

    def decode(emb: torch.Tensor, tidx: torch.Tensor, *args: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if len(tidx) > 2:
            raise torch.cuda.OutOfMemoryError("fake")
        return real_decode(emb, tidx, *args)

    monkeypatch.setattr(seg, "_encode", encode)
    monkeypatch.setattr(seg, "_decode_rows", decode)
    got = seg.segment_tiles(tiles, prompts)
    assert seg.encoder_batch_size == 1 and seg.decoder_batch_size == 2
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a.bbox_px, b.bbox_px)
        assert all(np.array_equal(x, y) for x, y in zip(a.masks, b.masks))


# ------------------------------------------------------------------------------ API and bad input


def test_segmentor_satisfies_the_protocol(seg: SamSegmentor) -> None:
    assert isinstance(seg, Segmentor)
    assert (seg.name, seg.mpp, seg.input_size_px, seg.k_negatives) == ("test", 0.25, 256, 0)
    assert seg.max_nucleus_diameter_px == 64


def test_bad_inputs_get_one_clear_error(seg: SamSegmentor, tiles: np.ndarray) -> None:
    batch = make_prompts(2, 1, seed=60)
    with pytest.raises(ValueError, match="uint8"):
        seg.segment_tiles(tiles.astype(np.float32), [batch] * 3)
    with pytest.raises(ValueError, match="exceed the SAM input size"):
        seg.predict(np.zeros((300, 300, 3), np.uint8), batch.points, batch.labels)
    with pytest.raises(ValueError, match="one PromptBatch per tile"):
        seg.segment_tiles(tiles, [batch])
    with pytest.raises(ValueError, match="labels must be"):
        seg.predict(tiles[0], batch.points, np.full((2, 2), 2))
    with pytest.raises(ValueError, match="NaN"):
        seg.predict(tiles[0], np.full((2, 2, 2), np.nan, np.float32), batch.labels)
    with pytest.raises(ValueError, match="negatives_mode"):
        SamSegmentor(seg.model, negatives_mode="without")
    with pytest.raises(ValueError, match="decoder_batch_size"):
        SamSegmentor(seg.model, decoder_batch_size=0)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="use device 'cpu' or 'auto' \\(--device cpu"):
            SamSegmentor(seg.model, device="cuda")
        assert SamSegmentor(seg.model, device="auto").device.type == "cpu"


def test_empty_prompts_give_empty_results(seg: SamSegmentor, tiles: np.ndarray) -> None:
    logits, iou = seg.predict(tiles[0], np.zeros((0, 1, 2), np.float32), np.zeros((0, 1)))
    assert logits.shape == (0, 256, 256) and iou.shape == (0,)
    out = seg.segment_tiles(tiles[:1], [PromptBatch(np.zeros((0, 1, 2)), np.zeros((0, 1)))])
    assert len(out) == 1 and len(out[0]) == 0


def test_modeling_imports_without_torchvision_and_package_import_stays_untouched() -> None:
    code = (
        "import sys\n"
        "import wsiseg.models.sam as s\n"
        "assert 'torch' not in sys.modules, 'package import pulled in torch'\n"
        "m = s.import_sam_modeling()\n"
        "assert m.ImageEncoderViT.__module__ == 'segment_anything.modeling.image_encoder'\n"
        "assert 'segment_anything' not in sys.modules or hasattr(sys.modules['segment_anything'], 'SamPredictor')\n"
        "try:\n"
        "    import torchvision\n"
        "except ImportError:\n"
        "    try:\n"
        "        import segment_anything\n"
        "    except ImportError as exc:\n"
        "        assert 'torchvision' in str(exc), exc\n"
        "    else:\n"
        "        raise AssertionError('the real package __init__ did not run')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr


def test_modeling_loads_when_the_package_init_fails_before_reaching_it() -> None:
    code = (
        "import sys\n"
        "sys.modules['segment_anything.build_sam'] = None  # package __init__ fails on its first line\n"
        "from wsiseg.models.sam.loading import import_sam_modeling\n"
        "m = import_sam_modeling()\n"
        "assert m.MaskDecoder.__module__ == 'segment_anything.modeling.mask_decoder'\n"
        "assert 'segment_anything' not in sys.modules, 'placeholder parent left behind'\n"
        "assert import_sam_modeling() is m\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr


def test_missing_segment_anything_names_the_pip_package(monkeypatch: pytest.MonkeyPatch) -> None:
    from wsiseg.models.sam import loading

    for name in [n for n in sys.modules if n.startswith("segment_anything")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "segment_anything", None)  # makes the import fail as if absent
    with pytest.raises(ImportError, match="pip install segment-anything"):
        loading.import_sam_modeling()
