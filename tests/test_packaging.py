"""Packaging rules: the CLI installs as wsiseg.cli (never a top-level `cli`), every
subpackage is listed, and `import wsiseg` stays cheap."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_no_top_level_cli_package_is_installed(tmp_path: Path) -> None:
    code = "import importlib.util, wsiseg.cli.main; print(importlib.util.find_spec('cli'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path)
    assert out.stdout.strip() == "None"


def test_every_subpackage_is_listed_in_pyproject() -> None:
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {
        ".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "wsiseg").rglob("__init__.py")
    } | {"wsiseg.cli"}
    assert found == listed


def test_import_wsiseg_is_cheap(tmp_path: Path) -> None:
    code = (
        "import sys, wsiseg, wsiseg.readers, wsiseg.writers, wsiseg.models, wsiseg.pipeline; "
        "print(sorted(m for m in ('torch', 'dask', 'distributed', 'zarr') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path)
    assert out.stdout.strip() == "[]"


def test_console_script_runs(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "wsiseg.cli.main", "--version"], capture_output=True, text=True,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "wsiseg" in out.stdout
