"""`wsiseg qupath-script`: where the QuPath import script is, or a copy of it.

The script (`wsiseg/data/qupath/import_wsiseg.groovy`, shipped with the package) imports the
GeoJSON that `wsiseg run` writes into the matching images of an open QuPath 0.5/0.6 project;
docs/qupath.md gives the clicks.
"""

from __future__ import annotations

import shutil
from importlib.resources import files
from pathlib import Path

import click

SCRIPT_NAME = "import_wsiseg.groovy"


def qupath_script_path() -> Path:
    """The installed import script's path.

    Raises click.ClickException when the file is missing (a broken installation).
    """
    path = Path(str(files("wsiseg").joinpath("data", "qupath", SCRIPT_NAME)))
    if not path.is_file():
        raise click.ClickException(f"{path} is missing from the installation; reinstall wsiseg (pip install wsiseg)")
    return path


@click.command("qupath-script")
@click.option("--copy", "dest", type=click.Path(path_type=str), default=None,
              help="Copy the script to DEST and print where it went: a folder (made if missing), "
                   "or a file name ending in .groovy.")
def qupath_script(dest: str | None) -> None:
    """Print the path of the QuPath script that imports wsiseg's GeoJSON into a QuPath project.

    In QuPath: Automate > Script editor, File > Open that file, set RESULTS_DIR, Run.
    """
    source = qupath_script_path()
    if dest is None:
        click.echo(str(source))
        return
    path = Path(dest).expanduser()
    target = path if path.suffix.lower() == ".groovy" and not path.is_dir() else path / SCRIPT_NAME
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
    except OSError as exc:
        raise click.ClickException(f"--copy {dest}: cannot write {target} ({exc.strerror or exc})") from None
    click.echo(str(target))
