"""The QuPath import script: `wsiseg qupath-script` finds it, it uses QuPath's public API, and
(where a Groovy runtime is installed) it imports real wsiseg outputs into the right images.

QuPath itself cannot run here.  The Groovy tests run the shipped script against small stand-ins
for the QuPath classes it calls (project, image entry, image data, hierarchy, PathIO, GsonTools);
the stand-ins read GeoJSON with Groovy's JSON parser and keep what is "saved" apart from what is
only read, so a script that forgets to save, matches the wrong image or skips a zip shard fails.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import subprocess
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import shapely
from click.testing import CliRunner

from wsiseg.cli.main import main
from wsiseg.cohort import output_names
from wsiseg.models.protocols import NucleusClass
from wsiseg.nuclei import MEASUREMENTS, NucleusTable
from wsiseg.writers.geojson import GeoJSONWriter

SCRIPT = Path(__file__).resolve().parents[1] / "wsiseg" / "data" / "qupath" / "import_wsiseg.groovy"


# -- the command ------------------------------------------------------------------------------
def test_qupath_script_command_prints_the_shipped_script_path() -> None:
    result = CliRunner().invoke(main, ["qupath-script"])
    assert result.exit_code == 0, result.output
    path = Path(result.output.strip())
    assert path.is_file() and path.name == "import_wsiseg.groovy"
    assert path.read_text() == SCRIPT.read_text()


def test_copy_puts_the_script_in_a_folder_or_at_a_file_name(tmp_path: Path) -> None:
    runner = CliRunner()
    into_folder = runner.invoke(main, ["qupath-script", "--copy", str(tmp_path)])
    assert into_folder.exit_code == 0, into_folder.output
    assert (tmp_path / "import_wsiseg.groovy").read_text() == SCRIPT.read_text()
    assert into_folder.output.strip() == str(tmp_path / "import_wsiseg.groovy")
    as_file = runner.invoke(main, ["qupath-script", "--copy", str(tmp_path / "mine.groovy")])
    assert as_file.exit_code == 0, as_file.output
    assert (tmp_path / "mine.groovy").read_text() == SCRIPT.read_text()


def test_copy_to_a_missing_folder_makes_it_and_never_writes_a_file_in_its_place(tmp_path: Path) -> None:
    runner = CliRunner()
    for dest, where in ((f"{tmp_path / 'Documents'}/", tmp_path / "Documents"),  # as docs/qupath.md writes it
                        (str(tmp_path / "scripts"), tmp_path / "scripts"),
                        (str(tmp_path / "no" / "such" / "x.groovy"), None)):
        result = runner.invoke(main, ["qupath-script", "--copy", dest])
        assert result.exit_code == 0, result.output
        target = where / "import_wsiseg.groovy" if where else tmp_path / "no" / "such" / "x.groovy"
        assert where is None or where.is_dir()
        assert target.read_text() == SCRIPT.read_text() and result.output.strip() == str(target)


def test_copy_that_cannot_be_written_names_the_target(tmp_path: Path) -> None:
    blocker = tmp_path / "taken"
    blocker.write_text("a file where a folder should go")
    result = CliRunner().invoke(main, ["qupath-script", "--copy", str(blocker / "sub")])
    assert result.exit_code != 0
    assert f"cannot write {blocker / 'sub' / 'import_wsiseg.groovy'}" in result.output


# -- the script's text ----------------------------------------------------------------------------
def test_script_uses_qupaths_public_project_and_object_api() -> None:
    text = SCRIPT.read_text()
    for call in ("getProject()", "getImageList()", "getImageName()", "getURIs()", "readImageData()",
                 "getHierarchy()", "addObjects(", "saveImageData(", "PathIO.readObjectsFromGeoJSON(",
                 "PathIO.readObjects(", "GsonTools.getInstance()", "import qupath.lib.io.PathIO",
                 "import static qupath.lib.gui.scripting.QPEx.*"):
        assert call in text, call
    # names that QuPath 0.5/0.6 no longer has
    for gone in ("addPathObjects(", "getPathObjects(", "QPEx.getCurrentHierarchy().addPathObject"):
        assert gone not in text, gone


def test_script_reads_every_geojson_form_wsiseg_writes() -> None:
    text = SCRIPT.read_text()
    for suffix in ('".geojson.zip"', '".geojson.gz"', '".geojson"'):
        assert suffix in text, suffix
    assert "GZIPInputStream" in text and "ZipFile" in text
    assert re.search(r'String RESULTS_DIR = ""', text), "the results folder is a setting at the top"


# -- running the script ---------------------------------------------------------------------------
STUBS: dict[str, str] = {
    "qupath/lib/gui/scripting/QPEx.groovy": """
package qupath.lib.gui.scripting
class QPEx {
    static Object project, imageData, entry, gui
    static getProject() { project }
    static getCurrentImageData() { imageData }
    static getProjectEntry() { entry }
    static getQuPath() { gui }
}
""",
    "qupath/lib/io/PathIO.groovy": """
package qupath.lib.io
class PathIO {
    static List readObjectsFromGeoJSON(InputStream stream) {
        def doc
        try { doc = new groovy.json.JsonSlurper().parse(new InputStreamReader(stream, 'UTF-8')) } finally { stream.close() }
        if (doc.type != 'FeatureCollection') throw new IOException('not a FeatureCollection')
        return doc.features.collect { new fake.FakeObject(it.id, it.properties.measurements ?: [:]) }
    }
    static List readObjects(java.nio.file.Path path) {
        if (!path.toString().endsWith('.geojson'))  // QuPath 0.5's own reader: no .gz, a zip all at once
            throw new IOException('this stand-in reads plain .geojson only: ' + path)
        return readObjectsFromGeoJSON(java.nio.file.Files.newInputStream(path))
    }
}
""",
    "qupath/lib/io/GsonTools.groovy": """
package qupath.lib.io
class GsonTools {
    static getInstance() { new fake.FakeGson() }
}
""",
    "fake/FakeGson.groovy": """
package fake
class FakeGson { Object fromJson(Reader reader, Class type) { new groovy.json.JsonSlurper().parse(reader) } }
""",
    "fake/FakeObject.groovy": """
package fake
class FakeObject {
    String id; Map measurements
    FakeObject(String id, Map measurements) { this.id = id; this.measurements = measurements }
    Map getMeasurementList() { measurements }
}
""",
    "fake/FakeServer.groovy": """
package fake
class FakeServer { int closed = 0; void close() { closed++ } }
""",
    "fake/FakeHierarchy.groovy": """
package fake
class FakeHierarchy {
    List objects = []
    void addObjects(Collection c) { objects.addAll(c) }
    Collection getDetectionObjects() { new ArrayList(objects) }
    boolean removeObjects(Collection c, boolean keepChildren) { objects.removeAll(c) }
}
""",
    "fake/FakeImageData.groovy": """
package fake
class FakeImageData {
    FakeHierarchy hierarchy = new FakeHierarchy(); Map props = [:]; FakeServer server = new FakeServer()
    FakeHierarchy getHierarchy() { hierarchy }
    Object getProperty(String key) { props[key] }
    void setProperty(String key, Object value) { props[key] = value }
    FakeServer getServer() { server }
    Map getProps() { props }  // getProperty(String) above stands for QuPath's: use getters, not properties
    FakeImageData copy() { def d = new FakeImageData(); d.getHierarchy().objects.addAll(hierarchy.objects); d.getProps().putAll(props); d }
}
""",
    "fake/FakeEntry.groovy": """
package fake
class FakeEntry {
    String name; List<URI> uris; FakeImageData stored = new FakeImageData(); int reads = 0; int saves = 0
    FakeEntry(String name, List<URI> uris) { this.name = name; this.uris = uris }
    String getImageName() { name }
    Collection<URI> getURIs() { uris }
    FakeImageData readImageData() { reads++; stored.copy() }
    void saveImageData(FakeImageData data) { saves++; stored = data.copy() }
}
""",
    "fake/FakeProject.groovy": """
package fake
class FakeProject {
    List<FakeEntry> entries
    FakeProject(List<FakeEntry> entries) { this.entries = entries }
    List getImageList() { new ArrayList(entries) }
}
""",
    "fake/FakeGui.groovy": """
package fake
class FakeGui { Object imageData; Object getImageData() { imageData } }
""",
}

DRIVER = """
import groovy.json.JsonOutput
import groovy.json.JsonSlurper
import qupath.lib.gui.scripting.QPEx
import fake.*

def spec = new JsonSlurper().parse(new File(args[0]))
def project = new FakeProject(spec.entries.collect { e -> new FakeEntry(e.name, e.paths.collect { new File(it).toURI() }) })
def byName = project.entries.collectEntries { [(it.name): it] }
def results = []
for (sc in spec.scenarios) {
    sc.replace?.each { c -> def to = new File(c.to); to.bytes = new File(c.from).bytes; to.setLastModified(System.currentTimeMillis() + 60000) }
    def entry = null, current = null, gui = new FakeGui()
    if (sc.open) { entry = byName[sc.open]; current = entry.readImageData(); gui.imageData = current }  // shown in the viewer: Run
    if (sc.batch) { entry = byName[sc.batch]; current = entry.readImageData() }  // Run for project
    QPEx.project = project; QPEx.imageData = current; QPEx.entry = entry; QPEx.gui = gui
    project.entries.each { it.reads = 0; it.saves = 0 }
    def out = new StringWriter()
    def binding = new Binding()
    binding.setVariable('args', sc.args as String[])
    binding.setVariable('out', new PrintWriter(out, true))
    String text = new File(spec.script).text
    sc.settings?.each { k, v -> text = text.replace(k, v) }
    String error = null
    try {
        new GroovyShell(this.class.classLoader, binding).evaluate(text, 'import_wsiseg.groovy')
    } catch (Throwable t) {
        error = t.class.simpleName + ': ' + t.message
    }
    if (sc.batch) entry.saveImageData(current)  // QuPath saves each image after the script
    results << [error: error, output: out.toString(), current: current == null ? null : current.getHierarchy().objects.size(),
                images: project.entries.collectEntries { [(it.name): [objects: it.stored.getHierarchy().objects.size(),
                    property: it.stored.getProps()['wsiseg.import'], saves: it.saves, reads: it.reads]] }]
}
new File(args[1]).text = JsonOutput.toJson(results)
"""

CLASSES = (NucleusClass(0, "Nucleus", (0, 136, 255)),)


def _table(n: int, x0: float = 100.0) -> NucleusTable:
    polys = [shapely.box(x0 + 20 * i, 50, x0 + 20 * i + 9, 61) for i in range(n)]
    meas = {m: np.full(n, 1.5, np.float32) for m in MEASUREMENTS}
    return NucleusTable.from_polygons(polys, np.zeros(n, np.int16), meas)


def _write(path: Path, n: int, fmt: str, source: str | None = None, shard_size: int = 100_000) -> Path:
    writer = GeoJSONWriter(path, fmt=fmt, classes=CLASSES, shard_size=shard_size)  # type: ignore[arg-type]
    writer.write(_table(n))
    writer.close()
    if source is not None:
        stem = path.name.split(".geojson")[0]
        report = {"slide": source, "source": {"path": source}, "counts": {"nuclei": n}}
        (path.parent / f"{stem}.report.json").write_text(json.dumps(report))
    return path


def _groovy_env() -> dict[str, str]:
    groovy, java = shutil.which("groovy"), shutil.which("java")
    if groovy is None or java is None:
        pytest.skip("no Groovy runtime (Debian: apt-get install groovy); the script's text is still checked")
    env = dict(os.environ)
    home = env.get("JAVA_HOME", "")
    if not home or not Path(home, "bin", "java").exists():
        env["JAVA_HOME"] = str(Path(os.path.realpath(java)).parents[1])
    return env


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """Seven runs of the script, one after another on one project (see `scenarios` below)."""
    env = _groovy_env()
    root = tmp_path_factory.mktemp("qupath")
    slides = root / "slides"
    res, broken = root / "results", root / "broken"
    res.mkdir()
    broken.mkdir()
    # outputs named as `wsiseg run` names them: two slides share the stem "slide"
    cohort = [slides / "a" / "slide.svs", slides / "b" / "slide.tif", slides / "beta.ome.tiff"]
    names = output_names(cohort, res)
    assert [names[s] for s in cohort] == ["slide_svs", "slide_tif", "beta"]
    _write(res / "alpha.geojson", 3, "geojson", source=str(slides / "alpha.svs"))
    _write(res / "beta.geojson.gz", 2, "gz")  # no report: matched by name
    _write(res / "gamma.geojson.zip", 5, "zip", source="/another/computer/gamma.ndpi", shard_size=2)
    _write(res / "slide_svs.geojson.gz", 1, "gz", source=str(slides / "a" / "slide.svs"))
    _write(res / "slide_tif.geojson.gz", 4, "gz")
    _write(res / "orphan.geojson", 1, "geojson")
    _write(root / "alpha-v2.geojson", 4, "geojson")
    good = _write(root / "delta.geojson.zip", 4, "zip", shard_size=2)
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(broken / "delta.geojson.zip", "w") as dst:
        first, second = src.namelist()
        dst.writestr(first, src.read(first))
        dst.writestr(second, src.read(second)[:300])  # cut short
    entries = [
        {"name": "alpha.svs", "paths": [str(slides / "alpha.svs")]},
        {"name": "beta.ome.tiff", "paths": [str(slides / "beta.ome.tiff")]},
        {"name": "Case 7", "paths": [str(slides / "gamma.ndpi")]},
        {"name": "slide.svs", "paths": [str(slides / "a" / "slide.svs")]},
        {"name": "slide.tif", "paths": [str(slides / "b" / "slide.tif")]},
        {"name": "epsilon.svs", "paths": [str(slides / "epsilon.svs")]},
        {"name": "delta.svs", "paths": [str(slides / "delta.svs")]},
    ]
    scenarios = [
        {"batch": "slide.tif", "args": [str(res)]},  # 0: Run for project, on one image
        {"args": [str(res)]},  # 1: Run, no image open
        {"args": [str(res)]},  # 2: the same again
        {"args": [str(res)], "open": "alpha.svs",  # 3: alpha's output rewritten, alpha open
         "replace": [{"from": str(root / "alpha-v2.geojson"), "to": str(res / "alpha.geojson")}]},
        {"settings": {'String RESULTS_DIR = ""': f'String RESULTS_DIR = "{broken}"'}},  # 4: a broken shard
        {"args": [str(root / "missing")]},  # 5: no such folder
        {"args": [str(res)], "settings": {"boolean FORCE = false": "boolean FORCE = true",  # 6: all again,
                                          "DOM_BYTES_PER_TEXT_BYTE = 15": "DOM_BYTES_PER_TEXT_BYTE = 10**12"}},  # tiny heap
    ]
    spec = root / "spec.json"
    spec.write_text(json.dumps({"script": str(SCRIPT), "entries": entries, "scenarios": scenarios}))
    stubs = root / "stubs"
    for rel, text in STUBS.items():
        (stubs / rel).parent.mkdir(parents=True, exist_ok=True)
        (stubs / rel).write_text(text)
    driver = root / "driver.groovy"
    driver.write_text(DRIVER)
    out = root / "out.json"
    proc = subprocess.run(["groovy", "-cp", str(stubs), str(driver), str(spec), str(out)], env=env,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(out.read_text())


def _objects(run: dict[str, Any]) -> dict[str, int]:
    return {name: image["objects"] for name, image in run["images"].items()}


def test_run_for_project_imports_only_the_current_image(runs: list[dict[str, Any]]) -> None:
    run = runs[0]
    assert run["error"] is None, run["output"]
    assert run["current"] == 4
    assert all(image["reads"] == 0 for image in run["images"].values())
    saves = {name: image["saves"] for name, image in run["images"].items() if image["saves"]}
    assert saves == {"slide.tif": 1}  # QuPath's own save after the script; the script saves nothing itself


def test_run_imports_each_format_into_its_own_image_and_saves_it(runs: list[dict[str, Any]]) -> None:
    run = runs[1]
    assert run["error"] is None, run["output"]
    assert _objects(run) == {"alpha.svs": 3, "beta.ome.tiff": 2, "Case 7": 5, "slide.svs": 1, "slide.tif": 4,
                             "epsilon.svs": 0, "delta.svs": 0}
    saved = {name for name, image in run["images"].items() if image["saves"]}
    assert saved == {"alpha.svs", "beta.ome.tiff", "Case 7", "slide.svs"}  # slide.tif: unchanged since run 0
    assert "orphan.geojson: no image of this project matches" in run["output"]
    assert "epsilon.svs: no wsiseg output" in run["output"]


def test_rerun_skips_unchanged_outputs(runs: list[dict[str, Any]]) -> None:
    run = runs[2]
    assert run["error"] is None, run["output"]
    assert _objects(run) == _objects(runs[1])
    assert run["output"].count("already imported") == 5


def test_changed_output_replaces_the_earlier_import_in_the_open_image(runs: list[dict[str, Any]]) -> None:
    run = runs[3]
    assert run["error"] is None, run["output"]
    assert run["current"] == 4  # the viewer's image data, not a copy read from disk
    assert _objects(run)["alpha.svs"] == 4 and run["images"]["alpha.svs"]["reads"] == 0
    assert run["images"]["alpha.svs"]["saves"] == 1
    assert {k: v for k, v in _objects(run).items() if k != "alpha.svs"} == {
        k: v for k, v in _objects(runs[2]).items() if k != "alpha.svs"}


def test_broken_zip_shard_is_reported_and_the_good_shard_kept(runs: list[dict[str, Any]]) -> None:
    run = runs[4]
    assert run["error"] is not None and "delta-0001.geojson" in run["error"]
    assert _objects(run)["delta.svs"] == 2
    assert run["images"]["delta.svs"]["property"].startswith("incomplete:")  # the next run replaces it


def test_missing_results_folder_names_the_setting(runs: list[dict[str, Any]]) -> None:
    run = runs[5]
    assert run["error"] is not None and "RESULTS_DIR" in run["error"] and "missing" in run["error"]


def test_force_imports_again_without_duplicates_and_warns_when_the_heap_looks_small(
        runs: list[dict[str, Any]]) -> None:
    run = runs[6]
    assert run["error"] is None, run["output"]
    assert _objects(run) == _objects(runs[5])  # earlier imports replaced, not doubled
    matched = {"alpha.svs", "beta.ome.tiff", "Case 7", "slide.svs", "slide.tif"}
    assert run["output"].count("removed") == len(matched)
    warned = {line.split(":")[0].removeprefix("WARNING ") for line in run["output"].splitlines()
              if line.startswith("WARNING")}
    assert warned == matched  # gz outputs too: their text size is read from the gzip trailer


def test_script_reads_gzip_and_zip_outputs_written_by_wsiseg(tmp_path: Path) -> None:
    """The fixture's outputs are real writer outputs: gz is one collection, zip one per shard."""
    gz = _write(tmp_path / "x.geojson.gz", 3, "gz")
    assert len(json.loads(gzip.decompress(gz.read_bytes()))["features"]) == 3
    zp = _write(tmp_path / "y.geojson.zip", 5, "zip", shard_size=2)
    with zipfile.ZipFile(zp) as zf:
        assert zf.namelist() == ["y-0000.geojson", "y-0001.geojson", "y-0002.geojson"]
