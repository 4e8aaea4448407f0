"""wsiseg-tiny's parts: peaks become points, a watershed gives disjoint masks, bundles load,
and training resumes after a stop with the same loss curve as an uninterrupted run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from wsiseg.models.protocols import PromptBatch
from wsiseg.models.tiny.prompter import PeakSettings, peak_points
from wsiseg.models.tiny.segmentor import WatershedSettings, watershed_masks
from wsiseg.synthetic import SyntheticSpec, make_nuclei, render_region, truth_mask
from wsiseg.training.targets import dense_targets


def _maps_of(labels: np.ndarray) -> np.ndarray:
    """Perfect maps of an instance label image (what a perfectly trained network predicts)."""
    return dense_targets(labels).stack()


def _two_touching_discs() -> np.ndarray:
    yy, xx = np.mgrid[:64, :64]
    labels = np.zeros((64, 64), np.int32)
    labels[(yy - 32) ** 2 + (xx - 22) ** 2 <= 100] = 1
    labels[(yy - 32) ** 2 + (xx - 41) ** 2 <= 100] = 2
    return labels


def test_each_centre_peak_gives_one_point_at_the_nucleus_centre() -> None:
    maps = _maps_of(_two_touching_discs())
    points = peak_points(maps, PeakSettings())
    assert len(points) == 2
    xy = points.xy[np.argsort(points.xy[:, 0])]
    np.testing.assert_allclose(xy, [[22.5, 32.5], [41.5, 32.5]], atol=1.0)
    assert np.all(points.score > 0.9)


def test_a_plateau_gives_one_point_and_background_peaks_none() -> None:
    maps = np.zeros((3, 32, 32), np.float32)
    maps[1, 10:12, 10:12] = 0.8  # a flat 2x2 plateau on foreground
    maps[0, 5:20, 5:20] = 0.9
    maps[1, 25, 25] = 0.9  # a peak on background
    points = peak_points(maps, PeakSettings())
    assert len(points) == 1
    assert 10 <= points.xy[0, 0] <= 12 and 10 <= points.xy[0, 1] <= 12


def test_min_score_threshold_drops_weak_peaks() -> None:
    maps = _maps_of(_two_touching_discs())
    maps[1, :, 30:] *= 0.5  # the right nucleus' peak is weaker
    assert len(peak_points(maps, PeakSettings(threshold=0.3))) == 2
    assert len(peak_points(maps, PeakSettings(threshold=0.6))) == 1


def test_watershed_splits_touching_nuclei_into_disjoint_masks() -> None:
    labels = _two_touching_discs()
    batch = PromptBatch(np.array([[[22.5, 32.5], [41.5, 32.5]], [[41.5, 32.5], [22.5, 32.5]]]),
                        np.array([[1, 0], [1, 0]]))
    tm = watershed_masks(_maps_of(labels), batch, WatershedSettings())
    dense = np.zeros((2, 64, 64), bool)
    for i, (box, m) in enumerate(zip(tm.bbox_px, tm.masks)):
        dense[i, box[1]:box[3], box[0]:box[2]] = m
    assert not (dense[0] & dense[1]).any()
    for i in range(2):
        inter = (dense[i] & (labels == i + 1)).sum()
        union = (dense[i] | (labels == i + 1)).sum()
        assert inter / union > 0.9
    assert np.all(tm.iou > 0.9)


def test_a_point_inside_another_nucleus_never_gives_an_overlapping_mask() -> None:
    labels = np.zeros((64, 64), np.int32)
    yy, xx = np.mgrid[:64, :64]
    labels[(yy - 32) ** 2 + (xx - 32) ** 2 <= 225] = 1
    maps = _maps_of(labels)
    # a nucleolus-like second point 6 px from the centre, each the other's negative
    batch = PromptBatch(np.array([[[32.5, 32.5], [38.5, 32.5]], [[38.5, 32.5], [32.5, 32.5]]]),
                        np.array([[1, 0], [1, 0]]))
    tm = watershed_masks(maps, batch, WatershedSettings())
    dense = np.zeros((2, 64, 64), bool)
    for i, (box, m) in enumerate(zip(tm.bbox_px, tm.masks)):
        dense[i, box[1]:box[3], box[0]:box[2]] = m
    assert not (dense[0] & dense[1]).any()  # carved, never duplicated
    assert (dense[0] | dense[1]).sum() == (labels == 1).sum()


def test_a_prompt_on_background_gets_an_empty_mask() -> None:
    maps = _maps_of(_two_touching_discs())
    batch = PromptBatch(np.array([[[5.5, 5.5], [22.5, 32.5]]]), np.array([[1, 0]]))
    tm = watershed_masks(maps, batch, WatershedSettings())
    assert tm.masks[0].size == 0


def test_masks_are_cut_to_the_largest_nucleus_diameter() -> None:
    labels = np.zeros((128, 128), np.int32)
    labels[10:118, 60:68] = 1  # a long streak, far longer than any nucleus
    tm = watershed_masks(_maps_of(labels), PromptBatch(np.array([[[64.5, 64.5]]]), np.array([[1]])),
                         WatershedSettings(max_nucleus_diameter_px=32))
    x0, y0, x1, y1 = tm.bbox_px[0]
    assert y1 - y0 <= 33 and x1 - x0 <= 33


# --------------------------------------------------------------------------- bundles and training


def _tiny_dataset(folder: Path) -> Path:
    """Two synthetic 0.25 µm/px images with their instance labels, as a pairs dataset."""
    import json

    import tifffile

    folder.mkdir(parents=True, exist_ok=True)
    items = []
    for seed in (11, 12):
        spec = SyntheticSpec(width=160, height=160, mpp=0.25, seed=seed, tissue_fraction=1.0)
        truth = make_nuclei(spec)
        image = render_region(spec, truth, 0, 0, spec.width, spec.height)
        labels = truth_mask(spec, truth, 0, 0, spec.width, spec.height)
        Image.fromarray(image).save(folder / f"img{seed}.png")
        tifffile.imwrite(folder / f"img{seed}.labels.tif", labels.astype(np.uint16))
        items.append({"name": f"img{seed}", "image": f"img{seed}.png", "labels": f"img{seed}.labels.tif", "mpp": 0.25})
    (folder / "manifest.json").write_text(json.dumps({"items": items}))
    return folder


def _recipe(tmp_path: Path, **kw: Any) -> Any:
    from wsiseg.training.tiny import TinyRecipe

    data = _tiny_dataset(tmp_path / "data")
    base = dict(data=str(data), levels=3, base_channels=4, epochs=2, steps_per_epoch=2, batch_size=2, crop_px=64,
                validate_every=0, val_fraction=0.0, threads=1, precision="fp32")
    base.update(kw)
    return TinyRecipe(**base)


def test_training_resumed_after_a_stop_repeats_the_uninterrupted_loss_curve(tmp_path: Path) -> None:
    import torch

    from wsiseg.training.tiny import train_tiny

    recipe = _recipe(tmp_path)
    whole = train_tiny(recipe, tmp_path / "whole", progress=False)
    first = train_tiny(recipe, tmp_path / "split", progress=False, stop_after_epochs=1)
    assert len(first.history) == 1 and not (tmp_path / "split" / "bundle").exists()
    resumed = train_tiny(recipe, tmp_path / "split", resume=True, progress=False)
    losses = [[row[k] for k in ("loss", "fg_bce", "centre", "distance")] for row in whole.history]
    assert losses == [[row[k] for k in ("loss", "fg_bce", "centre", "distance")] for row in resumed.history]
    a = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_second_run_into_the_same_folder_needs_resume(tmp_path: Path) -> None:
    from wsiseg.training.loop import TrainingError
    from wsiseg.training.tiny import train_tiny

    recipe = _recipe(tmp_path, epochs=1, steps_per_epoch=1)
    train_tiny(recipe, tmp_path / "run", progress=False)
    with pytest.raises(TrainingError, match="--resume"):
        train_tiny(recipe, tmp_path / "run", progress=False)
    with pytest.raises(TrainingError, match="nothing to resume"):
        train_tiny(recipe, tmp_path / "other", resume=True, progress=False)


def test_trained_bundle_runs_in_the_pipeline_and_geojson_agrees_with_the_label_raster(tmp_path: Path) -> None:
    import gzip
    import json

    from wsiseg.models import load_prompter, load_segmentor
    from wsiseg.models.tiny import TinyPrompter, TinySegmentor
    from wsiseg.pipeline import RunConfig, run_slide
    from wsiseg.scheduling import SchedulerConfig
    from wsiseg.writers.zarr_store import open_nuclei

    recipe = _recipe(tmp_path, epochs=1, steps_per_epoch=3)
    from wsiseg.training.tiny import train_tiny

    bundle = train_tiny(recipe, tmp_path / "run", progress=False).bundle
    assert isinstance(load_prompter(bundle), TinyPrompter)
    assert isinstance(load_segmentor(bundle), TinySegmentor)
    # both components share one weights file
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert {c["weights"]["file"] for c in manifest["components"].values()} == {"network.safetensors"}

    image = tmp_path / "data" / "img11.png"
    config = RunConfig(model=str(bundle), mpp=0.25, tissue_detection=False, min_score=0.05,
                       scheduler=SchedulerConfig(scheduler="synchronous"))
    result = run_slide(image, tmp_path / "out", config)
    with gzip.open(result.geojson, "rt") as fh:
        features = json.load(fh)["features"]
    store = open_nuclei(result.zarr)
    assert len(features) == store.count == result.n_nuclei
    labels = store.labels(0)[...] if hasattr(store, "labels") else None
    if labels is not None:
        ids = np.unique(labels)
        assert len(ids[ids > 0]) == store.count  # every nucleus keeps pixels: none hidden under another


def test_distance_source_gives_one_point_per_core() -> None:
    maps = _maps_of(_two_touching_discs())
    points = peak_points(maps, PeakSettings(source="distance"))
    assert len(points) == 2
    xy = points.xy[np.argsort(points.xy[:, 0])]
    np.testing.assert_allclose(xy, [[22.5, 32.5], [41.5, 32.5]], atol=1.5)


def test_resuming_with_another_recipe_is_refused(tmp_path: Path) -> None:
    from wsiseg.training.loop import TrainingError
    from wsiseg.training.tiny import train_tiny

    recipe = _recipe(tmp_path)
    train_tiny(recipe, tmp_path / "run", progress=False, stop_after_epochs=1)
    changed = _recipe(tmp_path, lr=0.01)
    with pytest.raises(TrainingError, match="lr: 0.002 in the run, 0.01 now"):
        train_tiny(changed, tmp_path / "run", resume=True, progress=False)


def test_overlap_is_checked_against_the_tile_size_the_model_uses() -> None:
    from wsiseg.models.classical import ClassicalSegmentor
    from wsiseg.pipeline import RunConfig, _tile_size

    config = RunConfig(overlap_px=300)  # fine for a model whose tiles are 512 px
    assert _tile_size(config, _Preferring512()) == 512
    with pytest.raises(ValueError, match=r"--overlap \(300\) must be below the tile size \(256 px\)"):
        _tile_size(config, ClassicalSegmentor())
    with pytest.raises(ValueError, match="--overlap"):
        RunConfig(tile_size_px=256, overlap_px=300)


class _Preferring512:
    input_size_px = None
    preferred_tile_px = 512


def test_a_network_prompter_beside_the_classical_segmentor_keeps_its_own_tiles() -> None:
    from wsiseg.models.cache import BUILTIN_BUNDLES
    from wsiseg.models.classical import ClassicalPrompter, ClassicalSegmentor
    from wsiseg.models.tiny.prompter import TinyPrompter
    from wsiseg.pipeline import RunConfig, _tile_size

    prompter = TinyPrompter.from_bundle(BUILTIN_BUNDLES["wsiseg-tiny"])
    assert prompter.preferred_tile_px == 1024  # the bundle's tile_px, which its segmentor names
    assert _tile_size(RunConfig(), ClassicalSegmentor(), prompter) == 1024
    assert _tile_size(RunConfig(tile_size_px=512), ClassicalSegmentor(), prompter) == 512  # --tile-size wins
    assert _tile_size(RunConfig(), ClassicalSegmentor(), ClassicalPrompter()) == 256
    assert _tile_size(RunConfig(), _Preferring512(), None) == 512


def test_validation_runs_held_out_images_through_eval_and_keeps_their_table(tmp_path: Path) -> None:
    from wsiseg.training.tiny import train_tiny

    recipe = _recipe(tmp_path, epochs=1, steps_per_epoch=1, validate_every=1, val_fraction=0.5)
    result = train_tiny(recipe, tmp_path / "run", progress=False)
    row = result.history[-1]
    assert {"val_pq", "val_aji", "val_f1_detection"} <= set(row)
    table = (tmp_path / "run" / "validation" / "epoch-001" / "eval.csv").read_text().splitlines()
    assert len(table) == 3  # header, the one held-out image, the mean


def test_a_run_started_from_a_bundle_starts_from_its_weights_and_refuses_other_ones(tmp_path: Path) -> None:
    import torch

    from wsiseg.models.bundles import open_bundle
    from wsiseg.training.loop import TrainingError
    from wsiseg.training.tiny import TinyTask, split_items, train_tiny

    first = train_tiny(_recipe(tmp_path, epochs=1, steps_per_epoch=2), tmp_path / "first", progress=False).bundle
    sha = open_bundle(first).component("prompter").sha256
    recipe = _recipe(tmp_path, init_bundle=str(first), init_sha256=sha, seed=5)  # seed 5: other random weights
    task = TinyTask(recipe, *split_items(recipe))
    start = open_bundle(first).load_weights("prompter")
    assert all(torch.equal(task.model.state_dict()[k], v) for k, v in start.items())

    with pytest.raises(TrainingError, match=f"sha256 {sha}, the recipe asks for {'0' * 64}"):
        TinyTask(_recipe(tmp_path, init_bundle=str(first), init_sha256="0" * 64), *split_items(recipe))
    with pytest.raises(ValueError, match="init_bundle and init_sha256 go together"):
        _recipe(tmp_path, init_bundle=str(first))


def test_a_slimmed_unet_computes_the_wide_one_when_the_dropped_channels_are_silent() -> None:
    import torch

    from wsiseg.models.prompters.unet import UNet, UNetConfig
    from wsiseg.training.slim import slim_unet_state

    torch.manual_seed(0)
    wide, narrow = UNetConfig(4, 8, 3), UNetConfig(4, 6, 3)
    net = UNet(wide).eval()
    pick = torch.Generator().manual_seed(1)
    for module in net.modules():  # a quarter of every layer's channels silenced: zero scale and shift
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.normal_()
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.normal_()
            module.bias.data.normal_()
            drop = torch.randperm(module.num_features, generator=pick)[: module.num_features // 4]
            module.weight.data[drop] = 0
            module.bias.data[drop] = 0
        if isinstance(module, torch.nn.ConvTranspose2d):
            drop = torch.randperm(module.out_channels, generator=pick)[: module.out_channels // 4]
            module.weight.data[:, drop] = 0
            module.bias.data[drop] = 0
    slim = UNet(narrow).eval()
    slim.load_state_dict(slim_unet_state(net.state_dict(), wide, narrow))  # strict: every key, every shape
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        np.testing.assert_allclose(slim(x).numpy(), net(x).numpy(), atol=1e-5)
        assert float((UNet(narrow).eval()(x) - net(x)).abs().max()) > 0.1  # a fresh narrow net does not

    with pytest.raises(ValueError, match="cannot widen"):
        slim_unet_state(net.state_dict(), wide, UNetConfig(4, 16, 3))
    with pytest.raises(ValueError, match="keeps the levels"):
        slim_unet_state(net.state_dict(), wide, UNetConfig(3, 6, 3))


def test_a_widened_unet_computes_the_narrow_one_and_its_added_channels_learn() -> None:
    import torch

    from wsiseg.models.prompters.unet import UNet, UNetConfig
    from wsiseg.training.slim import widen_unet_state

    torch.manual_seed(0)
    narrow, wide = UNetConfig(4, 6, 3), UNetConfig(4, 9, 3)
    net = UNet(narrow).eval()
    for module in net.modules():  # trained-looking BatchNorm statistics and affine terms
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.normal_()
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.normal_()
            module.bias.data.normal_()
    fresh = UNet(wide)
    widened = UNet(wide).eval()
    widened.load_state_dict(widen_unet_state(net.state_dict(), narrow, wide, fresh.state_dict()))  # strict
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        np.testing.assert_allclose(widened(x).numpy(), net(x).numpy(), atol=1e-5)
        assert float((fresh.eval()(x) - net(x)).abs().max()) > 0.1  # a fresh wide net does not
    # the zero weights that read the added channels get gradients at once, so training can use them
    widened.train()
    widened(x).square().mean().backward()
    assert float(widened.head.weight.grad[:, 6:].abs().sum()) > 0
    assert float(widened.merge[0][0].weight.grad[:6, 6:9].abs().sum()) > 0
    with pytest.raises(ValueError, match="cannot slim"):
        widen_unet_state(widened.state_dict(), wide, narrow, net.state_dict())
    with pytest.raises(ValueError, match="keeps the levels"):
        widen_unet_state(net.state_dict(), narrow, UNetConfig(3, 9, 3), UNet(UNetConfig(3, 9, 3)).state_dict())


def test_a_narrower_run_starts_from_the_slimmed_bundle_and_learns_from_its_teacher(tmp_path: Path) -> None:
    import torch

    from wsiseg.models.bundles import open_bundle
    from wsiseg.models.prompters.unet import UNet, UNetConfig
    from wsiseg.training.loop import TrainingError
    from wsiseg.training.slim import slim_unet_state
    from wsiseg.training.tiny import TinyTask, split_items, train_tiny

    first = train_tiny(_recipe(tmp_path, epochs=1, steps_per_epoch=1), tmp_path / "first", progress=False).bundle
    sha = open_bundle(first).component("prompter").sha256
    pinned = dict(init_bundle=str(first), init_sha256=sha, teacher_bundle=str(first), teacher_sha256=sha)
    recipe = _recipe(tmp_path, base_channels=3, distill_weight=0.5, **pinned)
    task = TinyTask(recipe, *split_items(recipe))
    expected = slim_unet_state(open_bundle(first).load_weights("prompter"), UNetConfig(3, 4, 3), UNetConfig(3, 3, 3))
    assert all(torch.equal(task.model.state_dict()[k], v) for k, v in expected.items())

    batch = next(task.batches(0, np.random.default_rng(0), 1))
    terms = task.step(batch)
    assert terms["distill"] > 0
    rest = terms["fg_bce"] + terms["fg_dice"] + terms["centre"] + 2.0 * terms["distance"]
    assert terms["loss"] == pytest.approx(rest + 0.5 * terms["distill"], rel=1e-5)
    assert not any(p.requires_grad for p in task.teacher.parameters())  # the teacher does not learn

    run = train_tiny(recipe, tmp_path / "narrow", progress=False)
    assert open_bundle(run.bundle).component("prompter").config["base_channels"] == 3
    assert "distill" in run.history[-1]
    with pytest.raises(TrainingError, match=f"teacher_bundle .*sha256 {sha}, the recipe asks for {'0' * 64}.*into teacher_sha256"):
        TinyTask(_recipe(tmp_path, distill_weight=0.5, teacher_bundle=str(first), teacher_sha256="0" * 64),
                 *split_items(recipe))
    with pytest.raises(ValueError, match="distill_weight > 0 needs a teacher: set teacher_bundle"):
        _recipe(tmp_path, distill_weight=0.5)
    with pytest.raises(ValueError, match="a teacher_bundle needs distill_weight > 0"):
        _recipe(tmp_path, teacher_bundle=str(first), teacher_sha256=sha)
    with pytest.raises(ValueError, match="teacher_bundle and teacher_sha256 go together"):
        _recipe(tmp_path, teacher_bundle=str(first))
    # a teacher at another resolution would see the crops at the wrong scale: refused
    with pytest.raises(TrainingError, match=r"works at 0.25 µm/px and the recipe at 0.5"):
        TinyTask(_recipe(tmp_path, mpp=0.5, distill_weight=0.5, teacher_bundle=str(first), teacher_sha256=sha),
                 *split_items(recipe))
    # a wider recipe starts from the bundle widened: the same maps before training
    wider = TinyTask(_recipe(tmp_path, base_channels=5, init_bundle=str(first), init_sha256=sha), *split_items(recipe))
    narrow_net = UNet(UNetConfig(3, 4, 3)).eval()
    narrow_net.load_state_dict(open_bundle(first).load_weights("prompter"))
    x = torch.randn(1, 3, 32, 32)
    with torch.inference_mode():
        np.testing.assert_allclose(wider.model.eval()(x).numpy(), narrow_net(x).numpy(), atol=1e-5)
    # a start neither can make names the recipe key to change
    with pytest.raises(TrainingError, match=r"needs levels = 3 in the recipe \(the recipe has levels = 4\)"):
        TinyTask(_recipe(tmp_path, levels=4, init_bundle=str(first), init_sha256=sha), *split_items(recipe))


def test_images_without_a_resolution_train_with_data_mpp_and_the_error_names_it(tmp_path: Path) -> None:
    import shutil

    from click.testing import CliRunner

    from wsiseg.cli.main import main

    stated = _tiny_dataset(tmp_path / "stated")
    bare = tmp_path / "bare"  # the same images without the manifest that states their mpp
    bare.mkdir()
    for f in stated.iterdir():
        if f.name != "manifest.json":
            shutil.copy(f, bare / f.name)
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'data = "{bare}"\nlevels = 3\nbase_channels = 4\nepochs = 1\nsteps_per_epoch = 1\n'
                      'batch_size = 2\ncrop_px = 64\nval_fraction = 0.0\nvalidate_every = 0\nthreads = 1\n')
    refused = CliRunner().invoke(main, ["train", "tiny", "--recipe", str(recipe), "-o", str(tmp_path / "a"), "-q"])
    assert refused.exit_code == 2 and "--data-mpp (wsiseg train; data_mpp in a recipe" in refused.output
    done = CliRunner().invoke(main, ["train", "tiny", "--recipe", str(recipe), "-o", str(tmp_path / "b"), "-q",
                                     "--data-mpp", "0.25"])
    assert done.exit_code == 0, done.output
    assert (tmp_path / "b" / "bundle" / "manifest.json").is_file()


def test_network_maps_do_not_depend_on_batching_and_the_inference_form_keeps_the_function() -> None:
    import torch

    from wsiseg.models.prompters.unet import ConcatConv, UNet, UNetConfig
    from wsiseg.models.tiny.maps import DenseMapNet, MapSettings

    torch.manual_seed(0)
    net = UNet(UNetConfig(3, 4, 3))
    for module in net.modules():  # trained-looking statistics, so folding has something to fold
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.2, 0.2)
    net.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        np.testing.assert_allclose(net.fused_for_inference()(x).numpy(), net(x).numpy(), atol=1e-4, rtol=1e-4)
    fused = net.fused_for_inference()
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    assert all(isinstance(block[0], ConcatConv) for block in fused.merge)  # no concatenated copies
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())  # the original is untouched
    assert not any(isinstance(m, ConcatConv) for m in net.modules())

    tiles = np.random.default_rng(0).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    one = DenseMapNet(net, settings=MapSettings(batch=1)).predict_maps(tiles)
    three = DenseMapNet(net, settings=MapSettings(batch=3)).predict_maps(tiles)
    assert DenseMapNet(net).batch == 1  # the CPU default
    np.testing.assert_allclose(one, three, atol=1e-5)


def test_core_score_is_the_centre_peak_when_asked_and_the_foreground_mean_by_default() -> None:
    labels = _two_touching_discs()
    maps = _maps_of(labels).copy()
    maps[1] = np.where(labels == 1, 0.2, np.where(labels == 2, 0.8, 0.0))  # an unsure and a sure centre
    maps[0] = np.where(labels > 0, 0.95, 0.0)
    by_centre = peak_points(maps, PeakSettings(source="distance", score="centre", threshold=0.0))
    by_foreground = peak_points(maps, PeakSettings(source="distance", threshold=0.0))
    order = np.argsort(by_centre.xy[:, 0])
    np.testing.assert_allclose(by_centre.score[order], [0.2, 0.8], atol=1e-6)
    np.testing.assert_allclose(by_foreground.score, [0.95, 0.95], atol=1e-6)
    kept = peak_points(maps, PeakSettings(source="distance", score="centre", threshold=0.5))
    assert len(kept) == 1 and kept.score[0] == pytest.approx(0.8)  # the threshold now drops the unsure one
    with pytest.raises(ValueError, match="score must be"):
        PeakSettings(score="area")


def test_core_points_equal_scipys_maxima_and_break_ties_by_raster_order_wherever_the_core_lies() -> None:
    from scipy import ndimage as ndi

    rng = np.random.default_rng(3)
    maps = rng.random((3, 120, 160)).astype(np.float32)
    maps[2] = ndi.gaussian_filter(maps[2], 3)
    maps[2] = (maps[2] - maps[2].min()) / (maps[2].max() - maps[2].min())  # no equal maxima
    settings = PeakSettings(source="distance", score="centre", threshold=0.0)
    points = peak_points(maps, settings)
    groups, n = ndi.label((maps[2] > 0.5) & (maps[0] > 0.5), structure=np.ones((3, 3), bool))
    index = np.arange(1, n + 1)
    expected = np.asarray(ndi.maximum_position(maps[2], groups, index), np.float64).reshape(-1, 2)[:, ::-1] + 0.5
    assert n > 20 and np.array_equal(points.xy, expected)
    assert np.array_equal(points.score, np.asarray(ndi.maximum(maps[1], groups, index), np.float32))
    # a saturated core: a 5x5 plateau of equal maxima gives its first pixel in raster order,
    # the same pixel of the core wherever the core sits in the tile
    for oy, ox in ((10, 10), (37, 91), (70, 3)):
        flat = np.zeros((3, 96, 128), np.float32)
        flat[0:2, oy : oy + 9, ox : ox + 9] = 1.0
        flat[2, oy : oy + 9, ox : ox + 9] = 0.7
        flat[2, oy + 2 : oy + 7, ox + 2 : ox + 7] = 1.0
        point = peak_points(flat, settings)
        assert len(point) == 1 and np.array_equal(point.xy[0], [ox + 2.5, oy + 2.5])


def test_tta_maps_are_the_mean_of_the_flipped_tiles_maps_flipped_back() -> None:
    import torch

    from wsiseg.models.prompters.unet import UNet, UNetConfig
    from wsiseg.models.tiny.maps import DenseMapNet, MapSettings

    torch.manual_seed(1)
    net = UNet(UNetConfig(3, 4, 3)).eval()
    tiles = np.random.default_rng(1).integers(0, 256, (2, 60, 52, 3), dtype=np.uint8)  # padded to 64 x 56
    plain = DenseMapNet(net, weights_sha256="ab")
    tta = DenseMapNet(net, settings=MapSettings(tta=True), weights_sha256="ab")
    got = tta.predict_maps(tiles)
    # the oracle: the plain net on each flipped tile, its maps flipped back ((B, H, W, 3) tile
    # axes 1 and 2 are the (B, 3, H, W) maps' axes 2 and 3)
    def flipped(axes: tuple[int, ...]) -> np.ndarray:
        maps = plain.predict_maps(np.ascontiguousarray(np.flip(tiles, axes)))
        return np.flip(maps, tuple(a + 1 for a in axes))

    want = np.mean([flipped(axes) for axes in ((), (2,), (1,), (1, 2))], axis=0)
    assert got.shape == (2, 3, 60, 52)
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert not np.allclose(got, plain.predict_maps(tiles), atol=1e-3)  # the flips do change the maps
    assert tta.map_key != plain.map_key  # a map store never mixes the two


def test_tta_applies_to_wsiseg_tiny_models_and_is_refused_for_others_with_the_option_named(tmp_path: Path) -> None:
    from wsiseg.map_store import shares_maps
    from wsiseg.models import load_prompter, load_segmentor, takes_tta
    from wsiseg.pipeline import RunConfig, load_run_models

    _, prompter, segmentor = load_run_models(RunConfig(model="wsiseg-tiny", tta=True))
    assert segmentor.net.settings.tta and prompter.net.settings.tta  # type: ignore[union-attr]
    assert shares_maps(prompter, segmentor)  # still one network pass per tile (with its flips)
    assert takes_tta("wsiseg-tiny", "segmentor") and not takes_tta("classical", "segmentor")
    with pytest.raises(ValueError, match="--tta .* model 'classical'"):
        load_segmentor("classical", tta=True)
    with pytest.raises(ValueError, match="--tta .* model 'classical' has no such prompter"):
        load_prompter("classical", tta=True)
    with pytest.raises(ValueError, match="--tta"):
        load_run_models(RunConfig(model="classical", tta=True))
    # a tiny segmentor paired with a prompter that has no flips: only the segmentor takes them
    _, classical_prompter, tiny_segmentor = load_run_models(RunConfig(model="wsiseg-tiny", prompter="classical", tta=True))
    assert tiny_segmentor.net.settings.tta and not hasattr(classical_prompter, "net")  # type: ignore[union-attr]


def test_auto_precision_is_bf16_only_where_the_hardware_computes_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    import wsiseg.models.tiny.maps as maps

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: X\nflags\t\t: fpu sse2 avx2 avx512_bf16\n\nprocessor\t: 1\n")
    assert {"avx2", "avx512_bf16"} <= maps.cpu_flags(cpuinfo)
    assert maps.cpu_flags(tmp_path / "absent") == frozenset()
    cpu = torch.device("cpu")
    monkeypatch.setattr(maps, "cpu_flags", lambda: frozenset({"avx2", "fma"}))  # an AVX2 CPU: bf16 emulated, slow
    assert maps.resolve_precision("auto", cpu) == "fp32"
    assert maps.resolve_precision("bf16", cpu) == "bf16"  # asked for by name: given
    for flag in ("avx512_bf16", "amx_bf16"):
        monkeypatch.setattr(maps, "cpu_flags", lambda flag=flag: frozenset({"avx2", flag}))
        assert maps.resolve_precision("auto", cpu) == "bf16"
        assert maps.resolve_precision("fp32", cpu) == "fp32"
    with pytest.raises(ValueError, match="precision must be one of auto, fp32, bf16"):
        maps.resolve_precision("fp16", cpu)


def test_bf16_maps_are_close_to_fp32_ones_and_keyed_apart(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    import wsiseg.models.tiny.maps as maps
    from wsiseg.models.prompters.unet import UNet, UNetConfig

    torch.manual_seed(2)
    net = UNet(UNetConfig(3, 4, 3)).eval()
    tiles = np.random.default_rng(2).integers(0, 256, (2, 64, 48, 3), dtype=np.uint8)
    fp32 = maps.DenseMapNet(net, settings=maps.MapSettings(precision="fp32"), weights_sha256="ab")
    bf16 = maps.DenseMapNet(net, settings=maps.MapSettings(precision="bf16"), weights_sha256="ab")
    monkeypatch.setattr(maps, "cpu_flags", lambda: frozenset({"amx_bf16"}))
    auto = maps.DenseMapNet(net, settings=maps.MapSettings(precision="auto"), weights_sha256="ab")
    assert (fp32.precision, bf16.precision, auto.precision) == ("fp32", "bf16", "bf16")
    want, got = fp32.predict_maps(tiles), bf16.predict_maps(tiles)
    assert got.dtype == np.float32 and got.shape == want.shape
    assert 0 < np.abs(got - want).max() < 0.05  # bf16 arithmetic ran, and gave nearly the same maps
    np.testing.assert_array_equal(auto.predict_maps(tiles), got)
    assert fp32.map_key != bf16.map_key == auto.map_key  # a map store never mixes the two precisions


def test_precision_reaches_both_networks_is_recorded_and_refused_for_models_without_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json

    from wsiseg.map_store import shares_maps
    from wsiseg.models import load_prompter, load_segmentor
    from wsiseg.models.cache import resolve_model
    from wsiseg.pipeline import RunConfig, load_run_models

    for precision in ("fp32", "bf16"):
        _, prompter, segmentor = load_run_models(RunConfig(model="wsiseg-tiny", precision=precision))
        assert segmentor.precision == prompter.precision == precision  # type: ignore[union-attr]
        assert shares_maps(prompter, segmentor)
    with pytest.raises(ValueError, match="--precision .* model 'classical' has no such segmentor"):
        load_segmentor("classical", precision="fp32")
    with pytest.raises(ValueError, match="--precision .* model 'classical' has no such prompter"):
        load_prompter("classical", precision="fp32")
    with pytest.raises(ValueError, match="--precision must be auto, fp32 or bf16"):
        RunConfig(precision="fp16")
    with pytest.raises(ValueError, match="--precision .* neither model 'classical' nor its prompter"):
        load_run_models(RunConfig(model="classical", precision="fp32"))
    # a classical segmentor with wsiseg-tiny's prompter: the prompter's network takes it and is recorded
    spec, tiny_prompter, classical = load_run_models(RunConfig(model="classical", prompter="wsiseg-tiny",
                                                               precision="bf16"))
    assert tiny_prompter.precision == "bf16" and not hasattr(classical, "precision")  # type: ignore[union-attr]
    assert spec.precision == "bf16"
    # a bundle naming an unknown precision fails naming the bundle
    bundle = tmp_path / "bad"
    bundle.mkdir()
    source = resolve_model("wsiseg-tiny")
    manifest = json.loads((source / "manifest.json").read_text())
    manifest["components"]["segmentor"]["config"]["precision"] = "fp16"
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    (bundle / "network.safetensors").symlink_to(source / "network.safetensors")
    with pytest.raises(ValueError, match=f"bundle {bundle}.*precision must be one of auto, fp32, bf16, got 'fp16'"):
        load_segmentor(bundle)


def test_auto_is_resolved_where_the_run_starts_and_its_workers_get_the_result(monkeypatch: pytest.MonkeyPatch) -> None:
    import wsiseg.models.tiny.maps as maps
    from wsiseg.pipeline import RunConfig, _decisive, load_run_models
    from wsiseg.workers import WORKER_CACHE

    for flags, want in ((frozenset({"avx512_bf16"}), "bf16"), (frozenset({"avx2"}), "fp32")):
        monkeypatch.setattr(maps, "cpu_flags", lambda flags=flags: flags)  # the machine that starts the run
        WORKER_CACHE.clear()
        spec, prompter, segmentor = load_run_models(RunConfig(model="wsiseg-tiny", precision="auto"))
        assert spec.precision == want == segmentor.precision == prompter.precision  # type: ignore[union-attr]
        config = RunConfig(model="wsiseg-tiny", precision="auto", tile_size_px=1024)
        assert _decisive(config, spec)["parameters"]["precision"] == want  # checkpoints resume in one arithmetic
        # a worker on other hardware builds its models from the spec: it runs the same arithmetic
        monkeypatch.setattr(maps, "cpu_flags", lambda: frozenset({"avx2"} if want == "bf16" else {"amx_bf16"}))
        WORKER_CACHE.clear()
        worker_prompter, worker_segmentor = spec.load()
        assert worker_segmentor.precision == worker_prompter.precision == want  # type: ignore[union-attr]
    WORKER_CACHE.clear()


def test_contact_map_marks_touching_and_close_nuclei_only() -> None:
    from wsiseg.training.targets import contact_map

    labels = np.zeros((40, 60), np.int32)
    labels[5:15, 5:15] = 1
    labels[5:15, 15:25] = 2  # touches 1 along x = 15
    labels[5:15, 40:50] = 3  # alone
    labels[20:30, 5:15] = 4  # 5 px below 1: a gap
    contact = contact_map(labels, 2)
    assert contact[5:15, 13:17].all() and not contact[5:15, 5:12].any()  # the contact of 1 and 2, not 1's far side
    assert not contact[:, 30:].any()  # the lone nucleus, whatever its label, is no contact
    assert not contact[15:20, 5:11].any()  # a 5 px gap is wider than two radii
    assert contact_map(labels, 3)[17:18, 5:11].all()  # and narrower than six: its middle row is
    with pytest.raises(ValueError, match="radius_px"):
        contact_map(labels, 0)


def test_contact_weight_adds_a_contact_channel_and_weighs_those_pixels_in_the_loss(tmp_path: Path) -> None:
    import torch

    from wsiseg.training.tiny import TinyTask, split_items

    recipe = _recipe(tmp_path, contact_weight=4.0, contact_px=2)
    task = TinyTask(recipe, *split_items(recipe))
    labels = np.zeros((160, 160), np.int32)  # a grid of touching 10 px squares: contacts in every crop
    labels[:] = (np.arange(160)[:, None] // 10) * 16 + np.arange(160)[None, :] // 10 + 1
    task.images, task.weights = [(np.full((160, 160, 3), 128, np.uint8), labels)], np.ones(1)
    images, targets = next(task.batches(0, np.random.default_rng(0), 1))
    assert targets.shape == (2, 4, 64, 64) and set(np.unique(targets[:, 3])) == {0.0, 1.0}
    plain = TinyTask(_recipe(tmp_path), *split_items(recipe))
    assert next(plain.batches(0, np.random.default_rng(0), 1))[1].shape == (2, 3, 64, 64)

    t = torch.from_numpy(targets)
    logits = torch.zeros(2, 3, 64, 64)  # every probability 0.5
    weighted, unweighted = task.losses(logits, t), plain.losses(logits, t[:, :3])
    contact = t[:, 3]
    # BCE of p = 0.5 is log 2 everywhere, so the weighted mean is log 2 x mean(1 + 4 x contact)
    assert float(weighted["fg_bce"]) == pytest.approx(float(np.log(2) * (1 + 4 * contact.mean())), rel=1e-5)
    assert float(unweighted["fg_bce"]) == pytest.approx(float(np.log(2)), rel=1e-5)
    squared = (0.5 - t[:, 2]) ** 2
    assert float(weighted["distance"]) == pytest.approx(float(((1 + 4 * contact) * squared).mean()), rel=1e-5)
    for bad in (-1.0, float("nan"), float("inf"), "4", True):
        with pytest.raises(ValueError, match="contact_weight must be a finite number"):
            _recipe(tmp_path, contact_weight=bad)
    for bad_px in (0, 2.5, True):
        with pytest.raises(ValueError, match="contact_px must be a whole number"):
            _recipe(tmp_path, contact_px=bad_px)


def test_sample_by_image_draws_every_image_alike_and_area_in_proportion_to_its_size(tmp_path: Path) -> None:
    from wsiseg.training.tiny import TinyTask, split_items

    by_area = _recipe(tmp_path, mpp_overrides={"img11": 0.5})  # img11 resampled 2x up: 4x the area
    task = TinyTask(by_area, *split_items(by_area))
    sizes = {lab.size for _, lab in task.images}
    assert sorted(task.weights) == pytest.approx([0.2, 0.8]) and len(sizes) == 2
    by_image = _recipe(tmp_path, mpp_overrides={"img11": 0.5}, sample_by="image")
    assert list(TinyTask(by_image, *split_items(by_image)).weights) == pytest.approx([0.5, 0.5])
    with pytest.raises(ValueError, match="sample_by"):
        _recipe(tmp_path, sample_by="nucleus")


# --------------------------------------------------------------------------- HoVer-Net's horizontal and vertical maps


def _hv_probabilities(labels: np.ndarray, merged_distance: bool) -> np.ndarray:
    """(5, H, W) maps a perfect HV network gives for `labels`: foreground, centre, distance (of
    the union of all nuclei when merged_distance: a distance map that does not separate them),
    then h and v as (1 + h) / 2."""
    from wsiseg.training.targets import hv_maps

    base = dense_targets((labels > 0).astype(np.int32) if merged_distance else labels).stack()
    return np.concatenate([base, (1 + hv_maps(labels)) / 2]).astype(np.float32)


def test_hv_maps_run_from_minus_one_to_one_across_each_nucleus_and_jump_between_touching_ones() -> None:
    from wsiseg.training.targets import hv_maps

    labels = np.zeros((20, 30), np.int32)
    labels[5:15, 2:12] = 1
    labels[5:15, 12:22] = 2
    h, v = hv_maps(labels)
    assert h.dtype == np.float32 and h.shape == labels.shape
    np.testing.assert_allclose(h[8, 2:12], np.linspace(-1, 1, 10), atol=1e-6)  # left edge -1, right edge +1
    assert h[8, 11] == 1 and h[8, 12] == -1  # the jump between the two
    np.testing.assert_allclose(v[5:15, 6], np.linspace(-1, 1, 10), atol=1e-6)
    assert not h[labels == 0].any() and not v[labels == 0].any()
    one_column = np.zeros((5, 5), np.int32)
    one_column[1:4, 2] = 7
    assert not hv_maps(one_column)[0].any()  # no horizontal extent: 0, not a division by zero


def test_folding_hv_maps_splits_touching_nuclei_that_the_distance_map_merges() -> None:
    from wsiseg.metrics import score_instances
    from wsiseg.models.tiny.maps import HvSettings, fold_hv

    yy, xx = np.mgrid[:64, :64]
    labels = np.zeros((64, 64), np.int32)  # two discs of radius 10 whose centres are 14 px apart, cut at x = 31
    labels[((yy - 32) ** 2 + (xx - 24) ** 2 <= 100) & (xx < 31)] = 1
    labels[((yy - 32) ** 2 + (xx - 38) ** 2 <= 100) & (xx >= 31)] = 2
    labels[(yy - 10) ** 2 + (xx - 52) ** 2 <= 25] = 3  # and a lone small one
    settings = PeakSettings(threshold=0.0, source="distance", min_distance_px=4)
    merged = _hv_probabilities(labels, merged_distance=True)
    assert len(peak_points(merged[:3], settings)) == 2  # the distance map alone: the pair is one core
    before = merged.copy()
    folded = fold_hv(merged[None], HvSettings())[0]
    np.testing.assert_array_equal(merged, before)  # the input maps are left as they were
    assert folded.shape == (3, 64, 64) and folded.dtype == np.float32
    np.testing.assert_array_equal(folded[:2], merged[:2])  # foreground and centre pass through
    points = peak_points(folded, settings)
    assert len(points) == 3
    order = [[i, *(j for j in range(3) if j != i)] for i in range(3)]  # each point, then the others as negatives
    batch = PromptBatch(points.xy[order].astype(np.float64), np.array([[1, 0, 0]] * 3))
    tm = watershed_masks(folded, batch, WatershedSettings(max_nucleus_diameter_px=64))
    predicted = np.zeros(labels.shape, np.int32)
    for i, (box, mask) in enumerate(zip(tm.bbox_px, tm.masks)):
        view = predicted[box[1] : box[3], box[0] : box[2]]
        assert not (view[mask] > 0).any()  # disjoint masks
        view[mask] = i + 1
    score = score_instances(predicted, labels, mpp=0.25)
    assert score.tp == 3 and score.pq > 0.8
    with pytest.raises(ValueError, match="saturation must be a number > 0"):
        HvSettings(saturation=0)
    with pytest.raises(ValueError, match="unknown keys"):
        HvSettings.from_config({"hv": {"sigma": 1}})
    with pytest.raises(ValueError, match="step_px must be a whole number"):
        HvSettings(step_px=0)


class _Gradients:
    """A stand-in network whose h output is the horizontal gradient of the image's first channel
    and v the vertical one (antisymmetric kernels): flipping the image negates them, as a trained
    network's h and v are meant to be negated."""

    def __init__(self) -> None:
        import torch
        from torch import nn

        self.config = type("Config", (), {"multiple": 4, "out_channels": 5})()
        self.conv = nn.Conv2d(1, 2, 3, padding=1, bias=False)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.weight[0, 0, 1] = torch.tensor([-1.0, 0.0, 1.0])
            self.conv.weight[1, 0, :, 1] = torch.tensor([-1.0, 0.0, 1.0])

    def to(self, *args: Any, **kwargs: Any) -> _Gradients:
        return self

    def eval(self) -> _Gradients:
        return self

    def __call__(self, x: Any) -> Any:
        import torch

        hv = self.conv(x[:, :1].float())
        return torch.cat([torch.zeros_like(x), hv], dim=1)


def test_tta_negates_a_flipped_tiles_h_and_v_maps() -> None:
    from wsiseg.models.tiny.maps import DenseMapNet, HvSettings, MapSettings

    tiles = np.random.default_rng(3).integers(0, 256, (1, 24, 24, 3), dtype=np.uint8)
    plain = DenseMapNet(_Gradients(), hv=HvSettings(), weights_sha256="ab")  # type: ignore[arg-type]
    tta = DenseMapNet(_Gradients(), settings=MapSettings(tta=True), hv=HvSettings(), weights_sha256="ab")  # type: ignore[arg-type]
    want = plain.predict_maps(tiles, fold=False)
    assert np.abs(want[0, 3:] - 0.5).max() > 0.2  # the stand-in's h and v are far from 0
    got = tta.predict_maps(tiles, fold=False)
    # borders aside (a flipped tile's edge is padded on the other side), the flips agree once negated
    np.testing.assert_allclose(got[0, 3:, 1:-1, 1:-1], want[0, 3:, 1:-1, 1:-1], atol=1e-5)
    assert plain.predict_maps(tiles).shape == (1, 3, 24, 24)
    with pytest.raises(ValueError, match="5 outputs needs hv settings"):
        DenseMapNet(_Gradients(), weights_sha256="ab")  # type: ignore[arg-type]


def test_hv_loss_is_zero_for_perfect_maps_and_sobel_measures_slope_per_pixel(tmp_path: Path) -> None:
    import torch

    from wsiseg.training.tiny import TinyTask, sobel_along_axis, split_items

    ramp = torch.arange(16.0).repeat(16, 1)[None, None].repeat(1, 2, 1, 1)  # rises 1 a pixel along x
    slopes = sobel_along_axis(ramp)
    inner = (slice(None), slice(None), slice(2, -2), slice(2, -2))  # 2 px from the repeated edges
    assert torch.allclose(slopes[inner][0, 0], torch.ones(12, 12)) and torch.allclose(slopes[0, 1], torch.zeros(16, 16))

    recipe = _recipe(tmp_path, hv_weight=1.0, hv_gradient_weight=2.0)
    task = TinyTask(recipe, *split_items(recipe))
    assert task.model.config.out_channels == 5
    images, targets = next(task.batches(0, np.random.default_rng(0), 1))
    assert targets.shape == (2, 5, 64, 64) and targets[:, 3:].min() >= -1 and targets[:, 3:].max() <= 1
    t = torch.from_numpy(targets)
    perfect = torch.logit(((1 + t[:, 3:]) / 2).clamp(1e-6, 1 - 1e-6))
    logits = torch.cat([torch.zeros(2, 3, 64, 64), perfect], dim=1)
    terms = task.losses(logits, t)
    assert float(terms["hv"]) < 1e-8 and float(terms["hv_gradient"]) < 1e-6
    off = task.losses(torch.zeros(2, 5, 64, 64), t)  # h = v = 0 everywhere
    assert float(off["hv"]) == pytest.approx(float((t[:, 3:] ** 2).mean()), rel=1e-5)
    assert float(off["loss"]) == pytest.approx(
        float(off["fg_bce"] + off["fg_dice"] + off["centre"] + 2 * off["distance"] + off["hv"] + 2 * off["hv_gradient"]),
        rel=1e-5)
    for bad in (-1.0, float("nan"), True):
        with pytest.raises(ValueError, match="hv_weight must be a finite number"):
            _recipe(tmp_path, hv_weight=bad)
    with pytest.raises(ValueError, match="hv_saturation must be a number > 0"):
        _recipe(tmp_path, hv_weight=1.0, hv_saturation=0.0)
    with pytest.raises(ValueError, match="hv_step_px must be a whole number"):
        _recipe(tmp_path, hv_weight=1.0, hv_step_px=1.5)


def test_a_three_map_bundle_starts_an_hv_run_with_its_maps_unchanged_and_an_hv_bundle_runs(tmp_path: Path) -> None:
    import json

    import torch

    from wsiseg.models.bundles import open_bundle
    from wsiseg.models.tiny.maps import build_network
    from wsiseg.pipeline import RunConfig, run_slide
    from wsiseg.scheduling import SchedulerConfig
    from wsiseg.training.loop import TrainingError
    from wsiseg.training.tiny import TinyTask, split_items, train_tiny

    first = train_tiny(_recipe(tmp_path, epochs=1, steps_per_epoch=2), tmp_path / "first", progress=False).bundle
    sha = open_bundle(first).component("prompter").sha256
    recipe = _recipe(tmp_path, init_bundle=str(first), init_sha256=sha, hv_weight=1.0, seed=5, epochs=1)
    task = TinyTask(recipe, *split_items(recipe))
    narrow = build_network({"levels": 3, "base_channels": 4})
    narrow.load_state_dict(open_bundle(first).load_weights("prompter"))
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        five, three = task.model.eval()(x), narrow.eval()(x)
    assert five.shape[1] == 5 and torch.allclose(five[:, :3], three, atol=1e-6)  # channels-last sums differ in rounding
    assert five[:, 3:].abs().max() > 0  # fresh h and v outputs, not silent ones

    hv_bundle = train_tiny(recipe, tmp_path / "hv", progress=False).bundle
    config = json.loads((hv_bundle / "manifest.json").read_text())["components"]["segmentor"]["config"]
    assert config["hv"] == {"step_px": 1, "saturation": 0.5}
    from click.testing import CliRunner

    from wsiseg.cli.models import models

    shown = CliRunner().invoke(models, ["info", str(hv_bundle)])
    assert shown.exit_code == 0 and "horizontal/vertical maps: cut the distance map" in shown.output
    assert "horizontal and vertical maps" in shown.output  # the description says so too
    hv_sha = open_bundle(hv_bundle).component("prompter").sha256
    with pytest.raises(TrainingError, match="set hv_weight > 0"):
        TinyTask(_recipe(tmp_path, init_bundle=str(hv_bundle), init_sha256=hv_sha), *split_items(recipe))
    result = run_slide(tmp_path / "data" / "img11.png", tmp_path / "out",
                       RunConfig(model=str(hv_bundle), mpp=0.25, tissue_detection=False, min_score=0.05,
                                 scheduler=SchedulerConfig(scheduler="synchronous")))
    assert result.n_nuclei >= 0 and result.geojson.exists()


def test_a_misspelt_recipe_key_is_refused_with_the_closest_known_one(tmp_path: Path) -> None:
    from wsiseg.training.tiny import TinyRecipe

    recipe = tmp_path / "r.toml"
    recipe.write_text('data = "x"\n[train]\nhv_weigth = 1.0\nepochs = 2\n')
    with pytest.raises(ValueError, match=r"unknown recipe keys \['hv_weigth'\] \('hv_weigth': did you mean 'hv_weight'\?\)"):
        TinyRecipe.from_toml(recipe)
    recipe.write_text('data = "x"\nzzzz = 1\n')
    with pytest.raises(ValueError, match=r"unknown recipe keys \['zzzz'\] \(known: "):  # nothing close: no guess
        TinyRecipe.from_toml(recipe)
