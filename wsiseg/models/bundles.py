"""Model bundles: a folder (or a .zip of one) with `manifest.json` and safetensors weights.

CONTRACT (shared by the SAM segmentor, the prompters, the converters and the CLI):

manifest.json
    {
      "format": "wsiseg-bundle/1",
      "name": "pannuke123-vit_b", "version": "1.0", "description": "...",
      "mpp": 0.25,                      # micrometres per pixel the models were trained at
      "input_size": 256,                # tile size in px the segmentor wants (null: any)
      "normalisation": {"mean": [123.675, 116.28, 103.53], "std": [58.395, 57.12, 57.375]},
      "k_negatives": 0,                 # negatives per prompt at inference
      "nms_radius_px": 12,              # point NMS radius for the prompter's points
      "max_nucleus_diameter_px": 64,    # sets the tile halo
      "classes": [{"id": 0, "name": "Neoplastic", "color": [255, 0, 0]}, ...],
      "components": {
        "prompter":  {"architecture": "dpa_p2pnet", "config": {...},
                      "weights": {"file": "prompter.safetensors", "sha256": "<hex>"}},
        "segmentor": {"architecture": "sam", "config": {"variant": "vit_b", ...},
                      "weights": {"file": "segmentor.safetensors", "sha256": "<hex>"}}
      }
    }
  A bundle may have either component or both.  Architectures: "sam", "dpa_p2pnet",
  "unet_prompter".
  Required: format, name, mpp, components (each with architecture and weights file/sha256).
  Defaults when absent: version "1.0", description "", input_size null, normalisation the
  ImageNet values above (0-255 input), k_negatives 0, nms_radius_px 12,
  max_nucleus_diameter_px 64, classes [Nucleus], config {}.  Class ids must be 0..n-1 in
  order (a point's class_id indexes `classes`).  "sam" is a segmentor architecture, the
  others prompter architectures.  Any other top-level key (e.g. "dataset", "source") is kept
  in Manifest.extra.  Weights files lie inside the bundle folder: .safetensors, or .pt/.pth
  read with torch.load(weights_only=True).

Python API
    open_bundle(path) -> Bundle           # folder or .zip; validates manifest, reads no weights
    Bundle.path, Bundle.manifest (Manifest), Bundle.has(role)
    Bundle.load_weights(role) -> dict[str, torch.Tensor]   # verifies sha256 first
    Manifest fields: name, version, description, mpp, input_size, normalisation (mean, std),
        k_negatives, nms_radius_px, max_nucleus_diameter_px, classes (tuple[NucleusClass, ...]),
        components: dict[str, Component]; Component(architecture, config: dict, file, sha256)
    write_bundle(out_dir, manifest_dict_without_sha, {role: state_dict}) -> Bundle
        # writes safetensors per role, fills in file names and sha256, writes manifest.json
    BundleError(ValueError): every problem, message names the bundle path and what is wrong.
  Also: Bundle.root (the folder holding the files; for a .zip its extracted copy),
  Bundle.sha256 (sha256 of manifest.json, which pins every weight file: the bundle's identity
  for provenance), Bundle.weights_path(role), Manifest.extra, Manifest.to_dict(),
  Normalisation(mean, std) (unpacks as `mean, std = manifest.normalisation`),
  verify_bundle(path) -> list[str] (problems; empty when sound), sha256_of_file(path).

Model families build themselves from a bundle:
    wsiseg.models.sam.SamSegmentor.from_bundle(bundle, *, input_size=None, device="cpu", k_negatives=None)
    wsiseg.models.prompters.PointPrompter.from_bundle(bundle, *, device="cpu")
    wsiseg.models.prompters.ProbabilityPrompter.from_bundle(bundle, *, device="cpu", selection=..., ...)
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping

from wsiseg.models.protocols import NUCLEUS, NucleusClass

if TYPE_CHECKING:
    import torch

__all__ = [
    "ARCHITECTURES",
    "FORMAT",
    "ROLES",
    "Bundle",
    "BundleError",
    "Component",
    "Manifest",
    "Normalisation",
    "open_bundle",
    "sha256_of_file",
    "verify_bundle",
    "write_bundle",
]

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
#: key prefixes a SAM state dict must have (the official checkpoint's three modules).
_REQUIRED_PREFIXES = {"sam": ("image_encoder.", "prompt_encoder.", "mask_decoder.")}

FORMAT = "wsiseg-bundle/1"
ROLES = ("prompter", "segmentor")
#: architecture -> the role it fills.
ARCHITECTURES: dict[str, str] = {
    "sam": "segmentor", "dpa_p2pnet": "prompter", "unet_prompter": "prompter",
    "tiny_prompter": "prompter", "tiny_segmentor": "segmentor",
}
#: ImageNet mean/std on 0-255 input (SAM's and PromptNucSeg's normalisation).
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)
_WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_FIELDS = (
    "format", "name", "version", "description", "mpp", "input_size", "normalisation", "k_negatives",
    "nms_radius_px", "max_nucleus_diameter_px", "classes", "components",
)  # fmt: skip


class BundleError(ValueError):
    """A bundle cannot be used; the message names the bundle path and what is wrong."""


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class Normalisation:
    """Per-channel RGB mean and std on 0-255 input: x_norm = (x - mean) / std.

    Iterates as (mean, std), so `mean, std = manifest.normalisation` works.
    """

    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        for label, values in (("mean", self.mean), ("std", self.std)):
            if len(values) != 3 or not all(math.isfinite(float(v)) for v in values):
                raise ValueError(f"normalisation.{label} must be three finite numbers, got {values!r}")
        if any(float(v) <= 0 for v in self.std):
            raise ValueError(f"normalisation.std must be > 0, got {self.std!r}")

    def __iter__(self) -> Iterator[tuple[float, float, float]]:
        return iter((self.mean, self.std))


@dataclass(frozen=True)
class Component:
    """One model of a bundle: its architecture, its builder's config, and its weights file.

    file: path of the weights relative to the bundle folder; sha256: lower-case hex.
    """

    architecture: str
    config: dict[str, Any]
    file: str
    sha256: str

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {self.architecture!r} (known: {', '.join(ARCHITECTURES)})")
        if not isinstance(self.config, dict):
            raise ValueError(f"config of {self.architecture!r} must be a JSON object")
        parts = self.file.replace("\\", "/").split("/")
        if not self.file or self.file.startswith("/") or ".." in parts or ":" in parts[0]:
            raise ValueError(f"weights file {self.file!r} must be a relative path inside the bundle")
        if not self.file.endswith(_WEIGHT_SUFFIXES):
            raise ValueError(f"weights file {self.file!r} must end in {', '.join(_WEIGHT_SUFFIXES)}")
        if not _SHA256.fullmatch(self.sha256):
            raise ValueError(f"sha256 of {self.file!r} must be 64 lower-case hex digits, got {self.sha256!r}")

    @property
    def role(self) -> str:
        return ARCHITECTURES[self.architecture]


@dataclass(frozen=True)
class Manifest:
    """A bundle's manifest.json, validated (see the module docstring for the JSON form)."""

    name: str
    mpp: float
    components: dict[str, Component]
    version: str = "1.0"
    description: str = ""
    input_size: int | None = None
    normalisation: Normalisation = field(default_factory=Normalisation)
    k_negatives: int = 0
    nms_radius_px: float = 12.0
    max_nucleus_diameter_px: int = 64
    classes: tuple[NucleusClass, ...] = (NUCLEUS,)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError("name must be a non-empty string")
        if isinstance(self.mpp, bool) or not isinstance(self.mpp, (int, float)) or not 0 < self.mpp < 1000:
            raise ValueError(f"mpp must be a number of micrometres per pixel > 0, got {self.mpp!r}")
        if self.input_size is not None and (not _is_int(self.input_size) or self.input_size <= 0):
            raise ValueError(f"input_size must be a positive integer or null, got {self.input_size!r}")
        if not _is_int(self.k_negatives) or self.k_negatives < 0:
            raise ValueError(f"k_negatives must be an integer >= 0, got {self.k_negatives!r}")
        radius = self.nms_radius_px
        if isinstance(radius, bool) or not isinstance(radius, (int, float)) or not 0 < radius < math.inf:
            raise ValueError(f"nms_radius_px must be a number > 0, got {radius!r}")
        if not _is_int(self.max_nucleus_diameter_px) or self.max_nucleus_diameter_px <= 0:
            raise ValueError(f"max_nucleus_diameter_px must be an integer > 0, got {self.max_nucleus_diameter_px!r}")
        if not self.classes:
            raise ValueError("classes must not be empty")
        ids = [c.id for c in self.classes]
        if ids != list(range(len(ids))):
            raise ValueError(f"class ids must be 0..{len(ids) - 1} in order, got {ids}")
        if not self.components:
            raise ValueError("components must name at least one of: " + ", ".join(ROLES))
        for role, comp in self.components.items():
            if role not in ROLES:
                raise ValueError(f"unknown component role {role!r} (known: {', '.join(ROLES)})")
            if comp.role != role:
                raise ValueError(f"architecture {comp.architecture!r} is a {comp.role}, not a {role}")

    @classmethod
    def from_dict(cls, data: object, *, source: str = "<manifest>") -> Manifest:
        """Validate a manifest.json object; every problem is a BundleError naming `source`."""
        where = f"bundle {source}"
        if not isinstance(data, Mapping):
            raise BundleError(f"{where}: manifest.json must hold a JSON object")
        fmt = data.get("format")
        if fmt != FORMAT:
            if isinstance(fmt, str) and fmt.startswith("wsiseg-bundle/"):
                raise BundleError(f"{where}: format {fmt!r} is not {FORMAT!r}; upgrade wsiseg to read it")
            raise BundleError(f"{where}: unknown format {fmt!r} (expected {FORMAT!r}); not a wsiseg bundle")
        missing = [k for k in ("name", "mpp", "components") if k not in data]
        if missing:
            raise BundleError(f"{where}: manifest lacks required field(s): {', '.join(missing)}")
        try:
            return cls._parse(data)
        except (ValueError, TypeError) as exc:
            raise BundleError(f"{where}: {exc}") from exc

    @classmethod
    def _parse(cls, data: Mapping[str, Any]) -> Manifest:
        comps_raw = data["components"]
        if not isinstance(comps_raw, Mapping):
            raise ValueError("components must be a JSON object of role -> component")
        components = {str(role): _parse_component(str(role), c) for role, c in comps_raw.items()}
        norm = data.get("normalisation") or {}
        if not isinstance(norm, Mapping):
            raise ValueError("normalisation must be an object with mean and std")
        classes_raw = data.get("classes") or [{"id": NUCLEUS.id, "name": NUCLEUS.name, "color": list(NUCLEUS.color)}]
        if not isinstance(classes_raw, list):
            raise ValueError("classes must be a list of {id, name, color}")
        classes = []
        for c in classes_raw:
            if not isinstance(c, Mapping) or not {"id", "name", "color"} <= set(c):
                raise ValueError(f"each class needs id, name and color, got {c!r}")
            if not _is_int(c["id"]) or not isinstance(c["name"], str) or not isinstance(c["color"], (list, tuple)):
                raise ValueError(f"class {c!r} must have an integer id, a string name and a [r, g, b] color")
            classes.append(NucleusClass(c["id"], c["name"], tuple(int(v) for v in c["color"])))  # type: ignore[arg-type]
        return cls(
            name=data["name"],
            mpp=data["mpp"],
            components=components,
            version=str(data.get("version", "1.0")),
            description=str(data.get("description", "")),
            input_size=data.get("input_size"),
            normalisation=Normalisation(
                tuple(norm.get("mean", IMAGENET_MEAN)),
                tuple(norm.get("std", IMAGENET_STD)),
            ),
            k_negatives=data.get("k_negatives", 0),
            nms_radius_px=data.get("nms_radius_px", 12.0),
            max_nucleus_diameter_px=data.get("max_nucleus_diameter_px", 64),
            classes=tuple(classes),
            extra={k: copy.deepcopy(v) for k, v in data.items() if k not in _FIELDS},
        )

    def to_dict(self) -> dict[str, Any]:
        """The manifest.json object (extra keys last)."""
        return {
            "format": FORMAT,
            "name": self.name,
            "version": self.version,
            "description": self.description,
            "mpp": self.mpp,
            "input_size": self.input_size,
            "normalisation": {"mean": list(self.normalisation.mean), "std": list(self.normalisation.std)},
            "k_negatives": self.k_negatives,
            "nms_radius_px": self.nms_radius_px,
            "max_nucleus_diameter_px": self.max_nucleus_diameter_px,
            "classes": [{"id": c.id, "name": c.name, "color": list(c.color)} for c in self.classes],
            "components": {
                role: {
                    "architecture": c.architecture,
                    "config": copy.deepcopy(c.config),
                    "weights": {"file": c.file, "sha256": c.sha256},
                }
                for role, c in self.components.items()
            },
            **copy.deepcopy(self.extra),
        }


def _parse_component(role: str, raw: object) -> Component:
    if not isinstance(raw, Mapping):
        raise ValueError(f"component {role!r} must be a JSON object")
    weights = raw.get("weights")
    if "architecture" not in raw or not isinstance(weights, Mapping) or not {"file", "sha256"} <= set(weights):
        raise ValueError(f"component {role!r} needs architecture and weights {{file, sha256}}")
    config = raw.get("config", {})
    return Component(str(raw["architecture"]), copy.deepcopy(config), str(weights["file"]), str(weights["sha256"]))


def sha256_of_file(path: str | os.PathLike[str], chunk_bytes: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in chunks (constant memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk_bytes), b""):
            digest.update(block)
    return digest.hexdigest()


class Bundle:
    """An opened, validated bundle.  Weights are read only by `load_weights`.

    path: the bundle as given (folder or .zip), resolved.  root: the folder holding
    manifest.json and the weights (a .zip's extracted copy).  sha256: of manifest.json.
    """

    def __init__(self, path: Path, root: Path, manifest: Manifest, sha256: str) -> None:
        self.path = path
        self.root = root
        self.manifest = manifest
        self.sha256 = sha256

    def __repr__(self) -> str:
        roles = ", ".join(f"{r}={c.architecture}" for r, c in self.manifest.components.items())
        return f"Bundle({self.manifest.name!r}, {roles}, path={str(self.path)!r})"

    def has(self, role: str) -> bool:
        return role in self.manifest.components

    def component(self, role: str) -> Component:
        if role not in self.manifest.components:
            have = ", ".join(self.manifest.components) or "none"
            hint = {"segmentor": "; a prompter bundle goes to --prompter (with --model classical or a segmentor bundle)",
                    "prompter": "; give points with --prompter NAME or --prompts FILE"}.get(role, "")
            raise BundleError(f"bundle {self.path}: has no {role} component (it has: {have}){hint}")
        return self.manifest.components[role]

    def weights_path(self, role: str) -> Path:
        return self.root / self.component(role).file

    def load_weights(self, role: str, *, device: str = "cpu") -> dict[str, torch.Tensor]:
        """The role's state dict (name -> tensor on `device`), after checking its sha256.

        .safetensors files load with safetensors; .pt/.pth with torch.load(weights_only=True),
        which refuses any pickle that holds more than tensors and plain containers.
        """
        comp = self.component(role)
        path = self.weights_path(role)
        actual = sha256_of_file(path)
        if actual != comp.sha256:
            raise BundleError(
                f"bundle {self.path}: {comp.file} has sha256 {actual}, the manifest says {comp.sha256}; "
                "the file is corrupt or was changed: re-download or re-import the bundle"
            )
        return _read_state_dict(path, device=device, where=f"bundle {self.path}")


def _read_state_dict(path: Path, *, device: str, where: str) -> dict[str, torch.Tensor]:
    import torch

    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(str(path), device=device)
        except Exception as exc:  # safetensors raises several types for a bad header
            raise BundleError(f"{where}: {path.name} is not a readable safetensors file ({exc})") from exc
    else:
        try:
            state = torch.load(str(path), map_location=device, weights_only=True)
        except Exception as exc:  # UnpicklingError for code-running pickles, others for garbage
            raise BundleError(
                f"{where}: refused to load {path.name}: it holds more than tensors or is not a torch file "
                f"({type(exc).__name__}); convert it to safetensors"
            ) from exc
    if not isinstance(state, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise BundleError(f"{where}: {path.name} is not a flat state dict of name -> tensor")
    return dict(state)


def open_bundle(path: str | os.PathLike[str]) -> Bundle:
    """Open a bundle folder, its manifest.json, or a .zip of it; validate the manifest.

    A .zip is extracted once into `$WSISEG_HOME/extracted/<sha256 of the zip>` (its manifest
    may sit at the archive root or in one top-level folder).  Reads no weights, but checks
    every weights file exists.
    """
    given = Path(path).expanduser()
    if not given.exists():
        raise BundleError(f"bundle {given}: no such file or folder")
    given = given.resolve()
    if given.is_file() and given.name == MANIFEST:
        given = given.parent
    if given.is_dir():
        root = given
    elif zipfile.is_zipfile(given):
        root = _extract_zip(given)
    else:
        raise BundleError(f"bundle {given}: not a bundle folder or .zip (expected a folder with {MANIFEST})")
    manifest_path = root / MANIFEST
    if not manifest_path.is_file():
        raise BundleError(f"bundle {given}: no {MANIFEST} inside; is this a bundle?")
    raw = manifest_path.read_bytes()
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"bundle {given}: {MANIFEST} is not valid JSON ({exc})") from exc
    manifest = Manifest.from_dict(data, source=str(given))
    for comp in manifest.components.values():
        if not (root / comp.file).is_file():
            raise BundleError(f"bundle {given}: weights file {comp.file} is missing")
    return Bundle(given, root, manifest, hashlib.sha256(raw).hexdigest())


def _extract_zip(zip_path: Path) -> Path:
    from wsiseg.models.cache import wsiseg_home

    digest = sha256_of_file(zip_path)
    target = wsiseg_home() / "extracted" / digest[:32]
    if (target / ".complete").is_file():
        return _manifest_folder(target, zip_path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=target.parent))
    try:
        with zipfile.ZipFile(zip_path) as zf:
            for member in zf.namelist():
                parts = Path(member).parts
                if member.startswith(("/", "\\")) or ".." in parts or (parts and ":" in parts[0]):
                    raise BundleError(f"bundle {zip_path}: unsafe member name {member!r} in the zip")
            zf.extractall(tmp)
        (tmp / ".complete").write_text(str(zip_path))
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished the same extraction first
            if not (target / ".complete").is_file():
                raise
    except zipfile.BadZipFile as exc:
        raise BundleError(f"bundle {zip_path}: damaged zip ({exc})") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return _manifest_folder(target, zip_path)


def _manifest_folder(extracted: Path, zip_path: Path) -> Path:
    if (extracted / MANIFEST).is_file():
        return extracted
    inner = [p for p in extracted.iterdir() if p.is_dir() and (p / MANIFEST).is_file()]
    if len(inner) != 1:
        raise BundleError(f"bundle {zip_path}: the zip has no {MANIFEST} at its root or in one top-level folder")
    return inner[0]


def write_bundle(
    out_dir: str | os.PathLike[str],
    manifest: Mapping[str, Any],
    state_dicts: Mapping[str, Mapping[str, torch.Tensor]],
) -> Bundle:
    """Write a bundle folder: one safetensors file per role, then manifest.json (last, atomically).

    manifest: the manifest dict; "format" and each component's "weights" may be left out
        (file defaults to "<role>.safetensors"; sha256 is computed from the written file).
    state_dicts: role -> state dict; tensors are detached, moved to the CPU and made
        contiguous (shared storage is copied: safetensors stores no aliases).
    Bad input raises BundleError before anything is written.  Otherwise an existing
    manifest.json in out_dir is removed first, so an interrupted write never leaves a
    folder that opens as a bundle whose manifest does not match its weights.
    """
    import torch
    from safetensors.torch import save_file

    out = Path(out_dir).expanduser()
    data = copy.deepcopy(dict(manifest))
    data.setdefault("format", FORMAT)
    comps = data.get("components")
    if not isinstance(comps, dict) or not comps:
        raise BundleError(f"bundle {out}: the manifest needs a non-empty 'components' mapping")
    for role in comps:
        if role not in state_dicts:
            raise BundleError(f"bundle {out}: component {role!r} has no state dict to write")
    for role in state_dicts:
        if role not in comps:
            raise BundleError(f"bundle {out}: a state dict was given for {role!r}, which the manifest lacks")
    for role, comp in comps.items():
        if not isinstance(comp, dict):
            raise BundleError(f"bundle {out}: component {role!r} must be a mapping")
        file = str((comp.get("weights") or {}).get("file") or f"{role}.safetensors")
        if not file.endswith(".safetensors"):
            file = f"{role}.safetensors"
        comp["weights"] = {"file": file, "sha256": "0" * 64}
    Manifest.from_dict(data, source=str(out))  # bad input fails before anything is written
    prepared = {role: _prepare_tensors(state_dicts[role], torch, where=f"bundle {out}: {role}") for role in comps}

    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)
    written: dict[str, tuple[str, str]] = {}  # file -> (role, sha256): components may share one file
    for role, comp in comps.items():
        tensors = prepared[role]
        shared = written.get(comp["weights"]["file"])
        if shared is not None:
            if state_dicts[shared[0]] is not state_dicts[role]:
                raise BundleError(
                    f"bundle {out}: {role!r} and {shared[0]!r} name the same weights file but different state dicts"
                )
            comp["weights"]["sha256"] = shared[1]
            continue
        final = out / comp["weights"]["file"]
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.with_name(f".{final.name}.tmp")
        save_file(tensors, str(tmp), metadata={"format": "pt"})  # one key: the header is byte-reproducible
        os.replace(tmp, final)
        comp["weights"]["sha256"] = sha256_of_file(final)
        written[comp["weights"]["file"]] = (role, comp["weights"]["sha256"])
    tmp_manifest = out / f".{MANIFEST}.tmp"
    tmp_manifest.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp_manifest, out / MANIFEST)
    logger.info("wrote bundle %s (%s)", out, ", ".join(comps))
    return open_bundle(out)


def _prepare_tensors(state: Mapping[str, Any], torch: Any, *, where: str) -> dict[str, Any]:
    if not state:
        raise BundleError(f"{where}: the state dict is empty")
    seen: set[int] = set()
    tensors: dict[str, Any] = {}
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise BundleError(f"{where}: entry {key!r} is not a tensor ({type(value).__name__})")
        t = value.detach().to("cpu")
        ptr = t.untyped_storage().data_ptr()
        shared = ptr in seen or t.untyped_storage().nbytes() != t.numel() * t.element_size()
        t = t.clone(memory_format=torch.contiguous_format) if shared or not t.is_contiguous() else t
        seen.add(t.untyped_storage().data_ptr())
        tensors[key] = t
    return tensors


def verify_bundle(path: str | os.PathLike[str]) -> list[str]:
    """Every problem found in a bundle, one line each; an empty list means it is sound.

    Checks the manifest (as open_bundle does), each weights file's sha256, that it reads as a
    state dict of tensors without NaN/Inf, and (for "sam") that the SAM modules' keys exist.
    """
    try:
        bundle = open_bundle(path)
    except BundleError as exc:
        return [str(exc)]
    problems: list[str] = []
    for role, comp in bundle.manifest.components.items():
        try:
            state = bundle.load_weights(role)
        except BundleError as exc:
            problems.append(str(exc))
            continue
        problems.extend(f"bundle {bundle.path}: {role}: {p}" for p in _state_problems(state, comp))
    return problems


def _state_problems(state: Mapping[str, Any], comp: Component) -> Iterator[str]:
    import torch

    if not state:
        yield f"{comp.file} holds no tensors"
        return
    for prefix in _REQUIRED_PREFIXES.get(comp.architecture, ()):
        if not any(k.startswith(prefix) for k in state):
            yield f"{comp.file} has no {prefix}* keys, which a {comp.architecture!r} model needs"
    bad = [k for k, t in state.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        shown = ", ".join(bad[:3]) + (", ..." if len(bad) > 3 else "")
        yield f"{comp.file} has NaN or Inf in {len(bad)} tensor(s): {shown}"
