"""Download a model over HTTP(S) into the cache: resumable, sha256-checked, then imported.

`pull("sam_vit_b")` fetches a file of the KNOWN_MODELS registry; `pull(url, sha256=...)`
any bundle .zip or SAM .pth.  A download goes to `<name>.part` first; an interrupted one
resumes with an HTTP Range request (or restarts when the server ignores Range).  Nothing
is imported unless the sha256 matches.  A bundle .zip is imported as it is; a SAM
checkpoint (official, or a PromptNucSeg segmentor) goes through
wsiseg.models.sam.convert.convert_sam_checkpoint first.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import re
import shutil
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable
from urllib.parse import urlparse

from wsiseg._version import __version__
from wsiseg.models.bundles import sha256_of_file
from wsiseg.models.cache import bundles_dir, import_bundle, wsiseg_home

__all__ = ["KNOWN_MODELS", "KINDS", "KnownModel", "PullError", "ProgressCallback", "pull"]

logger = logging.getLogger(__name__)

KINDS = ("bundle-zip", "sam-checkpoint")
#: called with (bytes written so far, total bytes or None when the server does not say).
ProgressCallback = Callable[[int, "int | None"], None]
_SHA256 = re.compile(r"[0-9a-f]{64}")
_CHUNK = 1 << 20
#: network failures worth a retry (with resume); HTTP errors other than 416 are not.
_TRANSIENT = (ConnectionError, TimeoutError, http.client.HTTPException, urllib.error.URLError)


class PullError(RuntimeError):
    """A download failed or did not match its checksum; nothing was imported."""


@dataclass(frozen=True)
class KnownModel:
    """A downloadable model: where it is, what it is, and how to check it.

    sha256: lower-case hex, or None when unpublished (the download is then accepted with a
    warning and the computed sha256 recorded in the bundle's source.json).
    size_bytes: the exact file size when known (checked too).
    """

    name: str
    url: str
    kind: str
    description: str
    sha256: str | None = None
    size_bytes: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"KnownModel {self.name!r}: kind must be one of {KINDS}, got {self.kind!r}")
        if urlparse(self.url).scheme not in ("http", "https"):
            raise ValueError(f"KnownModel {self.name!r}: url must be http(s), got {self.url!r}")
        if self.sha256 is not None and not _SHA256.fullmatch(self.sha256):
            raise ValueError(f"KnownModel {self.name!r}: sha256 must be 64 lower-case hex digits")
        if self.size_bytes is not None and self.size_bytes <= 0:
            raise ValueError(f"KnownModel {self.name!r}: size_bytes must be > 0")

    @property
    def filename(self) -> str:
        return PurePosixPath(urlparse(self.url).path).name or f"{self.name}.bin"


_SAM_URL = "https://dl.fbaipublicfiles.com/segment_anything/"
_SAM_NOTE = "not fine-tuned on nuclei: a base for fine-tuning, or to try SAM as it is"
# The official SAM checkpoints (segment-anything README).  The file names end in the first
# six hex digits of each file's md5; sizes and sha256 are as recorded for these exact files
# in several independent public download manifests.
KNOWN_MODELS: dict[str, KnownModel] = {
    m.name: m
    for m in (
        KnownModel(
            "sam_vit_b",
            _SAM_URL + "sam_vit_b_01ec64.pth",
            "sam-checkpoint",
            f"official SAM ViT-B (91M parameters; {_SAM_NOTE})",
            sha256="ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912",
            size_bytes=375_042_383,
        ),
        KnownModel(
            "sam_vit_l",
            _SAM_URL + "sam_vit_l_0b3195.pth",
            "sam-checkpoint",
            f"official SAM ViT-L (308M parameters; {_SAM_NOTE})",
            sha256="3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622",
            size_bytes=1_249_524_607,
        ),
        KnownModel(
            "sam_vit_h",
            _SAM_URL + "sam_vit_h_4b8939.pth",
            "sam-checkpoint",
            f"official SAM ViT-H (636M parameters; {_SAM_NOTE})",
            sha256="a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e",
            size_bytes=2_564_550_879,
        ),
    )
}


def pull(
    name_or_url: str,
    *,
    sha256: str | None = None,
    dest: str | os.PathLike[str] | None = None,
    progress: ProgressCallback | None = None,
    name: str | None = None,
    retries: int = 3,
    timeout_s: float = 60.0,
) -> Path:
    """Download a known model or a URL, check it, import it into the cache; return its folder.

    sha256: the expected hex digest (overrides the registry's).  dest: keep the downloaded
    file in this folder (default: `$WSISEG_HOME/downloads`, deleted after import).
    name: the cache name (default: the registry name, the bundle's manifest name, or the
    checkpoint's file stem).  retries: resumed attempts after a dropped connection.
    Raises PullError (download failed, or sha256/size mismatch: the file is deleted and
    nothing imported); BundleError when the downloaded bundle is invalid.
    """
    entry = _entry_for(name_or_url, sha256)
    folder = Path(dest).expanduser() if dest is not None else wsiseg_home() / "downloads"
    folder.mkdir(parents=True, exist_ok=True)
    file = folder / entry.filename
    if not (file.is_file() and entry.sha256 and sha256_of_file(file) == entry.sha256):
        file.unlink(missing_ok=True)
        _download(entry.url, file, progress=progress, retries=retries, timeout_s=timeout_s)
    actual = _check(file, entry)
    installed = _install(file, entry, name)
    source = {
        "url": entry.url,
        "sha256": actual,
        "sha256_checked": entry.sha256 is not None,
        "size_bytes": file.stat().st_size,
        "kind": entry.kind,
        "pulled_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    (installed / "source.json").write_text(json.dumps(source, indent=2) + "\n", encoding="utf-8")
    if dest is None:
        file.unlink(missing_ok=True)
    return installed


def _entry_for(name_or_url: str, sha256: str | None) -> KnownModel:
    expected = sha256.strip().lower() if sha256 else None
    if expected is not None and not _SHA256.fullmatch(expected):
        raise PullError(f"--sha256 {sha256!r} is not 64 hex digits")
    if name_or_url in KNOWN_MODELS:
        known = KNOWN_MODELS[name_or_url]
        if expected is None:
            return known
        return KnownModel(known.name, known.url, known.kind, known.description, expected, known.size_bytes)
    parsed = urlparse(name_or_url)
    if parsed.scheme not in ("http", "https"):
        raise PullError(
            f"{name_or_url!r} is neither a known model ({', '.join(KNOWN_MODELS)}) nor an http(s) URL; "
            "for a local file use `wsiseg models import`"
        )
    stem = PurePosixPath(parsed.path).name
    suffix = PurePosixPath(stem).suffix.lower()
    if suffix == ".zip":
        kind = "bundle-zip"
    elif suffix in (".pth", ".pt"):
        kind = "sam-checkpoint"
    else:
        raise PullError(f"{name_or_url}: cannot tell what this is; the URL must end in .zip (bundle) or .pth (SAM)")
    return KnownModel(PurePosixPath(stem).stem, name_or_url, kind, "downloaded from " + name_or_url, expected)


def _check(file: Path, entry: KnownModel) -> str:
    size = file.stat().st_size
    actual = sha256_of_file(file)
    if entry.sha256 is not None and actual != entry.sha256:
        file.unlink(missing_ok=True)
        raise PullError(
            f"{entry.url}: the download has sha256 {actual}, expected {entry.sha256}; deleted it and "
            "imported nothing (check the URL and --sha256, then pull again)"
        )
    if entry.size_bytes is not None and size != entry.size_bytes:
        file.unlink(missing_ok=True)
        raise PullError(f"{entry.url}: the download has {size} bytes, expected {entry.size_bytes}; deleted it")
    if entry.sha256 is None:
        logger.warning("%s has no published sha256 to check; recorded its sha256 %s", entry.url, actual)
    return actual


def _install(file: Path, entry: KnownModel, name: str | None) -> Path:
    if entry.kind == "bundle-zip":
        known = entry.name if entry.name in KNOWN_MODELS else None
        return import_bundle(file, name or known, overwrite=True)
    from wsiseg.models.sam.convert import convert_sam_checkpoint

    cache_name = name or entry.name
    root = bundles_dir()
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".pull-{cache_name}-", dir=root))
    try:
        out = convert_sam_checkpoint(file, staging / "bundle", name=cache_name)
        return import_bundle(out, cache_name, overwrite=True, move=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _download(url: str, target: Path, *, progress: ProgressCallback | None, retries: int, timeout_s: float) -> None:
    """Fetch `url` into `target` through `target.part`, resuming after dropped connections."""
    part = target.with_name(target.name + ".part")
    failures = 0
    while True:
        try:
            _fetch_once(url, part, progress=progress, timeout_s=timeout_s)
            break
        except urllib.error.HTTPError as exc:
            raise PullError(f"{url}: the server answered HTTP {exc.code} {exc.reason}") from exc
        except _TRANSIENT as exc:
            failures += 1
            have = part.stat().st_size if part.exists() else 0
            if failures > retries:
                raise PullError(
                    f"{url}: download failed after {failures} attempts ({exc}); {have} bytes are kept in "
                    f"{part}: run the same command again to resume"
                ) from exc
            logger.warning("%s: connection lost after %d bytes (%s); resuming", url, have, exc)
    os.replace(part, target)


def _fetch_once(url: str, part: Path, *, progress: ProgressCallback | None, timeout_s: float) -> None:
    have = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": f"wsiseg/{__version__}", "Accept-Encoding": "identity"}
    if have:
        headers["Range"] = f"bytes={have}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=timeout_s)  # noqa: S310 (scheme checked)
    except urllib.error.HTTPError as exc:
        if exc.code != 416 or not have:
            raise
        # Range past the end: the .part is already whole (size matches) or stale (restart).
        if _content_range(exc.headers.get("Content-Range", ""))[2] == have:
            return
        logger.info("%s: the partial download %s does not fit the file; restarting", url, part)
        part.unlink()
        _fetch_once(url, part, progress=progress, timeout_s=timeout_s)
        return
    with response:
        start, _, total = _content_range(response.headers.get("Content-Range", ""))
        if have and response.status == 206 and start == have:
            mode = "ab"
        else:
            if have:
                logger.info("%s: the server ignored the Range request; downloading from the start", url)
            have, mode = 0, "wb"
        length_header = response.headers.get("Content-Length")
        body_bytes = int(length_header) if length_header and length_header.isdigit() else None
        if total is None and body_bytes is not None:
            total = have + body_bytes
        received = 0
        with open(part, mode) as f:
            while chunk := response.read(_CHUNK):
                f.write(chunk)
                received += len(chunk)
                if progress is not None:
                    progress(have + received, total)
        if body_bytes is not None and received < body_bytes:
            raise ConnectionError(f"the server closed the connection after {have + received} of {total} bytes")


def _content_range(value: str) -> tuple[int | None, int | None, int | None]:
    """Parse 'bytes START-END/TOTAL' or 'bytes */TOTAL' into (start, end, total)."""
    match = re.fullmatch(r"\s*bytes\s+(?:(\d+)-(\d+)|\*)/(\d+|\*)\s*", value or "")
    if not match:
        return None, None, None
    start, end, total = (int(g) if g and g != "*" else None for g in match.groups())
    return start, end, total
