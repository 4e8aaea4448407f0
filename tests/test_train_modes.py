"""`wsiseg train segmentor | prompter | unet-prompter` and `wsiseg pseudo-label` on toy models.

A three-image synthetic pairs dataset (96 px, 0.5 µm/px) and the smallest configurations
(SAM "vit_test", ConvNeXt "convnext_test", a 2-level UNet): these tests are about what the
modes write and promise (bundles the pipeline runs, resumable runs, frozen weights, one
pseudo-label per weak label), not about accuracy.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
import torch
from click.testing import CliRunner
from PIL import Image

from wsiseg.datasets import open_dataset
from wsiseg.models import load_prompter, load_segmentor
from wsiseg.models.bundles import open_bundle, write_bundle
from wsiseg.pipeline import RunConfig, run_slide
from wsiseg.scheduling import SchedulerConfig
from wsiseg.synthetic import SyntheticSpec, make_nuclei, render_region, truth_mask, write_png
from wsiseg.training.loop import TrainingError
from wsiseg.training.losses import sigmoid_focal_loss, soft_dice_loss
from wsiseg.training.point_matching import MatchWeights, match_points
from wsiseg.training.prompter import PrompterRecipe, train_prompter
from wsiseg.training.pseudo_label import PseudoLabelConfig, pseudo_label
from wsiseg.training.sam_prompts import sample_instance_prompts
from wsiseg.training.segmentor import SegmentorRecipe, SegmentorTask, train_segmentor
from wsiseg.training.unet_prompter import UNetPrompterRecipe, train_unet_prompter
from wsiseg.training.weak_labels import read_weak_geojson

SYNC = SchedulerConfig(scheduler="synchronous")
MPP = 0.5
SIZE = 96
#: the smallest settings of every mode (train quickly, validate never unless a test asks)
FAST = {"epochs": 2, "steps_per_epoch": 2, "batch_size": 2, "mpp": MPP, "val_fraction": 0.34, "device": "cpu",
        "validate_every": 0}
SEGMENTOR = {**FAST, "arch": "vit_test", "crop_px": SIZE, "max_nucleus_diameter_px": 24, "instances_per_crop": 4}
PROMPTER = {**FAST, "backbone": "convnext_test", "num_levels": 3, "hidden_dim": 16, "space": 16, "crop_px": 64,
            "nms_radius_px": 6.0, "context_px": 16}
UNET = {**FAST, "levels": 2, "base_channels": 4, "crop_px": 64, "context_px": 16}
LOSS_KEYS = ("loss", "focal", "dice", "iou_mse", "cls", "reg", "mask", "lr")


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """One torch thread and deterministic kernels, so resumed and uninterrupted runs agree exactly."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(False)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three synthetic images with their instance maps and a manifest.json stating mpp."""
    folder = tmp_path_factory.mktemp("pairs")
    items = []
    for i in range(3):
        spec = SyntheticSpec(SIZE, SIZE, mpp=MPP, seed=20 + i, tissue_fraction=1.0)
        truth = make_nuclei(spec)
        Image.fromarray(render_region(spec, truth, 0, 0, SIZE, SIZE)).save(folder / f"img{i}.png")
        tifffile.imwrite(folder / f"img{i}.labels.tif", truth_mask(spec, truth, 0, 0, SIZE, SIZE).astype(np.uint16))
        items.append({"name": f"img{i}", "image": f"img{i}.png", "labels": f"img{i}.labels.tif", "mpp": MPP})
    (folder / "manifest.json").write_text(json.dumps({"items": items}), encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def slide_png(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("slide") / "slide.png"
    write_png(path, SyntheticSpec(128, 112, mpp=MPP, seed=5, tissue_fraction=1.0))
    return path


def _run(slide: Path, out: Path, **config: Any) -> Any:
    return run_slide(slide, out, RunConfig(mpp=MPP, tissue_detection=False, scheduler=SYNC, **config))


def _losses(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in row.items() if k in LOSS_KEYS or k == "epoch"} for row in history]


# --------------------------------------------------------------------------- segmentor


def test_lora_segmentor_bundle_runs_in_the_pipeline_and_keeps_the_base_encoder(
    dataset: Path, slide_png: Path, tmp_path: Path
) -> None:
    recipe = SegmentorRecipe(data=str(dataset), mode="lora", **{**SEGMENTOR, "validate_every": 1})
    result = train_segmentor(recipe, tmp_path / "run", progress=False)
    assert [row["epoch"] for row in result.history] == [1, 2]
    assert all("val_pq" in row and "val_aji" in row for row in result.history)  # validated through evaluate()

    manifest = open_bundle(result.bundle).manifest
    config = manifest.components["segmentor"].config
    assert config["variant"] == "vit_test" and config["lora"] == {"rank": 4, "alpha": 4.0}
    assert manifest.input_size == SIZE and manifest.k_negatives == 1

    trained = open_bundle(result.bundle).load_weights("segmentor")
    torch.manual_seed(recipe.seed)
    from wsiseg.models.sam.build import build_sam

    initial = build_sam("vit_test", input_size=SIZE).state_dict()
    for key, value in initial.items():
        if key.startswith(("image_encoder.", "prompt_encoder.")):
            assert torch.equal(trained[key], value), f"{key} changed in lora mode"
    assert any(not torch.equal(trained[k], initial[k]) for k in initial if k.startswith("mask_decoder."))
    assert any(trained[k].abs().sum() > 0 for k in trained if "lora_b_" in k)  # adapters learned something

    segmentor = load_segmentor(result.bundle)
    assert segmentor.input_size_px == SIZE
    run = _run(slide_png, tmp_path / "out", model=str(result.bundle), prompter="classical", tile_size_px=SIZE,
               overlap_px=24)
    assert run.report_data["model"]["segmentor"] == "sam-vit_test-lora"
    assert run.zarr.exists()


@pytest.mark.parametrize("mode", ["full", "decoder", "lora"])
def test_each_mode_trains_only_its_parameters(dataset: Path, mode: str) -> None:
    recipe = SegmentorRecipe(data=str(dataset), mode=mode, **SEGMENTOR)
    items = [open_dataset(dataset)[i] for i in range(2)]
    task = SegmentorTask(recipe, items, [])
    trainable = {n.split(".")[0] for n, p in task.model.named_parameters() if p.requires_grad}
    lora = {n for n, p in task.model.named_parameters() if p.requires_grad and ".lora_" in n}
    assert "prompt_encoder" not in trainable
    assert trainable == ({"image_encoder", "mask_decoder"} if mode != "decoder" else {"mask_decoder"})
    if mode == "lora":
        encoder = {n for n, p in task.model.named_parameters() if p.requires_grad and n.startswith("image_encoder.")}
        assert encoder == lora and len(lora) == 4 * 2  # A and B of q and v, in each of the 2 blocks
    else:
        assert not lora


def test_segmentor_starts_from_a_bundle_and_from_an_official_checkpoint(dataset: Path, tmp_path: Path) -> None:
    from wsiseg.models.sam.build import build_sam

    torch.manual_seed(3)
    state = build_sam("vit_test", input_size=SIZE).state_dict()
    torch.save(state, tmp_path / "sam_vit_test.pth")
    bundle = write_bundle(tmp_path / "start", {"name": "start", "mpp": MPP, "input_size": SIZE, "components": {
        "segmentor": {"architecture": "sam", "config": {"variant": "vit_test"}}}}, {"segmentor": state}).path
    for source in ({"checkpoint": str(tmp_path / "sam_vit_test.pth")}, {"init": str(bundle)}):
        settings = {k: v for k, v in SEGMENTOR.items() if k != "arch"}
        task = SegmentorTask(SegmentorRecipe(data=str(dataset), mode="decoder", **settings, **source),
                             [open_dataset(dataset)[0]], [])
        got = task.model.state_dict()
        assert all(torch.equal(got[k], v) for k, v in state.items())
    with pytest.raises(ValueError, match="exactly one of --checkpoint"):
        SegmentorRecipe(data=str(dataset), **{**SEGMENTOR, "init": str(bundle)})


# --------------------------------------------------------------------------- resume


@pytest.mark.parametrize("mode", ["segmentor", "prompter", "unet-prompter"])
def test_resumed_run_has_the_losses_and_weights_of_an_uninterrupted_one(
    dataset: Path, tmp_path: Path, mode: str
) -> None:
    recipe: Any
    if mode == "segmentor":
        recipe, train = SegmentorRecipe(data=str(dataset), mode="full", **SEGMENTOR), train_segmentor
    elif mode == "prompter":
        recipe, train = PrompterRecipe(data=str(dataset), **PROMPTER), train_prompter
    else:
        recipe, train = UNetPrompterRecipe(data=str(dataset), **UNET), train_unet_prompter
    whole = train(recipe, tmp_path / "whole", progress=False)
    first = train(recipe, tmp_path / "parts", progress=False, stop_after_epochs=1)
    assert len(first.history) == 1 and not (tmp_path / "parts" / "bundle").exists()
    with pytest.raises(TrainingError, match="--resume"):
        train(recipe, tmp_path / "parts", progress=False)
    resumed = train(recipe, tmp_path / "parts", progress=False, resume=True)
    assert _losses(resumed.history) == _losses(whole.history)
    role = "segmentor" if mode == "segmentor" else "prompter"
    a = open_bundle(whole.bundle).load_weights(role)
    b = open_bundle(resumed.bundle).load_weights(role)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------- prompters


def test_prompter_bundle_runs_with_the_classical_segmentor(dataset: Path, slide_png: Path, tmp_path: Path) -> None:
    recipe = PrompterRecipe(data=str(dataset), **{**PROMPTER, "validate_every": 2})
    result = train_prompter(recipe, tmp_path / "run", progress=False)
    assert "val_pq" not in result.history[0] and "val_f1_detection" in result.history[1]
    prompter = load_prompter(result.bundle)
    assert type(prompter).__name__ == "PointPrompter" and prompter.mpp == MPP
    assert prompter.model.config.space == 16 and prompter.filtering
    run = _run(slide_png, tmp_path / "out", model="classical", prompter=str(result.bundle))
    assert run.report_data["model"]["prompter"] == "dpa-p2pnet"


def test_unet_prompter_bundle_runs_with_the_classical_segmentor(
    dataset: Path, slide_png: Path, tmp_path: Path
) -> None:
    result = train_unet_prompter(UNetPrompterRecipe(data=str(dataset), **UNET), tmp_path / "run", progress=False)
    prompter = load_prompter(result.bundle)
    assert type(prompter).__name__ == "ProbabilityPrompter" and prompter.selection.method == "centroid"
    run = _run(slide_png, tmp_path / "out", model="classical", prompter=str(result.bundle))
    assert run.report_data["model"]["prompter"] == "unet-prompter"


def test_prompter_at_another_resolution_than_classical_is_validated_with_it(dataset: Path, tmp_path: Path) -> None:
    # the classical segmentor adapts to the learned prompter's 0.25 µm/px (its sizes are in µm)
    recipe = UNetPrompterRecipe(data=str(dataset), **{**UNET, "mpp": 0.25, "validate_every": 1})
    result = train_unet_prompter(recipe, tmp_path / "run", progress=False)
    assert "val_pq" in result.history[-1]


def test_matching_trades_class_probability_against_distance() -> None:
    coords = np.array([[0.0, 0.0], [10.0, 0.0], [30.0, 0.0]])
    truths = np.array([[11.0, 0.0], [1.0, 0.0]])
    confident = np.array([[0.9, 0.1], [0.9, 0.1], [0.9, 0.1]])
    rows, cols = match_points(coords, confident, truths, np.zeros(2, np.int64), MatchWeights())
    assert dict(zip(cols.tolist(), rows.tolist())) == {0: 1, 1: 0}  # equal confidence: nearest wins
    # cost = point_cost * distance - p(class): proposal 0 is confident (p 0.9) but 11 px away,
    # proposal 1 is 1 px away but sure it is background (p 0)
    probs = np.array([[0.9, 0.1], [0.0, 1.0], [0.5, 0.5]])
    rows, _ = match_points(coords, probs, truths[:1], np.zeros(1, np.int64), MatchWeights(point_cost=0.01))
    assert rows.tolist() == [0]  # -0.79 beats 0.01
    rows, _ = match_points(coords, probs, truths[:1], np.zeros(1, np.int64), MatchWeights(point_cost=0.1))
    assert rows.tolist() == [1]  # 0.1 beats 0.2


def test_focal_loss_is_lin_et_al_and_dice_is_zero_for_a_perfect_mask() -> None:
    logits = torch.tensor([2.0, -1.0, 0.5, -3.0])
    target = torch.tensor([1.0, 0.0, 0.0, 1.0])
    p = torch.sigmoid(logits)
    p_t = torch.where(target > 0, p, 1 - p)
    expected = (-((1 - p_t) ** 2) * torch.log(p_t)).mean()
    assert torch.allclose(sigmoid_focal_loss(logits, target), expected)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, target)
    assert torch.allclose(sigmoid_focal_loss(logits, target, gamma=0.0), bce)
    mask = torch.zeros(1, 8, 8)
    mask[0, 2:5, 2:5] = 1
    assert float(soft_dice_loss((mask * 2 - 1) * 50, mask)) < 1e-4
    assert float(soft_dice_loss(-(mask * 2 - 1) * 50, mask)) > 0.99


def test_training_prompts_are_inside_their_nucleus_with_nearest_centroids_as_negatives() -> None:
    labels = np.zeros((40, 40), np.int32)
    labels[2:8, 2:8] = 1  # centroid (5, 5)
    labels[2:8, 20:26] = 2  # centroid (23, 5)
    labels[30:36, 30:36] = 3  # centroid (33, 33)
    prompts = sample_instance_prompts(labels, np.random.default_rng(0), max_instances=16, k_negatives=3)
    assert prompts.ids.tolist() == [1, 2, 3]
    for n, inst in enumerate(prompts.ids):
        x, y = prompts.points[n, 0]
        assert labels[int(y), int(x)] == inst and prompts.labels[n, 0] == 1
        assert prompts.labels[n, 1:].tolist() == [0, 0, -1]  # two other nuclei, then padding
    assert prompts.points[0, 1].tolist() == [23.0, 5.0] and prompts.points[0, 2].tolist() == [33.0, 33.0]
    assert prompts.masks(labels)[1].sum() == 36


# --------------------------------------------------------------------------- pseudo-labels


def _sam_bundle(folder: Path, *, everywhere: bool) -> Path:
    """A vit_test SAM bundle; everywhere=True makes every mask logit positive (a model whose masks
    are bounded only by what pseudo-labelling allows)."""
    from wsiseg.models.sam.build import build_sam

    torch.manual_seed(1)
    model = build_sam("vit_test", input_size=64)
    if everywhere:
        with torch.no_grad():
            model.mask_decoder.output_upscaling[3].weight.zero_()
            model.mask_decoder.output_upscaling[3].bias.fill_(1.0)
            for mlp in model.mask_decoder.output_hypernetworks_mlps:
                mlp.layers[-1].weight.zero_()
                mlp.layers[-1].bias.fill_(1.0)
    manifest = {"name": folder.name, "mpp": MPP, "input_size": 64, "max_nucleus_diameter_px": 6,
                "components": {"segmentor": {"architecture": "sam", "config": {"variant": "vit_test"}}}}
    return Path(write_bundle(folder, manifest, {"segmentor": model.state_dict()}).path)


def test_pseudo_labels_from_points_give_one_nucleus_per_point(dataset: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    rows = ["image,x,y"]
    points: dict[str, np.ndarray] = {}
    for i in range(3):
        xy = np.stack([rng.permutation(np.arange(5, 90, 12))[:5], rng.permutation(np.arange(5, 90, 12))[:5]], 1) + 0.5
        points[f"img{i}"] = xy
        rows += [f"img{i}.png,{x},{y}" for x, y in xy]
    (tmp_path / "points.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    config = PseudoLabelConfig(model=str(_sam_bundle(tmp_path / "sam", everywhere=True)), device="cpu")
    items = pseudo_label(dataset, tmp_path / "pseudo", config, weak=tmp_path / "points.csv")
    assert [it["nuclei"] for it in items] == [5, 5, 5]

    opened = open_dataset(tmp_path / "pseudo")
    assert len(opened) == 3
    for i in range(3):
        item = opened[i]
        assert item.mpp == MPP and item.labels.shape == (SIZE, SIZE)
        ids = {int(item.labels[int(y), int(x)]) for x, y in points[item.name]}
        assert len(ids) == 5 and 0 not in ids  # each point in its own nucleus
        assert len(np.unique(item.labels)) - 1 == 5
        for x, y in points[item.name]:  # a nucleus is no wider than the largest diameter
            rr, cc = np.nonzero(item.labels == item.labels[int(y), int(x)])
            assert np.hypot(cc + 0.5 - x, rr + 0.5 - y).max() <= 6


def test_pseudo_labels_from_label_image_boxes_stay_inside_their_boxes(dataset: Path, tmp_path: Path) -> None:
    config = PseudoLabelConfig(model=str(_sam_bundle(tmp_path / "sam", everywhere=False)), label_prompts="boxes",
                               device="cpu")
    items = pseudo_label(dataset / "img0.png", tmp_path / "pseudo", config)
    truth = tifffile.imread(dataset / "img0.labels.tif")
    pseudo = tifffile.imread(tmp_path / "pseudo" / "img0.labels.tif")
    assert items[0]["weak_labels"] == "boxes" and items[0]["prompts"] == len(np.unique(truth)) - 1
    boxes = np.zeros_like(truth, bool)
    for inst in np.unique(truth)[1:]:
        rr, cc = np.nonzero(truth == inst)
        boxes[rr.min() : rr.max() + 1, cc.min() : cc.max() + 1] = True
    assert not (pseudo[~boxes]).any()
    with pytest.raises(ValueError, match="already holds a dataset"):
        pseudo_label(dataset / "img0.png", tmp_path / "pseudo", config)


def test_qupath_rectangles_are_boxes_and_points_are_points(tmp_path: Path) -> None:
    rect = {"type": "Polygon", "coordinates": [[[10, 20], [16, 20], [16, 27], [10, 27], [10, 20]]]}
    features = [{"type": "Feature", "geometry": rect, "properties": {"objectType": "annotation"}}]
    (tmp_path / "a.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    boxes = read_weak_geojson(tmp_path / "a.geojson")
    assert boxes.kind == "boxes" and boxes.coords.tolist() == [[10, 20, 16, 27]]
    points = [{"type": "Feature", "geometry": {"type": "MultiPoint", "coordinates": [[1, 2], [3, 4]]}}]
    (tmp_path / "b.geojson").write_text(json.dumps(points))
    assert read_weak_geojson(tmp_path / "b.geojson").coords.tolist() == [[1, 2], [3, 4]]
    (tmp_path / "c.geojson").write_text(json.dumps(features + points))
    with pytest.raises(ValueError, match="mixes points"):
        read_weak_geojson(tmp_path / "c.geojson")


# --------------------------------------------------------------------------- command line


def test_train_segmentor_and_pseudo_label_commands(dataset: Path, tmp_path: Path) -> None:
    from wsiseg.cli.main import main

    recipe = tmp_path / "seg.toml"
    recipe.write_text("[model]\nmax_nucleus_diameter_px = 24\ninstances_per_crop = 4\n", encoding="utf-8")
    args = ["train", "segmentor", "--recipe", str(recipe), "--data", str(dataset), "-o", str(tmp_path / "run"),
            "--arch", "vit_test", "--mode", "decoder", "--input-size", str(SIZE), "--epochs", "1",
            "--steps-per-epoch", "1", "--batch-size", "1", "--model-mpp", str(MPP), "--validate-every", "0",
            "--device", "cpu", "-q"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    bundle = tmp_path / "run" / "bundle"
    assert open_bundle(bundle).manifest.max_nucleus_diameter_px == 24

    again = CliRunner().invoke(main, args)
    assert again.exit_code == 2 and "--resume" in again.output

    (tmp_path / "points.csv").write_text("image,x,y\nimg1,30.5,40.5\n", encoding="utf-8")
    sam = _sam_bundle(tmp_path / "sam", everywhere=True)
    result = CliRunner().invoke(main, ["pseudo-label", str(dataset / "img1.png"), "--model", str(sam), "--weak",
                                       str(tmp_path / "points.csv"), "-o", str(tmp_path / "pl"), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "1 images, 1 nuclei" in result.output
