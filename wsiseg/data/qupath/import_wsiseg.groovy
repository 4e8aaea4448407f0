/*
 * Import wsiseg nuclei into the images of the open QuPath project (QuPath 0.5 and 0.6).
 *
 * For every output that `wsiseg run SLIDES -o FOLDER` wrote to FOLDER (NAME.geojson,
 * NAME.geojson.gz, or NAME.geojson.zip: a zip of FeatureCollection shards), the nuclei are
 * added as detections to the project image they came from, and the image is saved.
 *
 * How an output finds its image, first rule that applies:
 *   1. NAME.report.json records the slide's path: the image whose file has that path,
 *      then the image whose file has that file name (slides moved to another computer);
 *   2. NAME equals the image name, the image name without its extension ("slide.svs" ->
 *      "slide"; ".ome.tiff" counts as one extension), or the name with its extension
 *      folded in ("slide_svs"), which wsiseg uses when two slides share a name.
 *
 * Use: Automate > Script editor, File > Open this file, set RESULTS_DIR below (or leave it
 * empty to be asked), then Run (all images of the project at once) or Run > Run for project
 * (one image at a time; QuPath saves each).  Running again skips images whose output has
 * not changed; a changed output replaces the detections imported before.
 * Command line: QuPath script -p project.qpproj -a RESULTS_DIR --save import_wsiseg.groovy
 */

import java.nio.file.Files
import java.nio.file.Path
import java.nio.file.Paths
import java.util.zip.GZIPInputStream
import java.util.zip.ZipFile

import qupath.lib.io.GsonTools
import qupath.lib.io.PathIO

import static qupath.lib.gui.scripting.QPEx.*

// ---- settings ------------------------------------------------------------------------
// The folder given to `wsiseg run ... -o FOLDER`; "" asks for it.
String RESULTS_DIR = ""
// Remove the detections this script imported earlier before importing a changed output.
boolean REPLACE_PREVIOUS = true
// Import again even when the output has not changed since the last import.
boolean FORCE = false
// ----------------------------------------------------------------------------------------

// Heap held while one GeoJSON text is parsed, per byte of text (measured: 14.6 for a
// 100,000-nucleus wsiseg shard), and heap per imported nucleus (assumed, about 1 kB).
DOM_BYTES_PER_TEXT_BYTE = 15
OBJECT_BYTES = 1000
PROPERTY_KEY = "wsiseg.import"
SUFFIXES = [".geojson.zip", ".geojson.gz", ".geojson"]

def project = getProject()
if (project == null)
    throw new IllegalStateException("wsiseg import: no project is open; open one with File > Project... > Open project, then run again")
def current = getCurrentImageData()
def currentEntry = current == null ? null : getProjectEntry()
boolean batch = current != null && !isViewerImage(current)
File resultsDir = resultsFolder(RESULTS_DIR, batch)
List<Map> outputs = findOutputs(resultsDir)
if (outputs.isEmpty())
    throw new IllegalArgumentException("wsiseg import: no NAME.geojson, .geojson.gz or .geojson.zip in ${resultsDir}; set RESULTS_DIR to the folder given to `wsiseg run -o`")

def entries = batch ? [currentEntry].findAll { it != null } : project.getImageList()
Map<Object, Map> matches = matchOutputs(outputs, project.getImageList())
List<String> failures = []
int imported = 0
for (entry in entries) {
    Map output = matches[entry]
    if (output == null) {
        println "${entry.getImageName()}: no wsiseg output in ${resultsDir}"
        continue
    }
    boolean isCurrent = current != null && entry == currentEntry
    def imageData = null
    try {
        imageData = isCurrent ? current : entry.readImageData()
        Integer n = importOutput(imageData, output, REPLACE_PREVIOUS, FORCE, failures, entry.getImageName())
        if (n != null) {
            imported += n
            if (!batch)
                entry.saveImageData(imageData)  // "Run for project" saves each image itself
        }
    } catch (Exception e) {
        failures << "${entry.getImageName()}: ${firstLine(e)}"
    } finally {
        if (!isCurrent && imageData != null)
            closeQuietly(imageData)
    }
}
if (!batch) {
    def claimed = matches.values().collect { it.file } as Set
    outputs.findAll { !(it.file in claimed) }.each { println "${it.file.name}: no image of this project matches (add the slide to the project, or rename its image to ${it.name})" }
}
println "wsiseg import: ${imported} nuclei imported from ${resultsDir}"
if (failures)
    throw new RuntimeException("wsiseg import: ${failures.size()} part(s) failed; rewrite them with `wsiseg run --overwrite` and run this script again:\n" + failures.join("\n"))


// ---- helpers ---------------------------------------------------------------------------

String firstLine(Exception e) {
    String text = e.message?.trim()
    return text ? text.readLines()[0] : e.class.simpleName
}

void closeQuietly(imageData) {
    try {
        imageData.getServer().close()
    } catch (Exception ignored) {
    }
}

/** True when `imageData` is the image shown in the viewer (the script runs with Run, not Run for project). */
boolean isViewerImage(imageData) {
    try {
        def gui = getQuPath()
        return gui != null && imageData.is(gui.getImageData())
    } catch (Exception ignored) {
        return false
    }
}

/** The results folder: the setting, else the script's first argument, else asked for (once per session in batch mode). */
File resultsFolder(String setting, boolean batch) {
    String dir = setting?.trim()
    if (!dir && binding.hasVariable("args") && binding.getVariable("args"))
        dir = binding.getVariable("args")[0]
    if (!dir && batch)
        dir = System.getProperty(PROPERTY_KEY + ".dir")
    if (!dir) {
        File chosen = askForFolder()
        if (chosen == null)
            throw new IllegalArgumentException("wsiseg import: no results folder chosen; set RESULTS_DIR at the top of the script")
        dir = chosen.getAbsolutePath()
        System.setProperty(PROPERTY_KEY + ".dir", dir)
    }
    File folder = new File(dir)
    if (!folder.isDirectory())
        throw new IllegalArgumentException("wsiseg import: results folder ${folder} does not exist; set RESULTS_DIR to the folder given to `wsiseg run -o`")
    println "wsiseg import: results folder ${folder}"
    return folder
}

File askForFolder() {
    String title = "Folder with wsiseg results (wsiseg run -o)"
    try {
        return Class.forName("qupath.fx.dialogs.FileChoosers").promptForDirectory(title, null)  // QuPath >= 0.5
    } catch (ClassNotFoundException ignored) {
        return Class.forName("qupath.lib.gui.dialogs.Dialogs").promptForDirectory(null)
    }
}

/** The slide's file name without its extension, as wsiseg names outputs (`.ome.tiff` is one extension). */
String slideStem(String name) {
    for (String suffix in [".ome.tiff", ".ome.tif"])
        if (name.toLowerCase().endsWith(suffix))
            return name.substring(0, name.length() - suffix.length())
    int dot = name.lastIndexOf(".")
    return dot > 0 && dot < name.length() - 1 ? name.substring(0, dot) : name
}

/** The output name wsiseg gives a slide whose stem another slide shares: "slide.svs" -> "slide_svs". */
String stemWithExtension(String name) {
    String stem = slideStem(name)
    String ext = name.substring(stem.length()).replaceAll('[^A-Za-z0-9]+', '_').replaceAll('^_+|_+$', '')
    return stem + "_" + (ext ?: "noext")
}

/** One map per output name: name, file (the newest of its GeoJSON files), source (slide path from the report, or null). */
List<Map> findOutputs(File folder) {
    Map<String, Map> byName = [:]
    for (File file in (folder.listFiles() ?: new File[0]).sort { it.name }) {
        String suffix = SUFFIXES.find { file.isFile() && file.name.toLowerCase().endsWith(it) }
        if (suffix == null)
            continue
        String name = file.name.substring(0, file.name.length() - suffix.length())
        Map known = byName[name]
        if (known != null && known.file.lastModified() >= file.lastModified())
            continue
        byName[name] = [name: name, file: file, source: null, nuclei: null]
    }
    for (Map output in byName.values()) {
        File report = new File(folder, output.name + ".report.json")
        if (!report.isFile())
            continue
        try {
            Map data = report.withReader("UTF-8") { GsonTools.getInstance().fromJson(it, Map) }
            output.source = data?.source?.path ?: data?.slide
            output.nuclei = data?.counts?.nuclei
        } catch (Exception e) {
            println "${report.name}: unreadable (${e.message}); matching ${output.name} by name only"
        }
    }
    return byName.values() as List
}

/** The file paths of a project image (none for images that are not local files). */
List<Path> imagePaths(entry) {
    try {
        return entry.getURIs().findAll { it.scheme == "file" }.collect { Paths.get(it).toAbsolutePath().normalize() }
    } catch (Exception ignored) {
        return []
    }
}

/** entry -> output, by the rules in the header; an output goes to one image at most. */
Map<Object, Map> matchOutputs(List<Map> outputs, List entries) {
    Map<String, List<Map>> bySource = outputs.findAll { it.source }.groupBy { Paths.get(it.source).toAbsolutePath().normalize().toString() }
    Map<String, List<Map>> byFileName = outputs.findAll { it.source }.groupBy { Paths.get(it.source).getFileName().toString().toLowerCase() }
    Map<String, Map> byName = outputs.collectEntries { [(it.name.toLowerCase()): it] }
    Map<Object, List<Path>> paths = entries.collectEntries { [(it): imagePaths(it)] }
    Map<String, Integer> pathUse = [:].withDefault { 0 }
    paths.values().flatten().each { pathUse[it.toString()] += 1 }
    Map<Object, Map> found = [:]
    Set<File> taken = [] as Set
    // Rules in order over all images, so a precise match is never taken by a looser one.
    List<Closure> rules = [
        { entry -> paths[entry].findAll { pathUse[it.toString()] == 1 }.collect { bySource[it.toString()] }.find { it?.size() == 1 }?.first() },
        { entry -> paths[entry].findAll { pathUse[it.toString()] == 1 }.collect { byFileName[it.getFileName().toString().toLowerCase()] }.find { it?.size() == 1 }?.first() },
        { entry -> String n = entry.getImageName(); [n, slideStem(n), stemWithExtension(n)].collect { byName[it.toLowerCase()] }.find { it != null } },
    ]
    for (Closure rule in rules) {
        for (entry in entries) {
            if (found.containsKey(entry))
                continue
            Map output = rule(entry)
            if (output != null && !(output.file in taken)) {
                found[entry] = output
                taken << output.file
            }
        }
    }
    return found
}

/** Add one output's nuclei to `imageData`; returns how many, or null when it was imported before and has not changed.
 *  Failed parts are appended to `failures`. */
Integer importOutput(imageData, Map output, boolean replacePrevious, boolean force, List<String> failures, String imageName) {
    File file = output.file
    String signature = "${file.name}:${file.length()}:${file.lastModified()}"
    def previous = imageData.getProperty(PROPERTY_KEY)
    if (previous == signature && !force) {
        println "${imageName}: ${file.name} already imported (unchanged; FORCE = true imports it again)"
        return null
    }
    def hierarchy = imageData.getHierarchy()
    if (previous != null && replacePrevious) {
        def old = hierarchy.getDetectionObjects().findAll { it.getMeasurementList().containsKey("label_id") }
        hierarchy.removeObjects(old, true)
        println "${imageName}: removed ${old.size()} detections of an earlier import"
    }
    checkHeap(output, imageName)
    int n = 0
    int failed = failures.size()
    readParts(file, failures) { objects ->
        hierarchy.addObjects(objects)
        n += objects.size()
    }
    imageData.setProperty(PROPERTY_KEY, failures.size() == failed ? signature : "incomplete:" + signature)
    println "${imageName}: ${n} nuclei from ${file.name}"
    return n
}

/** Read `file` part by part (each zip entry on its own, so only one part's JSON is in memory) and pass each part's objects to `sink`. */
void readParts(File file, List<String> failures, Closure sink) {
    String lower = file.name.toLowerCase()
    if (lower.endsWith(".zip")) {
        ZipFile zip = new ZipFile(file)
        try {
            def parts = zip.entries().toList().findAll { !it.isDirectory() && it.name.toLowerCase().endsWith(".geojson") }.sort { it.name }
            if (parts.isEmpty())
                failures << "${file.name}: no .geojson entries in the zip"
            for (part in parts) {
                try {
                    sink(PathIO.readObjectsFromGeoJSON(zip.getInputStream(part)))
                } catch (Exception e) {  // QuPath's own zip import would skip the entry silently
                    failures << "${file.name}:${part.name}: ${firstLine(e)}"
                }
            }
        } finally {
            zip.close()
        }
    } else {
        try {
            if (lower.endsWith(".gz"))
                sink(PathIO.readObjectsFromGeoJSON(new GZIPInputStream(new BufferedInputStream(Files.newInputStream(file.toPath())), 1 << 16)))
            else
                sink(PathIO.readObjects(file.toPath()))
        } catch (Exception e) {
            failures << "${file.name}: ${firstLine(e)}"
        }
    }
}

/** The text size a gzip file holds, from its trailer (RFC 1952: ISIZE, the size modulo 2^32, little-endian). */
long gzipTextSize(File file) {
    RandomAccessFile raf = new RandomAccessFile(file, "r")
    try {
        raf.seek(Math.max(0L, raf.length() - 4))
        long size = 0
        for (int i = 0; i < 4; i++)
            size |= ((long) raf.read()) << (8 * i)
        return size
    } finally {
        raf.close()
    }
}

/** Warn when the largest part plus the slide's nuclei may not fit in QuPath's heap. */
void checkHeap(Map output, String imageName) {
    File file = output.file
    long largest
    if (file.name.toLowerCase().endsWith(".zip")) {
        ZipFile zip = new ZipFile(file)
        try {
            largest = zip.entries().toList().collect { Math.max(it.size, 0L) }.max() ?: 0L
        } finally {
            zip.close()
        }
    } else {
        largest = file.name.toLowerCase().endsWith(".gz") ? gzipTextSize(file) : file.length()
    }
    long nuclei = (output.nuclei ?: 0) as long
    long need = DOM_BYTES_PER_TEXT_BYTE * largest + OBJECT_BYTES * nuclei
    long max = Runtime.getRuntime().maxMemory()
    if (need > 0.75 * max)
        println "WARNING ${imageName}: importing ${file.name} may need about ${need >> 20} MB of heap, QuPath has ${max >> 20} MB; " +
                "if it runs out of memory, raise QuPath's maximum memory or write the output as --geojson-format zip"
}
