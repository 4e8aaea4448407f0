"""The model cache, the loaders' dispatch, the lazy `wsiseg.models` API and `wsiseg models`."""

from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from wsiseg.cli.models import models

import wsiseg.models
from wsiseg.models import load_prompter, load_segmentor, model_info
from wsiseg.models.bundles import Bundle, BundleError, open_bundle, write_bundle
from wsiseg.models.cache import ModelNotFoundError, import_bundle, list_bundles, resolve_model


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("WSISEG_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def make_bundle(out: Path, name: str = "tiny", *, roles: tuple[str, ...] = ("segmentor",), seed: int = 0) -> Bundle:
    g = torch.Generator().manual_seed(seed)
    components: dict[str, Any] = {}
    states: dict[str, Any] = {}
    if "segmentor" in roles:
        components["segmentor"] = {"architecture": "sam", "config": {"variant": "vit_test"}}
        states["segmentor"] = {
            f"{m}.w": torch.randn(3, 2, generator=g) for m in ("image_encoder", "prompt_encoder", "mask_decoder")
        }
    if "prompter" in roles:
        components["prompter"] = {"architecture": "unet_prompter", "config": {}}
        states["prompter"] = {"conv.weight": torch.randn(2, 2, generator=g)}
    manifest = {
        "name": name,
        "description": "random test weights",
        "mpp": 0.5,
        "input_size": 256,
        "classes": [{"id": 0, "name": "Tumour", "color": [200, 0, 0]}],
        "components": components,
    }
    return write_bundle(out, manifest, states)


def run(*args: str) -> Any:
    return CliRunner().invoke(models, list(args))


# --- the package API ---------------------------------------------------------------------


def test_import_wsiseg_models_does_not_import_torch(tmp_path: Path) -> None:
    code = "import sys, wsiseg.models, wsiseg.cli.models; print('torch' in sys.modules)"
    # run outside the source tree, so the installed package (with wsiseg.cli) is imported
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path)
    assert result.stdout.strip() == "False"


def test_every_name_in_all_resolves() -> None:
    for name in wsiseg.models.__all__:
        assert getattr(wsiseg.models, name) is not None, name
    assert set(wsiseg.models.__all__) <= set(dir(wsiseg.models))
    with pytest.raises(AttributeError):
        wsiseg.models.no_such_name  # noqa: B018


# --- the cache -----------------------------------------------------------------------------


def test_resolve_model_knows_builtins_paths_and_cached_names(tmp_path: Path, home: Path) -> None:
    assert resolve_model("classical") == "classical"
    bundle = make_bundle(tmp_path / "b")
    assert resolve_model(tmp_path / "b") == bundle.root
    cached = import_bundle(bundle.root)
    assert cached == home / "bundles" / "tiny"
    assert resolve_model("tiny") == cached
    with pytest.raises(ModelNotFoundError, match="wsiseg models pull sam_vit_b"):
        resolve_model("sam_vit_b")
    with pytest.raises(ModelNotFoundError, match="no bundle of that name in .*wsiseg models list"):
        resolve_model("nothing-here")


def test_import_bundle_copies_only_the_bundle_and_checks_its_hashes(tmp_path: Path, home: Path) -> None:
    bundle = make_bundle(tmp_path / "b")
    (bundle.root / "notes.txt").write_text("not part of the bundle")
    cached = import_bundle(bundle.root, "renamed")
    assert sorted(p.name for p in cached.iterdir()) == ["manifest.json", "segmentor.safetensors"]
    assert open_bundle(cached).sha256 == bundle.sha256
    assert import_bundle(bundle.root, "renamed") == cached  # identical: kept, no error

    other = make_bundle(tmp_path / "other", seed=1)
    with pytest.raises(BundleError, match="already cached .* --force"):
        import_bundle(other.root, "renamed")
    assert open_bundle(cached).sha256 == bundle.sha256
    import_bundle(other.root, "renamed", overwrite=True)
    assert open_bundle(cached).sha256 == other.sha256
    assert [p.name for p in (home / "bundles").iterdir()] == ["renamed"]  # no staging left behind


def test_import_bundle_refuses_bad_names_and_corrupt_weights(tmp_path: Path, home: Path) -> None:
    bundle = make_bundle(tmp_path / "b")
    for bad in ("classical", "../up", "a b", ".hidden"):
        with pytest.raises(BundleError, match="cannot be a cache name"):
            import_bundle(bundle.root, bad)
    weights = bundle.weights_path("segmentor")
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x00")
    with pytest.raises(BundleError, match="does not match its sha256"):
        import_bundle(bundle.root)
    assert not (home / "bundles" / "tiny").exists()


def test_list_bundles_shows_builtins_cached_and_broken_bundles(tmp_path: Path, home: Path) -> None:
    import_bundle(make_bundle(tmp_path / "b", roles=("prompter", "segmentor")).root, "good")
    (home / "bundles" / "broken").mkdir()
    entries = {e.name: e for e in list_bundles()}
    assert entries["classical"].builtin and entries["classical"].path is None
    shipped = entries["wsiseg-tiny"]  # a bundle inside the package: its folder, parts and mpp are listed
    assert shipped.builtin and shipped.path is not None and (shipped.path / "manifest.json").is_file()
    assert dict(shipped.components) == {"prompter": "tiny_prompter", "segmentor": "tiny_segmentor"}
    assert shipped.mpp == 0.25
    good = entries["good"]
    assert dict(good.components) == {"prompter": "unet_prompter", "segmentor": "sam"}
    assert good.mpp == 0.5 and good.problem is None
    assert "no manifest.json" in (entries["broken"].problem or "")
    assert [e.name for e in list_bundles(include_builtin=False)] == ["broken", "good"]


# --- loaders ---------------------------------------------------------------------------------


class _Built:
    calls: list[tuple[str, Any, dict[str, Any]]] = []

    def __init__(self, how: str, source: Any, options: dict[str, Any]) -> None:
        self.how, self.source, self.options = how, source, options

    @classmethod
    def from_bundle(cls, bundle: Bundle, **options: Any) -> _Built:
        return cls("bundle", bundle, options)

    @classmethod
    def from_checkpoint(cls, path: Path, **options: Any) -> _Built:
        return cls("checkpoint", path, options)


@pytest.fixture()
def fake_families(monkeypatch: pytest.MonkeyPatch) -> None:
    sam = types.ModuleType("wsiseg.models.sam")
    sam.SamSegmentor = type("SamSegmentor", (_Built,), {})  # type: ignore[attr-defined]
    prompters = types.ModuleType("wsiseg.models.prompters")
    prompters.PointPrompter = type("PointPrompter", (_Built,), {})  # type: ignore[attr-defined]
    prompters.ProbabilityPrompter = type("ProbabilityPrompter", (_Built,), {})  # type: ignore[attr-defined]
    classical = types.ModuleType("wsiseg.models.classical")
    classical.ClassicalSegmentor = lambda **kw: ("classical-segmentor", kw)  # type: ignore[attr-defined]
    classical.ClassicalPrompter = lambda **kw: ("classical-prompter", kw)  # type: ignore[attr-defined]
    for module in (sam, prompters, classical):
        monkeypatch.setitem(sys.modules, module.__name__, module)


@pytest.mark.usefixtures("fake_families")
def test_loaders_dispatch_on_the_component_architecture(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "b", roles=("prompter", "segmentor"))
    import_bundle(bundle.root, "both")
    seg: Any = load_segmentor("both", input_size=128, device="cuda", k_negatives=2)
    assert type(seg).__name__ == "SamSegmentor" and seg.how == "bundle"
    assert seg.source.manifest.name == "tiny"
    assert seg.options == {"input_size": 128, "device": "cuda", "k_negatives": 2}
    prompter: Any = load_prompter(bundle.root, device="cpu", selection="centroid")
    assert type(prompter).__name__ == "ProbabilityPrompter"
    assert prompter.options == {"device": "cpu", "selection": "centroid"}


@pytest.mark.usefixtures("fake_families")
def test_loaders_handle_classical_and_raw_checkpoints(tmp_path: Path) -> None:
    assert load_segmentor("classical") == ("classical-segmentor", {})
    assert load_segmentor("classical", k_negatives=3) == ("classical-segmentor", {"k_negatives": 3})
    assert load_prompter("classical", threshold=0.2) == ("classical-prompter", {"threshold": 0.2})
    checkpoint = tmp_path / "sam_vit_b_01ec64.pth"
    checkpoint.write_bytes(b"not opened by the dispatcher")
    seg: Any = load_segmentor(checkpoint, input_size=256)
    assert (seg.how, seg.source, seg.options) == ("checkpoint", checkpoint, {"device": "cpu", "input_size": 256})
    with pytest.raises(BundleError, match="models import promptnucseg"):
        load_prompter(checkpoint)


@pytest.mark.usefixtures("fake_families")
def test_loading_a_role_the_bundle_lacks_names_what_it_has(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "b", roles=("segmentor",))
    with pytest.raises(BundleError, match="has no prompter component \\(it has: segmentor\\)"):
        load_prompter(bundle.root)


def test_model_info_summarises_the_manifest(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "b")
    info = model_info(bundle.root)
    assert (info["name"], info["mpp"], info["input_size"], info["kind"]) == ("tiny", 0.5, 256, "bundle")
    seg = info["components"]["segmentor"]
    assert seg["architecture"] == "sam" and seg["config"] == {"variant": "vit_test"}
    assert seg["size_bytes"] == bundle.weights_path("segmentor").stat().st_size
    assert seg["weights"]["sha256"] == bundle.manifest.components["segmentor"].sha256
    assert info["bundle_sha256"] == bundle.sha256
    assert model_info("classical")["builtin"] is True
    json.dumps(info)


# --- the CLI ---------------------------------------------------------------------------------


def test_cli_list_and_info(tmp_path: Path) -> None:
    import_bundle(make_bundle(tmp_path / "b").root, "tiny")
    result = run("list")
    assert result.exit_code == 0
    lines = result.output.splitlines()
    assert lines[0].startswith("wsiseg-tiny") and "built-in" in lines[0]  # the default comes first
    assert any(line.startswith("classical") and "built-in" in line for line in lines)
    assert any(line.startswith("tiny") and "sam @ 0.5 mpp" in line for line in lines)
    assert any(line.startswith("sam_vit_b") for line in lines)  # pullable
    listed = json.loads(run("list", "--json").output)
    assert {"wsiseg-tiny", "classical", "tiny", "sam_vit_b"} <= {row["name"] for row in listed}
    # versions, from the manifests: the built-in bundle's, and the cached one's
    from wsiseg.models.bundles import open_bundle
    from wsiseg.models.cache import BUILTIN_BUNDLES

    shipped = str(open_bundle(BUILTIN_BUNDLES["wsiseg-tiny"]).manifest.version)
    cached = str(open_bundle(tmp_path / "b").manifest.version)
    assert f"built-in {shipped} " in lines[0]
    assert any(line.startswith("tiny") and f"{cached} sam @ 0.5 mpp" in line for line in lines)
    versions = {row["name"]: row.get("version") for row in listed}
    assert versions["wsiseg-tiny"] == shipped and versions["tiny"] == cached and versions["classical"] is None

    info = run("info", "tiny")
    assert info.exit_code == 0
    assert "mpp: 0.5 um/px" in info.output and "input size: 256 px" in info.output
    assert "segmentor: sam (vit_test)" in info.output and "0 Tumour (200, 0, 0)" in info.output
    assert json.loads(run("info", "tiny", "--json").output)["name"] == "tiny"
    assert run("show", "tiny").output == info.output  # `show` is the same command


def test_cli_info_shows_the_builtin_models_card() -> None:
    """A user deciding whether they may use the weights sees their data, licence and citations."""
    info = run("info", "wsiseg-tiny")
    assert info.exit_code == 0, info.output
    assert "trained on: MoNuSeg 2018 training set" in info.output
    assert "licence: CC BY-NC-SA 4.0" in info.output
    assert sum(line.startswith("  cite: ") for line in info.output.splitlines()) == 2
    assert "intended use: " in info.output


def test_cli_errors_are_one_line_with_a_non_zero_exit() -> None:
    result = run("info", "no-such-model")
    assert result.exit_code == 1
    assert result.output.startswith("Error: model 'no-such-model'") and result.output.count("\n") == 1


def test_cli_verify_exit_code_follows_the_problems(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "b")
    ok = run("verify", str(bundle.root))
    assert ok.exit_code == 0 and "OK" in ok.output
    weights = bundle.weights_path("segmentor")
    weights.write_bytes(weights.read_bytes() + b"trailing")
    bad = run("verify", str(bundle.root))
    assert bad.exit_code == 1
    assert "1 problem(s)" in bad.output and "segmentor.safetensors has sha256" in bad.output


def test_cli_import_bundle_into_the_cache(tmp_path: Path, home: Path) -> None:
    bundle = make_bundle(tmp_path / "b")
    result = run("import", "bundle", str(bundle.root), "--name", "mine")
    assert result.exit_code == 0, result.output
    assert open_bundle(home / "bundles" / "mine").sha256 == bundle.sha256
    other = make_bundle(tmp_path / "other", seed=1)
    clash = run("import", "bundle", str(other.root), "--name", "mine")
    assert clash.exit_code == 1 and "--force" in clash.output
    assert run("import", "bundle", str(other.root), "--name", "mine", "--force").exit_code == 0
    assert open_bundle(home / "bundles" / "mine").sha256 == other.sha256
    misuse = run("import", "bundle", str(other.root), "--mpp", "0.5")
    assert misuse.exit_code == 2 and "do not apply" in misuse.output


@pytest.fixture()
def fake_converters(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, Any, Any, dict[str, Any]]]:
    """Stand-ins for the SAM and PromptNucSeg converters that record their calls."""
    calls: list[tuple[str, Any, Any, dict[str, Any]]] = []

    def convert_sam_checkpoint(pth: Path, out_dir: Path, **kw: Any) -> Path:
        calls.append(("sam", pth, out_dir, kw))
        return make_bundle(Path(out_dir), kw["name"]).root

    def convert_promptnucseg_prompter(pth: Path, out_dir: Path, **kw: Any) -> Path:
        calls.append(("prompter", pth, out_dir, kw))
        assert open_bundle(kw["segmentor_bundle"]).has("segmentor")
        return make_bundle(Path(out_dir), kw["name"], roles=("prompter", "segmentor")).root

    sam = types.ModuleType("wsiseg.models.sam.convert")
    sam.convert_sam_checkpoint = convert_sam_checkpoint  # type: ignore[attr-defined]
    prompters = types.ModuleType("wsiseg.models.prompters.convert")
    prompters.convert_promptnucseg_prompter = convert_promptnucseg_prompter  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, sam.__name__, sam)
    monkeypatch.setitem(sys.modules, prompters.__name__, prompters)
    return calls


def test_cli_import_sam_writes_a_bundle_or_fills_the_cache(
    tmp_path: Path, home: Path, fake_converters: list[Any]
) -> None:
    pth = tmp_path / "sam_vit_b_01ec64.pth"
    pth.write_bytes(b"checkpoint")
    result = run("import", "sam", str(pth), "-o", str(tmp_path / "out"), "--mpp", "0.5")
    assert result.exit_code == 0, result.output
    assert fake_converters[0] == ("sam", pth, tmp_path / "out", {"name": "out", "mpp": 0.5})
    assert open_bundle(tmp_path / "out").has("segmentor")

    result = run("import", "sam", str(pth))
    assert result.exit_code == 0, result.output
    assert open_bundle(home / "bundles" / "sam_vit_b_01ec64").manifest.name == "sam_vit_b_01ec64"
    assert [p.name for p in (home / "bundles").iterdir()] == ["sam_vit_b_01ec64"]

    wrong = run("import", "sam", str(pth), str(pth))
    assert wrong.exit_code == 2 and "takes one SAM .pth, got 2" in wrong.output
    assert run("import", "sam", str(pth), "--dataset", "kumar").exit_code == 2


def test_cli_import_promptnucseg_makes_one_bundle_with_both_models(tmp_path: Path, fake_converters: list[Any]) -> None:
    prompter, segmentor = tmp_path / "prompter.pth", tmp_path / "segmentor.pth"
    prompter.write_bytes(b"p")
    segmentor.write_bytes(b"s")
    out = tmp_path / "kumar-b"
    result = run("import", "promptnucseg", str(prompter), str(segmentor), "-o", str(out), "--dataset", "kumar")
    assert result.exit_code == 0, result.output
    (k1, pth1, _, kw1), (k2, pth2, out2, kw2) = fake_converters
    assert (k1, pth1, kw1["name"]) == ("sam", segmentor, "kumar-b-segmentor")
    assert (k2, pth2, out2, kw2["name"], kw2["dataset"]) == ("prompter", prompter, out, "kumar-b", "kumar")
    bundle = open_bundle(out)
    assert bundle.has("prompter") and bundle.has("segmentor")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kumar-b", "prompter.pth", "segmentor.pth"]


def test_cli_converter_failure_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(pth: Path, out_dir: Path, **kw: Any) -> Path:
        raise ValueError(f"{pth}: missing keys image_encoder.pos_embed\n(and 3 more)")

    module = types.ModuleType("wsiseg.models.sam.convert")
    module.convert_sam_checkpoint = broken  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, module.__name__, module)
    pth = tmp_path / "x.pth"
    pth.write_bytes(b"x")
    result = run("import", "sam", str(pth), "-o", str(tmp_path / "out"))
    assert result.exit_code == 1
    assert result.output.count("\n") == 1 and "missing keys image_encoder.pos_embed (and 3 more)" in result.output


def test_cli_import_sam_with_the_real_converter_gives_a_loadable_segmentor(tmp_path: Path) -> None:
    try:
        from wsiseg.models.sam import build_sam
    except ImportError as exc:  # pragma: no cover - the SAM family is optional here
        pytest.skip(f"SAM family unavailable: {exc}")
    pth = tmp_path / "tiny_sam.pth"
    torch.save(build_sam("vit_test").state_dict(), pth)
    result = run("import", "sam", str(pth), "--name", "tiny-sam", "--mpp", "0.5")
    assert result.exit_code == 0, result.output
    assert run("verify", "tiny-sam").exit_code == 0
    segmentor = load_segmentor("tiny-sam", k_negatives=2)
    assert type(segmentor).__name__ == "SamSegmentor"
    assert (segmentor.mpp, segmentor.input_size_px, segmentor.k_negatives) == (0.5, 256, 2)
    assert model_info("tiny-sam")["components"]["segmentor"]["config"]["variant"] == "vit_test"


def test_classical_builtins_load_as_protocol_models() -> None:
    classical = pytest.importorskip("wsiseg.models.classical")
    from wsiseg.models.protocols import Prompter, Segmentor

    assert isinstance(load_prompter("classical"), Prompter)
    if not hasattr(classical, "ClassicalSegmentor"):
        pytest.skip("ClassicalSegmentor not available yet")
    assert isinstance(load_segmentor("classical"), Segmentor)
