"""The local model cache (`$WSISEG_HOME/bundles/<name>/`) and the built-in models.

`$WSISEG_HOME` defaults to `~/.cache/wsiseg`.  Layout:
    bundles/<name>/      an imported bundle folder (manifest.json + weights, + source.json
                         when it was pulled from a URL)
    downloads/           partial and finished downloads of `pull`
    extracted/<sha256>/  bundle .zip files opened in place (see bundles.open_bundle)
Built-in models need no files: "classical" is the weight-free model of
wsiseg.models.classical (ClassicalPrompter / ClassicalSegmentor).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from wsiseg.models.bundles import MANIFEST, Bundle, BundleError, open_bundle, sha256_of_file

__all__ = [
    "BUILTIN_MODELS",
    "HOME_ENV",
    "ModelEntry",
    "ModelNotFoundError",
    "bundles_dir",
    "import_bundle",
    "list_bundles",
    "resolve_model",
    "wsiseg_home",
]

logger = logging.getLogger(__name__)

HOME_ENV = "WSISEG_HOME"
#: built-in model name -> description ("classical" resolves to itself, the others to BUILTIN_BUNDLES).
BUILTIN_MODELS: dict[str, str] = {
    "wsiseg-tiny": "the default: a compact learned model trained on real H&E (MoNuSeg 2018, CC BY-NC-SA 4.0); "
    "distance-core prompter + seeded-watershed segmentor over one UNet (CPU, shipped inside the package)",
    "classical": "weight-free classical model: haematoxylin blob detection + seeded watershed "
    "per point (CPU, nothing to download)",
}
#: built-in bundles shipped inside the package: name -> folder.
BUILTIN_BUNDLES: dict[str, Path] = {"wsiseg-tiny": Path(__file__).resolve().parent.parent / "data" / "models" / "wsiseg-tiny"}
#: names a cached bundle may have (also its folder name).
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class ModelNotFoundError(BundleError):
    """A model name is neither a built-in, a cached bundle, nor an existing path."""


@dataclass(frozen=True)
class ModelEntry:
    """One model `wsiseg models list` shows.

    path: the bundle folder (None for built-ins).  components: (role, architecture) pairs.
    problem: why a cached bundle does not open (None when it does).  version: the bundle
    manifest's version (None for "classical", which has no weights, and broken bundles).
    """

    name: str
    description: str
    path: Path | None = None
    builtin: bool = False
    components: tuple[tuple[str, str], ...] = ()
    mpp: float | None = None
    problem: str | None = None
    version: str | None = None


def wsiseg_home() -> Path:
    """`$WSISEG_HOME`, or `~/.cache/wsiseg` when unset (not created here)."""
    env = os.environ.get(HOME_ENV, "").strip()
    return Path(env).expanduser() if env else Path.home() / ".cache" / "wsiseg"


def bundles_dir() -> Path:
    return wsiseg_home() / "bundles"


def list_bundles(*, include_builtin: bool = True) -> list[ModelEntry]:
    """Built-in models (first), then every bundle in the cache sorted by name.

    A cached folder that fails to open is listed with `problem` set instead of raising.
    """
    entries = [_builtin_entry(n, d) for n, d in BUILTIN_MODELS.items()] if include_builtin else []
    root = bundles_dir()
    if not root.is_dir():
        return entries
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        try:
            bundle = open_bundle(folder)
        except BundleError as exc:
            entries.append(ModelEntry(folder.name, "", folder, problem=str(exc)))
            continue
        entries.append(_bundle_entry(folder.name, bundle, folder))
    return entries


def _builtin_entry(name: str, description: str) -> ModelEntry:
    """A built-in model's entry: its bundle's, with the built-in description, when it ships as a
    bundle ("classical" has none)."""
    folder = BUILTIN_BUNDLES.get(name)
    if folder is None:
        return ModelEntry(name, description, builtin=True)
    return _bundle_entry(name, open_bundle(folder), folder, description=description, builtin=True)


def _bundle_entry(name: str, bundle: Bundle, folder: Path, *, description: str | None = None, builtin: bool = False) -> ModelEntry:
    """The entry of an opened bundle in `folder`: components, mpp and version from its manifest;
    its manifest's description unless one is given."""
    m = bundle.manifest
    comps = tuple((role, c.architecture) for role, c in m.components.items())
    return ModelEntry(name, m.description if description is None else description, folder, builtin=builtin,
                      components=comps, mpp=float(m.mpp), version=str(m.version))


def resolve_model(name_or_path: str | os.PathLike[str]) -> Path | Literal["classical"]:
    """A built-in name ("classical"), an existing file/folder, or a cached bundle's folder.

    An existing path wins over a cached bundle of the same name.  Raises ModelNotFoundError
    naming the cache folder and how to fill it.
    """
    text = os.fspath(name_or_path)
    if text == "classical":
        return "classical"
    if text in BUILTIN_BUNDLES and (BUILTIN_BUNDLES[text] / MANIFEST).is_file():
        return BUILTIN_BUNDLES[text]
    path = Path(text).expanduser()
    if path.exists():
        return path.resolve()
    if _NAME.fullmatch(text) and (bundles_dir() / text / MANIFEST).is_file():
        return bundles_dir() / text
    from wsiseg.models.pull import KNOWN_MODELS

    if text in KNOWN_MODELS:
        hint = f"download it with `wsiseg models pull {text}`"
    else:
        hint = "see `wsiseg models list`, or give a bundle folder, .zip or SAM .pth path"
    raise ModelNotFoundError(f"model {text!r}: no such file, and no bundle of that name in {bundles_dir()}; {hint}")


def import_bundle(
    src: str | os.PathLike[str],
    name: str | None = None,
    *,
    overwrite: bool = False,
    move: bool = False,
) -> Path:
    """Copy a bundle (folder or .zip) into the cache as `bundles/<name>/`; return that folder.

    name: defaults to the manifest's name.  Only manifest.json and the weights it lists are
    copied, and each copy's sha256 is checked against the manifest before the folder
    appears under its name (a failed import leaves the cache as it was).
    overwrite: replace a different bundle already cached under `name` (an identical one
    is kept either way).  move: move the files instead of copying (for a temporary folder
    on the same disk, as `pull` makes).
    """
    bundle = open_bundle(src)
    name = name or bundle.manifest.name
    if not _NAME.fullmatch(name) or name in BUILTIN_MODELS:
        raise BundleError(
            f"bundle {bundle.path}: {name!r} cannot be a cache name (use letters, digits, '.', '_', '-'; "
            f"not {', '.join(BUILTIN_MODELS)}); choose another --name"
        )
    root = bundles_dir()
    target = root / name
    if (target / MANIFEST).is_file():
        try:
            same = open_bundle(target).sha256 == bundle.sha256
        except BundleError:
            same = False
        if same:
            logger.info("bundle %s is already cached as %s", bundle.path, target)
            return target
        if not overwrite:
            raise BundleError(
                f"bundle {bundle.path}: another bundle named {name!r} is already cached ({target}); "
                "choose another --name or replace it with --force"
            )
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".import-{name}-", dir=root))
    try:
        files = [MANIFEST] + [c.file for c in bundle.manifest.components.values()]
        for rel in files:
            dst = staging / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            if move:
                shutil.move(str(bundle.root / rel), str(dst))
            else:
                shutil.copyfile(bundle.root / rel, dst)
        for comp in bundle.manifest.components.values():
            if sha256_of_file(staging / comp.file) != comp.sha256:
                raise BundleError(
                    f"bundle {bundle.path}: {comp.file} does not match its sha256 in the manifest; "
                    "the bundle is corrupt: re-download or re-export it"
                )
        _swap_in(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("imported bundle %s as %s", bundle.path, target)
    return target


def _swap_in(staging: Path, target: Path) -> None:
    """Put `staging` at `target`, replacing what was there with two renames."""
    old = None
    if target.exists():
        old = target.with_name(f".old-{target.name}-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
    os.replace(staging, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
