from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass

import numpy as np
import pytest
from scipy import ndimage as ndi
from scipy.spatial import cKDTree

from wsiseg.models.classical import ClassicalPrompter, ClassicalSegmentor
from wsiseg.models.protocols import PointSet, PromptBatch, Prompter, Segmentor
from wsiseg.stain import stains_to_rgb

# ---------------------------------------------------------------------- synthetic H&E


@dataclass
class Scene:
    rgb: np.ndarray  # (H, W, 3) uint8
    labels: np.ndarray  # (H, W) int32, nucleus i has label i + 1
    centres: np.ndarray  # (N, 2) x, y (edge frame)


def make_scene(
    size: int = 256,
    n: int = 40,
    seed: int = 0,
    *,
    stain: float = 1.0,
    blur: float = 0.0,
    noise: float = 0.0,
    pairs: int = 4,
    radius_px: tuple[float, float] = (3.5, 9.0),
    aspect: tuple[float, float] = (1.0, 1.6),
    texture: float = 0.25,
) -> Scene:
    """Ellipses of haematoxylin (OD 0.35-0.9 x stain) with chromatin texture on eosin stroma.

    `pairs` nuclei get a touching round partner.  Rendered with the Ruifrok-Johnston
    vectors, then blurred (sigma px) and given Gaussian sensor noise (grey levels)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    labels = np.zeros((size, size), np.int32)
    hmap = 0.06 + 0.24 * ndi.gaussian_filter(rng.standard_normal((size, size)), 6)
    emap = 0.35 + 0.8 * ndi.gaussian_filter(rng.standard_normal((size, size)), 8)
    chromatin = 2.5 * ndi.gaussian_filter(rng.standard_normal((size, size)), 1.2)
    centres: list[tuple[float, float]] = []

    def place(cx: float, cy: float, a: float, b: float, angle: float) -> bool:
        c, s = np.cos(angle), np.sin(angle)
        u = ((xx - cx) * c + (yy - cy) * s) / a
        v = (-(xx - cx) * s + (yy - cy) * c) / b
        inside = u * u + v * v <= 1.0
        if (labels[inside] > 0).any() or inside.sum() < 10:
            return False
        labels[inside] = len(centres) + 1
        hmap[inside] = stain * rng.uniform(0.35, 0.9) * (1 + texture * chromatin[inside])
        emap[inside] *= 0.3
        centres.append((cx, cy))
        return True

    for _ in range(5000):
        if len(centres) >= n:
            break
        r, asp = rng.uniform(*radius_px), rng.uniform(*aspect)
        a, b = r * np.sqrt(asp), r / np.sqrt(asp)
        cx, cy = rng.uniform(10, size - 10, 2)
        if place(cx, cy, a, b, rng.uniform(0, np.pi)) and pairs > 0:
            pairs -= 1
            r2, ang = rng.uniform(*radius_px), rng.uniform(0, 2 * np.pi)
            d = 0.95 * (b + r2)
            place(cx + d * np.cos(ang), cy + d * np.sin(ang), r2, r2, 0.0)
    amounts = np.stack([np.clip(hmap, 0, None), np.clip(emap, 0, None) * stain, np.zeros_like(hmap)], -1)
    rgb = stains_to_rgb(amounts).astype(np.float64)
    if blur:
        rgb = ndi.gaussian_filter(rgb, (blur, blur, 0))
    if noise:
        rgb += rng.normal(0, noise, rgb.shape)
    return Scene(np.clip(np.round(rgb), 0, 255).astype(np.uint8), labels, np.array(centres).reshape(-1, 2))


def prompts_for(xy: np.ndarray, k: int) -> PromptBatch:
    """Each point positive, its k nearest other points negative (as the pipeline sends them)."""
    n = len(xy)
    points = np.zeros((n, k + 1, 2), np.float32)
    labels = -np.ones((n, k + 1), np.int8)
    points[:, 0], labels[:, 0] = xy, 1
    kk = min(k, n - 1)
    if kk > 0:
        _, idx = cKDTree(xy).query(xy, kk + 1)
        points[:, 1 : kk + 1] = xy[idx[:, 1:]]
        labels[:, 1 : kk + 1] = 0
    return PromptBatch(points, labels)


def detection_stats(points: PointSet, scene: Scene) -> tuple[float, int, int, float]:
    """(fraction of nuclei with a point inside, nuclei with 2+ points, points off nuclei,
    median distance from a nucleus' point to its centre)."""
    ij = np.floor(points.xy).astype(int)
    hit = scene.labels[ij[:, 1], ij[:, 0]]
    count = np.bincount(hit, minlength=len(scene.centres) + 1)[1:]
    dist = np.linalg.norm(points.xy[hit > 0] - scene.centres[hit[hit > 0] - 1], axis=1)
    return float((count > 0).mean()), int((count > 1).sum()), int((hit == 0).sum()), float(np.median(dist))


def mask_ious(masks, scene: Scene, xy: np.ndarray) -> np.ndarray:
    """IoU of each prompt's mask with the true nucleus under the prompt (prompts on nuclei)."""
    ij = np.floor(xy).astype(int)
    hit = scene.labels[ij[:, 1], ij[:, 0]]
    out = []
    for i in np.flatnonzero(hit):
        x0, y0, x1, y1 = masks.bbox_px[i]
        full = np.zeros(scene.labels.shape, bool)
        full[y0:y1, x0:x1] = masks.masks[i]
        truth = scene.labels == hit[i]
        out.append((full & truth).sum() / (full | truth).sum())
    return np.array(out)


VARIANTS = {
    "plain": {},
    "pale": {"stain": 0.6},
    "dark": {"stain": 1.5},
    "blur_noise": {"blur": 1.0, "noise": 5.0},
    "pale_blur_noise": {"stain": 0.6, "blur": 1.2, "noise": 6.0},
    "touching": {"pairs": 15},
}


@pytest.fixture(scope="module")
def prompter() -> ClassicalPrompter:
    return ClassicalPrompter()


@pytest.fixture(scope="module")
def segmentor() -> ClassicalSegmentor:
    return ClassicalSegmentor()


# ---------------------------------------------------------------------- prompter


def test_models_satisfy_the_protocols(prompter: ClassicalPrompter, segmentor: ClassicalSegmentor) -> None:
    assert isinstance(prompter, Prompter) and isinstance(segmentor, Segmentor)
    assert prompter.mpp == segmentor.mpp == 0.5
    assert prompter.nms_radius_px == pytest.approx(6.0)
    assert segmentor.input_size_px is None and segmentor.k_negatives == 6
    assert segmentor.halo_px >= segmentor.max_nucleus_diameter_px // 2
    assert [c.name for c in prompter.classes] == ["Nucleus"]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_prompter_finds_each_nucleus_once(prompter: ClassicalPrompter, variant: str) -> None:
    found, doubles, off, n, dists = 0.0, 0, 0, 0, []
    for seed in range(4):
        scene = make_scene(seed=seed, **VARIANTS[variant])
        recall, d, o, med = detection_stats(prompter.detect(scene.rgb), scene)
        found += recall * len(scene.centres)
        n += len(scene.centres)
        doubles, off = doubles + d, off + o
        dists.append(med)
    assert found / n >= 0.95
    assert doubles <= 0.015 * n  # textured ellipses: rarely two blobs in one nucleus
    assert off <= 0.01 * n
    assert np.median(dists) < 1.5


def test_touching_pair_gives_two_points(prompter: ClassicalPrompter) -> None:
    size = 96
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    for distance, h2 in ((11.0, 0.8), (11.0, 0.4), (13.0, 0.6)):
        left = (xx - 40) ** 2 + (yy - 48) ** 2 <= 36
        right = (xx - 40 - distance) ** 2 + (yy - 48) ** 2 <= 36
        h = np.where(left, 0.8, np.where(right, h2, 0.06))
        rgb = stains_to_rgb(np.stack([h, np.full_like(h, 0.3), np.zeros_like(h)], -1))
        pts = prompter.detect(rgb)
        assert len(pts) == 2, (distance, h2)
        assert np.allclose(np.sort(pts.xy[:, 0]), [40, 40 + distance], atol=2.0)
        assert np.allclose(pts.xy[:, 1], 48, atol=1.0)


def test_prompter_output_contract(prompter: ClassicalPrompter) -> None:
    scene = make_scene(seed=7)
    white = np.full((128, 160, 3), 245, np.uint8)
    out = prompter.predict_points(np.stack([scene.rgb[:128, :160], white]))
    assert len(out) == 2 and len(out[1]) == 0
    pts = out[0]
    assert len(pts) > 5
    assert pts.xy.dtype == np.float32 and pts.score.dtype == np.float32
    assert ((pts.score > 0) & (pts.score < 1)).all()
    assert (pts.class_id == 0).all()
    assert ((pts.xy >= 0) & (pts.xy <= [160, 128])).all()
    gaps = cKDTree(pts.xy).query(pts.xy, 2)[0][:, 1]
    assert gaps.min() > prompter.nms_radius_px


def test_interior_points_do_not_depend_on_the_tile(prompter: ClassicalPrompter) -> None:
    scene = make_scene(size=384, n=150, pairs=30, seed=11, blur=0.8, noise=4.0)
    whole = prompter.detect(scene.rgb)
    c = prompter.context_px
    checked = 0
    for y0, x0, h, w in ((0, 0, 200, 210), (37, 101, 190, 283), (161, 5, 223, 250), (90, 120, 2 * c + 30, 2 * c + 41)):
        tile = prompter.detect(np.ascontiguousarray(scene.rgb[y0 : y0 + h, x0 : x0 + w]))
        origin = np.array([x0, y0], np.float32)

        def interior(xy: np.ndarray, w: int = w, h: int = h) -> np.ndarray:
            return (xy[:, 0] > c) & (xy[:, 0] < w - c) & (xy[:, 1] > c) & (xy[:, 1] < h - c)

        mine = interior(tile.xy)
        theirs = interior(whole.xy - origin)
        assert np.array_equal(tile.xy[mine] + origin, whole.xy[theirs])  # bit-identical
        assert np.array_equal(tile.score[mine], whole.score[theirs])
        checked += int(mine.sum())
    assert checked > 40


def test_context_grows_with_the_largest_nucleus() -> None:
    small, large = ClassicalPrompter(max_diameter_um=6.0), ClassicalPrompter(max_diameter_um=14.0)
    assert small.context_px < ClassicalPrompter().context_px < large.context_px
    assert ClassicalPrompter(mpp=0.25).context_px > ClassicalPrompter().context_px


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mpp": 0}, "mpp"),
        ({"min_diameter_um": 8, "max_diameter_um": 4}, "max_diameter_um"),
        ({"min_dip": 1.5}, "min_dip"),
        ({"min_contrast_od": -1}, "min_contrast_od"),
    ],
)
def test_prompter_config_is_validated(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ClassicalPrompter(**kwargs)


def test_prompter_rejects_bad_tiles(prompter: ClassicalPrompter) -> None:
    with pytest.raises(ValueError, match="uint8"):
        prompter.predict_points(np.zeros((1, 32, 32, 3), np.float32))
    with pytest.raises(ValueError, match=r"\(B, H, W, 3\)"):
        prompter.predict_points(np.zeros((32, 32, 3), np.uint8))


# ---------------------------------------------------------------------- segmentor


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_masks_match_true_nuclei(prompter: ClassicalPrompter, segmentor: ClassicalSegmentor, variant: str) -> None:
    ious = []
    for seed in range(3):
        scene = make_scene(seed=seed, **VARIANTS[variant])
        xy = prompter.detect(scene.rgb).xy
        masks = segmentor.segment_tiles(scene.rgb[None], [prompts_for(xy, segmentor.k_negatives)])[0]
        ious.append(mask_ious(masks, scene, xy))
    ious = np.concatenate(ious)
    assert ious.mean() > 0.7
    assert np.percentile(ious, 10) > 0.5


def test_negatives_split_touching_nuclei(segmentor: ClassicalSegmentor) -> None:
    size = 80
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    left = (xx - 33) ** 2 + (yy - 40) ** 2 <= 49
    right = (xx - 46) ** 2 + (yy - 40) ** 2 <= 49
    h = np.where(left | right, 0.7, 0.06)
    rgb = stains_to_rgb(np.stack([h, np.full_like(h, 0.3), np.zeros_like(h)], -1))
    xy = np.array([[33.0, 40.0], [46.0, 40.0]], np.float32)
    paired = segmentor.segment(rgb, prompts_for(xy, 1))
    alone = segmentor.segment(rgb, prompts_for(xy[:1], 0))
    full = []
    for i in range(2):
        m = np.zeros((size, size), bool)
        x0, y0, x1, y1 = paired.bbox_px[i]
        m[y0:y1, x0:x1] = paired.masks[i]
        full.append(m)
        truth = left if i == 0 else right
        assert (m & truth).sum() / (m | truth).sum() > 0.75
    assert not (full[0] & full[1]).any()
    x0, y0, x1, y1 = alone.bbox_px[0]
    assert alone.masks[0].sum() > 1.6 * left.sum()  # without the negative both nuclei merge


def test_mask_depends_only_on_its_window(segmentor: ClassicalSegmentor) -> None:
    scene = make_scene(size=256, n=60, pairs=10, seed=3, blur=0.8, noise=4.0)
    xy = scene.centres.astype(np.float32)
    batch = prompts_for(xy, segmentor.k_negatives)
    whole = segmentor.segment(scene.rgb, batch)
    halo = segmentor.halo_px
    y0, x0, h, w = 30, 41, 170, 190
    inside = np.flatnonzero(
        (np.floor(xy[:, 0]) - halo >= x0)
        & (np.floor(xy[:, 0]) + halo < x0 + w)
        & (np.floor(xy[:, 1]) - halo >= y0)
        & (np.floor(xy[:, 1]) + halo < y0 + h)
    )
    assert len(inside) >= 5
    local = PromptBatch(batch.points[inside] - np.array([x0, y0], np.float32), batch.labels[inside])
    tile = segmentor.segment(np.ascontiguousarray(scene.rgb[y0 : y0 + h, x0 : x0 + w]), local)
    for j, i in enumerate(inside):
        assert np.array_equal(tile.bbox_px[j] + [x0, y0, x0, y0], whole.bbox_px[i])
        assert np.array_equal(tile.masks[j], whole.masks[i])
        assert tile.iou[j] == whole.iou[i]


def test_masks_hold_their_prompt_and_stay_within_the_largest_size(segmentor: ClassicalSegmentor) -> None:
    scene = make_scene(seed=5, radius_px=(6.0, 14.0), aspect=(1.0, 3.0), pairs=8)
    xy = scene.centres.astype(np.float32)
    masks = segmentor.segment(scene.rgb, prompts_for(xy, 6))
    d = segmentor.max_nucleus_diameter_px
    assert (masks.iou >= 0).all() and (masks.iou <= 1).all()
    for (x0, y0, x1, y1), m, (x, y) in zip(masks.bbox_px, masks.masks, xy):
        assert m.shape == (y1 - y0, x1 - x0) and m.dtype == bool
        assert 0 < x1 - x0 <= d and 0 < y1 - y0 <= d
        assert m[int(y) - y0, int(x) - x0] or m.sum() > 0
        assert ndi.label(m)[1] == 1


def test_empty_mask_off_the_tissue_and_for_padding(segmentor: ClassicalSegmentor) -> None:
    scene = make_scene(seed=2, n=5, pairs=0)
    off = np.argwhere(ndi.distance_transform_edt(scene.labels == 0) > 25)[0][::-1] + 0.5
    white = np.full((64, 64, 3), 244, np.uint8)
    masks = segmentor.segment(scene.rgb, prompts_for(np.array([off], np.float32), 0))
    assert masks.bbox_px[0, 2] == masks.bbox_px[0, 0] and masks.masks[0].size == 0 and masks.iou[0] == 0
    on_glass = segmentor.segment(white, prompts_for(np.array([[30.5, 30.5]], np.float32), 0))
    assert on_glass.masks[0].size == 0
    outside = segmentor.segment(white, PromptBatch(np.array([[[-5.0, 3.0]]], np.float32), np.ones((1, 1), np.int8)))
    assert outside.masks[0].size == 0
    none = segmentor.segment_tiles(white[None], [PromptBatch(np.zeros((0, 3, 2)), np.zeros((0, 3)))])[0]
    assert len(none) == 0


def test_segmentor_rejects_bad_input(segmentor: ClassicalSegmentor) -> None:
    tiles = np.zeros((2, 32, 32, 3), np.uint8)
    with pytest.raises(ValueError, match="2 tiles"):
        segmentor.segment_tiles(tiles, [PromptBatch(np.zeros((0, 1, 2)), np.zeros((0, 1)))])
    with pytest.raises(ValueError, match="uint8"):
        segmentor.segment_tiles(tiles.astype(np.float32), [])
    for kwargs, match in (({"level": 1.0}, "level"), ({"k_negatives": -1}, "k_negatives"), ({"mpp": -1}, "mpp")):
        with pytest.raises(ValueError, match=match):
            ClassicalSegmentor(**kwargs)


def test_halo_follows_the_largest_nucleus() -> None:
    seg = ClassicalSegmentor(max_diameter_um=20.0)
    assert seg.max_radius_px == 20 and seg.max_nucleus_diameter_px == 41
    assert seg.halo_px == 20 + 3  # window radius + blur kernel radius
    assert ClassicalSegmentor(mpp=0.25).halo_px > seg.halo_px


# ---------------------------------------------------------------------- with wsiseg.synthetic


def test_finds_the_nuclei_of_the_synthetic_slides(prompter: ClassicalPrompter, segmentor: ClassicalSegmentor) -> None:
    synthetic = pytest.importorskip("wsiseg.synthetic")
    spec = synthetic.SyntheticSpec(384, 384, mpp=0.5, seed=4, tissue_fraction=0.9, touching_fraction=0.05)
    truth = synthetic.make_nuclei(spec)
    rgb = synthetic.render_region(spec, truth, 0, 0, 384, 384)
    labels = synthetic.truth_mask(spec, truth, 0, 0, 384, 384).astype(np.int32)
    scene = Scene(rgb, labels, truth.centers_l0)
    pts = prompter.detect(rgb)
    recall, doubles, off, _ = detection_stats(pts, scene)
    assert recall >= 0.95 and doubles <= 0.02 * len(truth) and off <= 0.03 * len(truth)
    masks = segmentor.segment(rgb, prompts_for(pts.xy, segmentor.k_negatives))
    assert mask_ious(masks, scene, pts.xy).mean() > 0.7


def test_importing_the_model_does_not_import_torch() -> None:
    code = "import sys, wsiseg.models.classical, wsiseg.tissue; assert 'torch' not in sys.modules, 'torch'"
    subprocess.run([sys.executable, "-c", code], check=True)
