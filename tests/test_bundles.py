"""Bundles: manifest validation, weights integrity, safe loading, zips, writing and verifying."""

from __future__ import annotations

import copy
import hashlib
import json
import pickle
import shutil
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch

from wsiseg.models.bundles import (
    FORMAT,
    Bundle,
    BundleError,
    Manifest,
    Normalisation,
    open_bundle,
    verify_bundle,
    write_bundle,
)
from wsiseg.models.protocols import NucleusClass


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("WSISEG_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def make_manifest(**changes: Any) -> dict[str, Any]:
    manifest: dict[str, Any] = {
        "name": "tiny",
        "version": "0.1",
        "description": "random test weights",
        "mpp": 0.25,
        "input_size": 256,
        "k_negatives": 1,
        "nms_radius_px": 11,
        "max_nucleus_diameter_px": 48,
        "classes": [
            {"id": 0, "name": "Tumour", "color": [200, 0, 0]},
            {"id": 1, "name": "Stroma", "color": [0, 150, 0]},
        ],
        "components": {
            "segmentor": {"architecture": "sam", "config": {"variant": "vit_test"}},
            "prompter": {"architecture": "dpa_p2pnet", "config": {"space": 8}},
        },
        "dataset": "pannuke",
    }
    manifest.update(changes)
    return manifest


def make_states(seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return {
        "segmentor": {
            "image_encoder.patch_embed.weight": torch.randn(8, 3, 4, 4, generator=g),
            "prompt_encoder.point_embeddings.0.weight": torch.randn(1, 8, generator=g),
            "mask_decoder.iou_token.weight": torch.randn(1, 8, generator=g).to(torch.bfloat16),
        },
        "prompter": {"conv.weight": torch.randn(4, 4, 3, 3, generator=g), "conv.num_batches": torch.tensor(3)},
    }


def written(tmp_path: Path, **changes: Any) -> Bundle:
    return write_bundle(tmp_path / "bundle", make_manifest(**changes), make_states())


def rewrite_manifest(bundle_dir: Path, edit: Any) -> None:
    data = json.loads((bundle_dir / "manifest.json").read_text())
    edit(data)
    (bundle_dir / "manifest.json").write_text(json.dumps(data))


def test_written_bundle_opens_with_the_manifest_and_weights_it_was_given(tmp_path: Path) -> None:
    bundle = written(tmp_path)
    m = bundle.manifest
    assert (m.name, m.version, m.mpp, m.input_size, m.k_negatives) == ("tiny", "0.1", 0.25, 256, 1)
    assert (m.nms_radius_px, m.max_nucleus_diameter_px) == (11, 48)
    assert m.classes == (NucleusClass(0, "Tumour", (200, 0, 0)), NucleusClass(1, "Stroma", (0, 150, 0)))
    assert m.extra == {"dataset": "pannuke"}
    mean, std = m.normalisation  # defaults to ImageNet on 0-255 input
    assert mean == (123.675, 116.28, 103.53) and std == (58.395, 57.12, 57.375)
    assert bundle.has("segmentor") and bundle.has("prompter")
    seg = m.components["segmentor"]
    assert (seg.architecture, seg.config, seg.file) == ("sam", {"variant": "vit_test"}, "segmentor.safetensors")
    assert seg.sha256 == hashlib.sha256((bundle.root / seg.file).read_bytes()).hexdigest()
    for role, state in make_states().items():
        loaded = bundle.load_weights(role)
        assert loaded.keys() == state.keys()
        for key, tensor in state.items():
            assert loaded[key].dtype == tensor.dtype and torch.equal(loaded[key], tensor)
    assert bundle.sha256 == hashlib.sha256((bundle.root / "manifest.json").read_bytes()).hexdigest()
    assert json.loads((bundle.root / "manifest.json").read_text())["format"] == FORMAT


def test_manifest_round_trips_through_to_dict(tmp_path: Path) -> None:
    m = written(tmp_path).manifest
    assert Manifest.from_dict(m.to_dict()) == m


def test_missing_optional_fields_take_documented_defaults(tmp_path: Path) -> None:
    minimal = {"name": "seg", "mpp": 0.5, "components": {"segmentor": {"architecture": "sam"}}}
    m = write_bundle(tmp_path / "b", minimal, {"segmentor": make_states()["segmentor"]}).manifest
    assert (m.version, m.description, m.input_size, m.k_negatives) == ("1.0", "", None, 0)
    assert (m.nms_radius_px, m.max_nucleus_diameter_px) == (12.0, 64)
    assert [c.name for c in m.classes] == ["Nucleus"]
    assert m.components["segmentor"].config == {}


def test_noncontiguous_and_shared_tensors_are_written_as_plain_copies(tmp_path: Path) -> None:
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    state = {"a.weight": base, "b.weight": base, "c.weight": base.t(), "d.weight": base[1:3]}
    bundle = write_bundle(
        tmp_path / "b", {"name": "x", "mpp": 1.0, "components": {"prompter": {"architecture": "unet_prompter"}}},
        {"prompter": state},
    )  # fmt: skip
    loaded = bundle.load_weights("prompter")
    for key, tensor in state.items():
        assert torch.equal(loaded[key], tensor)


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda d: d.update(format="something-else/3"), "unknown format"),
        (lambda d: d.update(format="wsiseg-bundle/2"), "upgrade wsiseg"),
        (lambda d: d.pop("format"), "unknown format"),
        (lambda d: d.pop("mpp"), "required field(s): mpp"),
        (lambda d: d.pop("name"), "required field(s): name"),
        (lambda d: d.pop("components"), "required field(s): components"),
        (lambda d: d.update(components={}), "components must name"),
        (lambda d: d.update(mpp=0), "mpp must be"),
        (lambda d: d.update(mpp="0.25"), "mpp must be"),
        (lambda d: d.update(input_size=-256), "input_size"),
        (lambda d: d.update(k_negatives=-1), "k_negatives"),
        (lambda d: d.update(nms_radius_px=0), "nms_radius_px"),
        (lambda d: d.update(max_nucleus_diameter_px=10.5), "max_nucleus_diameter_px"),
        (lambda d: d.update(normalisation={"mean": [1, 2], "std": [1, 1, 1]}), "normalisation.mean"),
        (lambda d: d.update(normalisation={"mean": [1, 2, 3], "std": [1, 0, 1]}), "normalisation.std"),
        (lambda d: d["classes"].reverse(), "class ids must be 0..1"),
        (lambda d: d["classes"][0].update(color=[300, 0, 0]), "colour"),
        (lambda d: d["classes"][0].pop("color"), "needs id, name and color"),
        (lambda d: d["classes"][0].update(name="Tumour: grade 2"), "QuPath derived class"),
        (lambda d: d["components"]["segmentor"].update(architecture="vit"), "unknown architecture 'vit'"),
        (lambda d: d["components"].update(prompter=d["components"].pop("segmentor")), "is a segmentor, not a prompter"),
        (lambda d: d["components"].update(decoder=d["components"].pop("segmentor")), "unknown component role"),
        (lambda d: d["components"]["segmentor"].pop("weights"), "needs architecture and weights"),
        (lambda d: d["components"]["segmentor"]["weights"].update(sha256="abc"), "64 lower-case hex"),
        (lambda d: d["components"]["segmentor"]["weights"].update(file="../x.safetensors"), "relative path inside"),
        (lambda d: d["components"]["segmentor"]["weights"].update(file="/etc/x.safetensors"), "relative path inside"),
        (lambda d: d["components"]["segmentor"]["weights"].update(file="segmentor.npz"), "must end in"),
        (lambda d: d["components"]["segmentor"].update(config=[1]), "config of 'sam'"),
    ],
)
def test_invalid_manifest_is_refused_with_the_bundle_path_and_the_problem(
    tmp_path: Path, edit: Any, expected: str
) -> None:
    root = written(tmp_path).root
    rewrite_manifest(root, edit)
    with pytest.raises(BundleError) as info:
        open_bundle(root)
    message = str(info.value)
    assert str(root) in message and expected in message
    assert "\n" not in message


def test_manifest_that_is_not_json_is_refused(tmp_path: Path) -> None:
    root = written(tmp_path).root
    (root / "manifest.json").write_text("{ not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        open_bundle(root)


def test_folder_without_manifest_and_missing_path_are_refused(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(BundleError, match="no manifest.json inside"):
        open_bundle(tmp_path / "empty")
    with pytest.raises(BundleError, match="no such file"):
        open_bundle(tmp_path / "nope")
    (tmp_path / "weights.bin").write_bytes(b"\0" * 10)
    with pytest.raises(BundleError, match="not a bundle folder or .zip"):
        open_bundle(tmp_path / "weights.bin")


def test_missing_weights_file_is_refused_at_open(tmp_path: Path) -> None:
    root = written(tmp_path).root
    (root / "prompter.safetensors").unlink()
    with pytest.raises(BundleError, match="weights file prompter.safetensors is missing"):
        open_bundle(root)


def test_changed_weights_are_refused_by_load_and_reported_by_verify(tmp_path: Path) -> None:
    bundle = written(tmp_path)
    path = bundle.weights_path("segmentor")
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="segmentor.safetensors has sha256 .* the manifest says"):
        bundle.load_weights("segmentor")
    assert torch.equal(bundle.load_weights("prompter")["conv.weight"], make_states()["prompter"]["conv.weight"])
    problems = verify_bundle(bundle.root)
    assert len(problems) == 1 and "segmentor.safetensors" in problems[0] and str(bundle.root) in problems[0]


def test_load_weights_of_an_absent_role_names_the_roles_present(tmp_path: Path) -> None:
    manifest = make_manifest()
    del manifest["components"]["prompter"]
    bundle = write_bundle(tmp_path / "b", manifest, {"segmentor": make_states()["segmentor"]})
    with pytest.raises(BundleError, match="has no prompter component \\(it has: segmentor\\)"):
        bundle.load_weights("prompter")


def _bundle_with_torch_file(tmp_path: Path, payload: object) -> Path:
    root = tmp_path / "pt-bundle"
    root.mkdir()
    torch.save(payload, root / "segmentor.pth")
    sha = hashlib.sha256((root / "segmentor.pth").read_bytes()).hexdigest()
    manifest = {
        "format": FORMAT,
        "name": "pt",
        "mpp": 0.25,
        "components": {"segmentor": {"architecture": "sam", "weights": {"file": "segmentor.pth", "sha256": sha}}},
    }
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def test_torch_weights_load_with_weights_only(tmp_path: Path) -> None:
    state = make_states()["segmentor"]
    bundle = open_bundle(_bundle_with_torch_file(tmp_path, state))
    loaded = bundle.load_weights("segmentor")
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    assert verify_bundle(bundle.root) == []


class _WritesMarker:
    """Unpickling this calls open(marker, "w"): code execution that leaves a file behind."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (open, (str(self.marker), "w"))


def test_pickle_that_would_run_code_is_refused_and_does_not_run(tmp_path: Path) -> None:
    # The payload is live: a plain unpickle of the same bytes creates its marker file.
    proof = tmp_path / "proof"
    pickle.loads(pickle.dumps(_WritesMarker(proof))).close()
    assert proof.exists()

    marker = tmp_path / "marker"
    payload = {"image_encoder.w": torch.zeros(2), "evil": _WritesMarker(marker)}
    bundle = open_bundle(_bundle_with_torch_file(tmp_path, payload))
    with pytest.raises(BundleError, match="refused to load segmentor.pth"):
        bundle.load_weights("segmentor")
    assert not marker.exists()
    assert any("refused" in p for p in verify_bundle(bundle.root))
    assert not marker.exists()


def test_torch_file_that_is_not_a_flat_state_dict_is_refused(tmp_path: Path) -> None:
    bundle = open_bundle(_bundle_with_torch_file(tmp_path, {"model": make_states()["segmentor"]}))
    with pytest.raises(BundleError, match="not a flat state dict"):
        bundle.load_weights("segmentor")


@pytest.mark.parametrize("nested", [False, True])
def test_zip_bundle_opens_from_an_extracted_cache_keyed_by_its_sha256(tmp_path: Path, home: Path, nested: bool) -> None:
    root = written(tmp_path).root
    archive = tmp_path / "bundle.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for f in root.iterdir():
            zf.write(f, f"tiny/{f.name}" if nested else f.name)
    shutil.rmtree(root)
    bundle = open_bundle(archive)
    assert bundle.path == archive.resolve()
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    assert bundle.root.is_relative_to(home / "extracted" / digest[:32])
    assert torch.equal(bundle.load_weights("prompter")["conv.weight"], make_states()["prompter"]["conv.weight"])
    again = open_bundle(archive)
    assert again.root == bundle.root and again.sha256 == bundle.sha256
    assert verify_bundle(archive) == []


def test_zip_with_a_member_outside_the_bundle_is_refused(tmp_path: Path, home: Path) -> None:
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("manifest.json", "{}")
        zf.writestr("../escaped.txt", "x")
    with pytest.raises(BundleError, match="unsafe member name"):
        open_bundle(archive)
    assert not (home / "extracted" / "escaped.txt").exists() and not (home / "escaped.txt").exists()


def test_write_bundle_rejects_bad_input_and_keeps_an_existing_bundle(tmp_path: Path) -> None:
    out = written(tmp_path).root
    before = (out / "manifest.json").read_bytes()
    states = make_states()
    cases: list[tuple[dict[str, Any], Any, str]] = [
        (make_manifest(), {"segmentor": states["segmentor"]}, "component 'prompter' has no state dict"),
        (make_manifest(), {**states, "extra": {}}, "which the manifest lacks"),
        (make_manifest(), {**states, "prompter": {}}, "state dict is empty"),
        (make_manifest(), {**states, "prompter": {"w": [1.0]}}, "entry 'w' is not a tensor"),
        (make_manifest(mpp=-1), states, "mpp must be"),
        ({"name": "x", "mpp": 1}, states, "non-empty 'components'"),
    ]
    for manifest, state_dicts, expected in cases:
        with pytest.raises(BundleError, match=expected):
            write_bundle(out, manifest, state_dicts)
    assert (out / "manifest.json").read_bytes() == before
    assert verify_bundle(out) == []


def test_interrupted_write_leaves_no_manifest_that_could_mismatch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = written(tmp_path).root
    import safetensors.torch

    calls = []

    def failing_save(tensors: Any, path: str, metadata: Any = None) -> None:
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        real_save(tensors, path, metadata=metadata)

    real_save = safetensors.torch.save_file
    monkeypatch.setattr(safetensors.torch, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        write_bundle(out, make_manifest(), make_states(seed=1))
    with pytest.raises(BundleError, match="no manifest.json"):
        open_bundle(out)


def test_verify_reports_non_finite_tensors_and_missing_sam_modules(tmp_path: Path) -> None:
    states = make_states()
    states["prompter"]["conv.weight"][0, 0, 0, 0] = float("nan")
    states["segmentor"] = {"image_encoder.w": torch.zeros(2)}
    bundle = write_bundle(tmp_path / "b", make_manifest(), states)
    problems = verify_bundle(bundle.root)
    assert any("NaN or Inf in 1 tensor(s): conv.weight" in p for p in problems)
    assert any("no prompt_encoder.* keys" in p for p in problems)
    assert any("no mask_decoder.* keys" in p for p in problems)


def test_verify_reports_an_unopenable_bundle_as_one_problem(tmp_path: Path) -> None:
    problems = verify_bundle(tmp_path / "missing")
    assert len(problems) == 1 and "no such file" in problems[0]


def test_normalisation_and_manifest_validate_directly() -> None:
    assert tuple(Normalisation((1, 2, 3), (4, 5, 6))) == ((1, 2, 3), (4, 5, 6))
    with pytest.raises(ValueError, match="std must be > 0"):
        Normalisation((1, 2, 3), (0, 1, 1))
    manifest = make_manifest()
    for comp in manifest["components"].values():
        comp["weights"] = {"file": "w.safetensors", "sha256": "0" * 64}
    good = Manifest.from_dict({"format": FORMAT, **manifest})
    with pytest.raises(ValueError, match="class ids"):
        Manifest(name="x", mpp=1.0, components=good.components, classes=(NucleusClass(1, "A", (0, 0, 0)),))
    assert copy.deepcopy(good) == good
