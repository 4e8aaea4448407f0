"""Converting SAM checkpoints into bundles: round trip, PromptNucSeg format, LoRA, and refusals."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from wsiseg.models.bundles import BundleError, open_bundle
from wsiseg.models.sam import SamSegmentor, build_sam, convert_sam_checkpoint, read_sam_checkpoint
from wsiseg.models.sam.lora import LoraConfig, apply_lora, lora_parameters


def random_state(seed: int = 0, lora: LoraConfig | None = None) -> dict[str, torch.Tensor]:
    """A vit_test state dict in the official 1024 format (pos_embed 64x64, global rel-pos 127 rows)."""
    gen = torch.Generator().manual_seed(seed)
    model = build_sam("vit_test")
    if lora is not None:
        apply_lora(model, lora.rank, lora.alpha)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(0.2 * noise if p.ndim > 1 else (name.endswith("weight") + 0.1 * noise))
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture
def tile() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)


POINTS = np.array([[[50.5, 60.5], [80.0, 62.0]], [[200.0, 10.0], [0.0, 0.0]]], np.float32)
LABELS = np.array([[1, 0], [1, -1]])


def direct_predict(state: dict[str, torch.Tensor], tile: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    model = build_sam("vit_test")
    model.load_state_dict(state, strict=True)
    return SamSegmentor(model).predict(tile, POINTS, LABELS)


def test_official_checkpoint_round_trips_through_a_bundle(tmp_path: Path, tile: np.ndarray) -> None:
    state = random_state()
    assert tuple(state["image_encoder.pos_embed"].shape) == (1, 64, 64, 32)
    assert tuple(state["image_encoder.blocks.1.attn.rel_pos_h"].shape) == (127, 16)
    pth = tmp_path / "sam_vit_test_0000.pth"
    torch.save(state, pth)
    out = convert_sam_checkpoint(pth, tmp_path / "bundle", name="toy-sam", mpp=0.5, k_negatives=1)
    bundle = open_bundle(out)
    manifest = bundle.manifest
    assert (manifest.name, manifest.mpp, manifest.input_size, manifest.k_negatives) == ("toy-sam", 0.5, 256, 1)
    comp = manifest.components["segmentor"]
    assert comp.architecture == "sam" and comp.config["variant"] == "vit_test"
    loaded = bundle.load_weights("segmentor")
    assert set(loaded) == set(state) and all(torch.equal(loaded[k], state[k]) for k in state)
    raw = json.loads((out / "manifest.json").read_text())
    assert raw["converted_from"]["file"] == pth.name and len(raw["converted_from"]["sha256"]) == 64

    seg = SamSegmentor.from_bundle(bundle)
    assert (seg.name, seg.mpp, seg.k_negatives, seg.input_size_px) == ("toy-sam", 0.5, 1, 256)
    logits, iou = seg.predict(tile, POINTS, LABELS)
    want_logits, want_iou = direct_predict(state, tile)
    np.testing.assert_array_equal(logits, want_logits)
    np.testing.assert_array_equal(iou, want_iou)
    assert SamSegmentor.from_bundle(out, input_size=512, k_negatives=0).input_size_px == 512


def test_promptnucseg_checkpoint_and_ddp_prefix_are_accepted(tmp_path: Path, tile: np.ndarray) -> None:
    state = random_state(seed=1)
    pth = tmp_path / "best.pth"
    torch.save({"model": {f"module.{k}": v for k, v in state.items()}, "epoch": 199, "metrics": "PQ 0.6"}, pth)
    assert set(read_sam_checkpoint(pth)) == set(state)
    seg = SamSegmentor.from_checkpoint(pth, "vit_test")
    logits, _ = seg.predict(tile, POINTS, LABELS)
    np.testing.assert_array_equal(logits, direct_predict(state, tile)[0])
    with pytest.raises(ValueError, match="SAM vit_test, not vit_b"):
        SamSegmentor.from_checkpoint(pth, "vit_b")


def test_lora_checkpoint_needs_alpha_and_loads_merged(tmp_path: Path, tile: np.ndarray) -> None:
    cfg = LoraConfig(rank=2, alpha=3.0)
    state = random_state(seed=2, lora=cfg)
    pth = tmp_path / "sac.pth"
    torch.save(state, pth)
    with pytest.raises(ValueError, match=r"LoRA adapters \(rank 2\); pass lora="):
        convert_sam_checkpoint(pth, tmp_path / "b0", name="sac")
    with pytest.raises(ValueError, match="rank 2, but lora.rank is 4"):
        convert_sam_checkpoint(pth, tmp_path / "b0", name="sac", lora=LoraConfig(rank=4))
    out = convert_sam_checkpoint(pth, tmp_path / "b1", name="sac", lora=cfg)
    assert open_bundle(out).manifest.components["segmentor"].config["lora"] == {"rank": 2, "alpha": 3.0}
    logits, iou = SamSegmentor.from_bundle(out).predict(tile, POINTS, LABELS)

    model = apply_lora(build_sam("vit_test"), cfg.rank, cfg.alpha)
    model.load_state_dict(state, strict=True)
    want, want_iou = SamSegmentor(model).predict(tile, POINTS, LABELS)  # unmerged
    np.testing.assert_allclose(logits, want, atol=1e-3)
    np.testing.assert_allclose(iou, want_iou, atol=1e-4)


def test_lora_given_for_a_plain_checkpoint_adds_fresh_adapters(tmp_path: Path, tile: np.ndarray) -> None:
    state = random_state(seed=3)
    pth = tmp_path / "sam.pth"
    torch.save(state, pth)
    out = convert_sam_checkpoint(pth, tmp_path / "b", name="ready", lora=LoraConfig(rank=4, alpha=4))
    weights = open_bundle(out).load_weights("segmentor")
    assert not weights["image_encoder.blocks.0.attn.qkv.lora_b_v.weight"].any()
    assert weights["image_encoder.blocks.0.attn.qkv.lora_a_v.weight"].abs().sum() > 0
    logits, _ = SamSegmentor.from_bundle(out).predict(tile, POINTS, LABELS)
    np.testing.assert_allclose(logits, direct_predict(state, tile)[0], atol=1e-5)


def test_missing_unexpected_and_misshapen_keys_are_listed(tmp_path: Path) -> None:
    state = random_state()
    missing = dict(state)
    del missing["mask_decoder.iou_token.weight"]
    extra = dict(state, **{"image_encoder.blocks.0.attn.adapter.weight": torch.zeros(2)})
    wrong = dict(state, **{"mask_decoder.mask_tokens.weight": torch.zeros(5, 32)})
    cases = [
        (missing, "missing keys: mask_decoder.iou_token.weight"),
        (extra, "unexpected keys: image_encoder.blocks.0.attn.adapter.weight"),
        (wrong, r"wrong shapes: mask_decoder.mask_tokens.weight \(5, 32\) \(expected \(4, 32\)\)"),
    ]
    for i, (bad, message) in enumerate(cases):
        pth = tmp_path / f"bad{i}.pth"
        torch.save(bad, pth)
        with pytest.raises(ValueError, match=message):
            convert_sam_checkpoint(pth, tmp_path / f"out{i}", name="bad")
        assert not (tmp_path / f"out{i}" / "manifest.json").exists()
    odd = dict(state, **{"image_encoder.patch_embed.proj.weight": torch.zeros(48, 3, 16, 16)})
    torch.save(odd, tmp_path / "odd.pth")
    with pytest.raises(ValueError, match="matches no known SAM size"):
        convert_sam_checkpoint(tmp_path / "odd.pth", tmp_path / "odd", name="odd")


class _RunsCode:
    """An object whose unpickling would run a shell command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_that_would_run_code_is_refused_and_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    pth = tmp_path / "evil.pth"
    torch.save({"model": random_state(), "payload": _RunsCode(marker)}, pth)
    with pytest.raises(ValueError, match="refused to load SAM checkpoint .*evil.pth"):
        convert_sam_checkpoint(pth, tmp_path / "out", name="evil")
    with pytest.raises(ValueError, match="refused"):
        SamSegmentor.from_checkpoint(pth)
    assert not marker.exists()
    assert not (tmp_path / "out").exists()
    torch.load(pth, weights_only=False)  # the payload is live: an unsafe load does run it
    assert marker.exists()


def test_unreadable_inputs_get_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such file"):
        read_sam_checkpoint(tmp_path / "absent.pth")
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="refused to load"):
        read_sam_checkpoint(tmp_path / "garbage.pth")
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="expected a state dict"):
        read_sam_checkpoint(tmp_path / "list.pth")
    torch.save(random_state(), tmp_path / "ok.pth")
    with pytest.raises(ValueError, match="negatives_mode"):
        convert_sam_checkpoint(tmp_path / "ok.pth", tmp_path / "b", name="x", negatives_mode="sometimes")


def test_bundle_with_wrong_weights_or_variant_is_a_bundle_error(tmp_path: Path) -> None:
    torch.save(random_state(), tmp_path / "ok.pth")
    out = convert_sam_checkpoint(tmp_path / "ok.pth", tmp_path / "b", name="x")
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["components"]["segmentor"]["config"]["variant"] = "vit_tiny"
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=r"bundle .*does not fit the SAM architecture"):
        SamSegmentor.from_bundle(out)
    manifest["components"]["segmentor"]["config"]["variant"] = "vit_q"
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="variant 'vit_q' is not one of"):
        SamSegmentor.from_bundle(out)


def test_lora_parameters_survive_the_bundle_unmerged(tmp_path: Path) -> None:
    cfg = LoraConfig(rank=2, alpha=2.0)
    state = random_state(seed=5, lora=cfg)
    torch.save(state, tmp_path / "l.pth")
    out = convert_sam_checkpoint(tmp_path / "l.pth", tmp_path / "b", name="l", lora=cfg)
    model = apply_lora(build_sam("vit_test"), cfg.rank, cfg.alpha)
    model.load_state_dict(open_bundle(out).load_weights("segmentor"), strict=True)  # trainable again
    assert len(lora_parameters(model)) == 4 * 2
