"""`wsiseg models`: list, inspect, import, verify and download nucleus models.

The library is imported inside each command, so `wsiseg --help` stays fast.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import click

IMPORT_KINDS = ("sam", "promptnucseg", "bundle")
DATASETS = ("pannuke", "kumar", "cpm17")


@contextmanager
def _user_errors() -> Iterator[None]:
    """Turn a library error into one line on stderr and exit status 1."""
    try:
        yield
    except click.ClickException:
        raise
    except (ValueError, RuntimeError, OSError, ImportError) as exc:
        raise click.ClickException(" ".join(str(exc).split()) or type(exc).__name__) from exc


def _mib(n_bytes: int) -> str:
    return f"{n_bytes / 2**20:.1f} MiB"


@click.group("models")
def models() -> None:
    """List, inspect, import, verify and download nucleus models."""


@models.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def list_command(as_json: bool) -> None:
    """Built-in models, the bundles in the model cache, and the models `pull` can fetch."""
    from wsiseg.models.cache import bundles_dir, list_bundles
    from wsiseg.models.pull import KNOWN_MODELS

    with _user_errors():
        entries = list_bundles()
    cached = {e.name for e in entries}
    if as_json:
        rows: list[dict[str, Any]] = [
            {
                "name": e.name,
                "version": e.version,
                "builtin": e.builtin,
                "path": str(e.path) if e.path else None,
                "components": dict(e.components),
                "mpp": e.mpp,
                "description": e.description,
                "problem": e.problem,
            }
            for e in entries
        ]
        rows += [
            {"name": k.name, "pullable": True, "kind": k.kind, "url": k.url, "description": k.description}
            for k in KNOWN_MODELS.values()
            if k.name not in cached
        ]
        click.echo(json.dumps(rows, indent=2))
        return
    pullable = [k for k in KNOWN_MODELS.values() if k.name not in cached]
    width = max(len(n) for n in [e.name for e in entries] + [k.name for k in pullable]) + 2
    for e in entries:
        if e.builtin:
            kind = "built-in" + (f" {e.version}" if e.version else "")
        elif e.problem:
            kind = "BROKEN"
        else:
            kind = (f"{e.version} " if e.version else "") + "+".join(arch for _, arch in e.components)
            kind += f" @ {e.mpp:g} mpp" if e.mpp else ""
        text = e.problem if e.problem else e.description
        click.echo(f"{e.name:<{width}}{kind:<24}{text}")
    if pullable:
        click.echo("\nAvailable with `wsiseg models pull NAME`:")
        for k in pullable:
            size = f"{_mib(k.size_bytes)}" if k.size_bytes else "size unknown"
            click.echo(f"{k.name:<{width}}{size:<24}{k.description}")
    click.echo(f"\nModel cache: {bundles_dir()}")


@models.command("info")
@click.argument("model")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def info_command(model: str, as_json: bool) -> None:
    """Show a model's manifest: architecture, sizes, mpp, input size, classes, sha256 and its
    model card (training data, licence, intended use, citations) when it has one.

    MODEL is a cached name, "classical", a bundle folder or .zip, or a SAM .pth.
    """
    from wsiseg.models import TTA_ARCHITECTURES, model_info

    with _user_errors():
        info = model_info(model)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    if info.get("builtin"):
        click.echo(f"{info['name']} (built-in): {info['description']}")
        return
    if info.get("kind") == "sam-checkpoint":
        click.echo(f"{info['name']}: SAM checkpoint {info['path']} ({_mib(info['size_bytes'])})")
        click.echo(f"  sha256: {info['sha256']}")
        return
    click.echo(f"{info['name']} {info['version']}  ({info['path']})")
    if info["description"]:
        click.echo(f"  {info['description']}")
    size = f"{info['input_size']} px" if info["input_size"] else "any"
    click.echo(f"  mpp: {info['mpp']:g} um/px   input size: {size}   k_negatives: {info['k_negatives']}")
    click.echo(
        f"  point NMS radius: {info['nms_radius_px']:g} px   max nucleus diameter: {info['max_nucleus_diameter_px']} px"
    )
    classes = ", ".join(f"{c['id']} {c['name']} {tuple(c['color'])}" for c in info["classes"])
    click.echo(f"  classes: {classes}")
    for role, comp in info["components"].items():
        variant = comp["config"].get("variant")
        arch = comp["architecture"] + (f" ({variant})" if variant else "")
        click.echo(f"  {role}: {arch}, {comp['weights']['file']} ({_mib(comp['size_bytes'])})")
        click.echo(f"    sha256: {comp['weights']['sha256']}")
    prompter = info["components"].get("prompter", {})
    hv = prompter.get("config", {}).get("hv")
    if isinstance(hv, dict):
        click.echo(f"  horizontal/vertical maps: cut the distance map where they fall (step {hv.get('step_px')} px, "
                   f"saturation {hv.get('saturation')})")
    if prompter.get("architecture") == "tiny_prompter" and "threshold" in prompter.get("config", {}):
        click.echo(f"  score threshold (the default --min-score): {prompter['config']['threshold']:g}")
    networks = [c for c in info["components"].values() if c.get("architecture") in TTA_ARCHITECTURES]
    if networks:
        precision = networks[0].get("config", {}).get("precision", "fp32")
        if precision == "auto":
            from wsiseg.models.tiny.maps import cpu_has_bf16

            precision += f" (on this machine's CPU: {'bf16' if cpu_has_bf16() else 'fp32'})"
        click.echo(f"  network precision (the default --precision): {precision}")
    click.echo(f"  bundle sha256: {info['bundle_sha256']}")
    card = info.get("model_card") or {}
    for key, label in (("data", "trained on"), ("licence", "licence"), ("intended_use", "intended use")):
        if card.get(key):
            click.echo(f"  {label}: {card[key]}")
    for citation in card.get("citations") or ():
        click.echo(f"  cite: {citation}")
    if "source" in info:
        click.echo(f"  pulled from: {info['source'].get('url')}")


# `wsiseg models show` is the same command: users reach for either word
models.add_command(info_command, name="show")


@models.command("import")
@click.argument("kind", type=click.Choice(IMPORT_KINDS))
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option(
    "-o", "--output", type=click.Path(path_type=Path), help="Bundle folder to write (default: into the model cache)."
)
@click.option("--name", help="Model name (default: from the output folder or the file name).")
@click.option("--mpp", type=float, help="Micrometres per pixel the model was trained at (default 0.25).")
@click.option("--dataset", type=click.Choice(DATASETS), help="PromptNucSeg training set (promptnucseg only).")
@click.option("--force", is_flag=True, help="Replace a cached bundle of the same name.")
def import_command(
    kind: str,
    files: tuple[Path, ...],
    output: Path | None,
    name: str | None,
    mpp: float | None,
    dataset: str | None,
    force: bool,
) -> None:
    """Make a bundle from model files, or copy a bundle into the model cache.

    \b
    KIND sam           SAM.pth (official SAM or a PromptNucSeg segmentor)
    KIND promptnucseg  PROMPTER.pth SEGMENTOR.pth -> one bundle with both models
    KIND bundle        BUNDLE (folder or .zip) -> the model cache
    """
    counts = {"sam": 1, "promptnucseg": 2, "bundle": 1}
    if len(files) != counts[kind]:
        expected = {"sam": "one SAM .pth", "promptnucseg": "PROMPTER.pth SEGMENTOR.pth", "bundle": "one bundle"}
        raise click.UsageError(f"import {kind} takes {expected[kind]}, got {len(files)} file(s)")
    if dataset is not None and kind != "promptnucseg":
        raise click.UsageError("--dataset applies to `import promptnucseg` only")
    if kind == "bundle":
        if output is not None or mpp is not None:
            raise click.UsageError("import bundle copies the bundle as it is: -o and --mpp do not apply")
        from wsiseg.models.cache import import_bundle

        with _user_errors():
            path = import_bundle(files[0], name, overwrite=force)
        click.echo(f"imported {files[0]} as {path.name} ({path})")
        return
    name = name or (output.name if output is not None else files[0].stem)
    options = {} if mpp is None else {"mpp": mpp}
    with _user_errors():
        if output is not None:
            path = _convert(kind, files, output, name, options, dataset)
            click.echo(f"wrote bundle {path}")
            return
        from wsiseg.models.cache import bundles_dir, import_bundle

        bundles_dir().mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".convert-{name}-", dir=bundles_dir()))
        try:
            made = _convert(kind, files, staging / "bundle", name, options, dataset)
            path = import_bundle(made, name, overwrite=force, move=True)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    click.echo(f"imported {' '.join(map(str, files))} as {path.name} ({path})")


def _convert(
    kind: str, files: tuple[Path, ...], out: Path, name: str, options: dict[str, Any], dataset: str | None
) -> Path:
    from wsiseg.models.sam.convert import convert_sam_checkpoint

    if kind == "sam":
        return Path(convert_sam_checkpoint(files[0], out, name=name, **options))
    from wsiseg.models.prompters.convert import convert_promptnucseg_prompter

    with tempfile.TemporaryDirectory(prefix=".segmentor-", dir=out.parent if out.parent.exists() else None) as tmp:
        segmentor = convert_sam_checkpoint(files[1], Path(tmp) / "segmentor", name=f"{name}-segmentor", **options)
        return Path(
            convert_promptnucseg_prompter(
                files[0], out, name=name, dataset=dataset or "pannuke", segmentor_bundle=segmentor, **options
            )
        )


@models.command("verify")
@click.argument("bundle")
def verify_command(bundle: str) -> None:
    """Check a bundle: manifest, sha256 of every weights file, tensors; exit 1 on problems."""
    from wsiseg.models.bundles import verify_bundle
    from wsiseg.models.cache import resolve_model

    with _user_errors():
        target = resolve_model(bundle)
        if target == "classical":
            click.echo("classical is built in: nothing to verify")
            return
        problems = verify_bundle(target)
    if problems:
        click.echo(f"{target}: {len(problems)} problem(s)", err=True)
        for problem in problems:
            click.echo(f"  - {problem}", err=True)
        raise SystemExit(1)
    click.echo(f"{target}: OK")


@models.command("pull")
@click.argument("model")
@click.option("--sha256", help="Expected sha256 of the download; checked before anything is imported.")
@click.option("--name", help="Name in the model cache (default: the model's).")
@click.option(
    "--keep-download",
    type=click.Path(file_okay=False, path_type=Path),
    help="Keep the downloaded file in this folder.",
)
def pull_command(model: str, sha256: str | None, name: str | None, keep_download: Path | None) -> None:
    """Download MODEL (a name from `wsiseg models list`, or an http(s) URL) into the cache.

    An interrupted download resumes when run again.
    """
    from wsiseg.models.pull import pull

    last = [-1]

    def show(done: int, total: int | None) -> None:
        step = int(done * 20 / total) if total else done // (64 * 2**20)
        if step != last[0]:
            last[0] = step
            of = f" of {_mib(total)} ({100 * done // total}%)" if total else ""
            click.echo(f"\r  {_mib(done)}{of}", nl=False, err=True)

    with _user_errors():
        path = pull(model, sha256=sha256, dest=keep_download, progress=show, name=name)
    click.echo("", err=True)
    click.echo(f"pulled {model} as {path.name} ({path})")
