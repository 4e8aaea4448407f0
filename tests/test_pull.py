"""`pull`: HTTP download with resume, sha256 check, and import, against a local server."""

from __future__ import annotations

import hashlib
import http.server
import json
import logging
import re
import shutil
import sys
import threading
import types
import zipfile
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch
from click.testing import CliRunner
from wsiseg.cli.models import models

from wsiseg.models.bundles import open_bundle, write_bundle
from wsiseg.models.pull import KNOWN_MODELS, KnownModel, PullError, pull


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("WSISEG_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves `server.files`; honours `Range: bytes=N-` unless `server.ranges` is False; drops
    the connection after `server.drop_after[path]` body bytes for the next `server.drops` requests."""

    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # silence stderr
        pass

    def do_GET(self) -> None:
        srv = self.server
        srv.requests.append((self.path, self.headers.get("Range")))
        data = srv.files.get(self.path)
        if data is None:
            self.send_error(404)
            return
        start = 0
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        if match and srv.ranges:
            start = int(match.group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if srv.drops > 0 and self.path in srv.drop_after:
            srv.drops -= 1
            body = body[: srv.drop_after[self.path]]
            self.close_connection = True
        srv.sent += len(body)  # counted before writing: the client may finish first
        self.wfile.write(body)


class _Server(http.server.ThreadingHTTPServer):
    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.files: dict[str, bytes] = {}
        self.requests: list[tuple[str, str | None]] = []
        self.ranges = True
        self.drop_after: dict[str, int] = {}
        self.drops = 0
        self.sent = 0
        self.url = f"http://127.0.0.1:{self.server_address[1]}"


@pytest.fixture()
def server() -> Iterator[_Server]:
    srv = _Server()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def bundle_zip(tmp_path: Path, name: str = "remote", n: int = 20_000) -> bytes:
    """A valid bundle .zip, incompressible, about 4n bytes."""
    state = {
        "image_encoder.w": torch.randn(n, generator=torch.Generator().manual_seed(0)),
        "prompt_encoder.w": torch.ones(2),
        "mask_decoder.w": torch.ones(2),
    }
    manifest = {"name": name, "mpp": 0.25, "components": {"segmentor": {"architecture": "sam"}}}
    folder = write_bundle(tmp_path / f"src-{name}", manifest, {"segmentor": state}).root
    archive = tmp_path / f"{name}.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_STORED) as zf:
        for f in folder.iterdir():
            zf.write(f, f.name)
    shutil.rmtree(folder)
    return archive.read_bytes()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_full_download_is_checked_imported_and_recorded(tmp_path: Path, home: Path, server: _Server) -> None:
    data = bundle_zip(tmp_path)
    server.files["/m/remote.zip"] = data
    seen: list[tuple[int, int | None]] = []
    path = pull(f"{server.url}/m/remote.zip", sha256=sha(data), progress=lambda d, t: seen.append((d, t)))
    assert path == home / "bundles" / "remote"
    assert open_bundle(path).manifest.name == "remote"
    assert seen[-1] == (len(data), len(data)) and [d for d, _ in seen] == sorted(d for d, _ in seen)
    source = json.loads((path / "source.json").read_text())
    assert source["sha256"] == sha(data) and source["sha256_checked"] is True
    assert source["url"] == f"{server.url}/m/remote.zip"
    assert list((home / "downloads").iterdir()) == []  # the download is removed after import
    assert server.requests == [("/m/remote.zip", None)]


def test_dropped_connection_resumes_with_a_range_request(tmp_path: Path, server: _Server) -> None:
    data = bundle_zip(tmp_path)
    server.files["/remote.zip"] = data
    server.drop_after["/remote.zip"], server.drops = len(data) // 3, 1
    path = pull(f"{server.url}/remote.zip", sha256=sha(data), dest=tmp_path / "dl")
    assert (tmp_path / "dl" / "remote.zip").read_bytes() == data  # kept, since dest was given
    assert server.requests == [("/remote.zip", None), ("/remote.zip", f"bytes={len(data) // 3}-")]
    assert server.sent == len(data)  # nothing fetched twice
    assert open_bundle(path).manifest.name == "remote"


def test_existing_part_file_is_resumed(tmp_path: Path, server: _Server) -> None:
    data = bundle_zip(tmp_path)
    server.files["/remote.zip"] = data
    dest = tmp_path / "dl"
    dest.mkdir()
    (dest / "remote.zip.part").write_bytes(data[:1000])
    pull(f"{server.url}/remote.zip", sha256=sha(data), dest=dest)
    assert server.requests == [("/remote.zip", "bytes=1000-")] and server.sent == len(data) - 1000
    assert (dest / "remote.zip").read_bytes() == data and not (dest / "remote.zip.part").exists()


def test_server_without_range_support_restarts_from_the_start(tmp_path: Path, server: _Server) -> None:
    data = bundle_zip(tmp_path)
    server.files["/remote.zip"], server.ranges = data, False
    dest = tmp_path / "dl"
    dest.mkdir()
    (dest / "remote.zip.part").write_bytes(data[:1000])
    pull(f"{server.url}/remote.zip", sha256=sha(data), dest=dest)
    assert (dest / "remote.zip").read_bytes() == data
    server.drop_after["/remote.zip"], server.drops = 5000, 1  # and after a dropped connection too
    (dest / "remote.zip").unlink()
    pull(f"{server.url}/remote.zip", sha256=sha(data), dest=dest)
    assert (dest / "remote.zip").read_bytes() == data


def test_part_file_longer_than_the_file_is_discarded(tmp_path: Path, server: _Server) -> None:
    data = bundle_zip(tmp_path)
    server.files["/remote.zip"] = data
    dest = tmp_path / "dl"
    dest.mkdir()
    (dest / "remote.zip.part").write_bytes(b"x" * (len(data) + 10))
    pull(f"{server.url}/remote.zip", sha256=sha(data), dest=dest)
    assert (dest / "remote.zip").read_bytes() == data


def test_sha256_mismatch_is_refused_and_nothing_is_imported(tmp_path: Path, home: Path, server: _Server) -> None:
    data = bundle_zip(tmp_path)
    server.files["/remote.zip"] = data
    with pytest.raises(PullError, match="expected 0{64}; deleted it and imported nothing"):
        pull(f"{server.url}/remote.zip", sha256="0" * 64)
    assert not (home / "bundles").exists() or list((home / "bundles").iterdir()) == []
    assert list((home / "downloads").iterdir()) == []


def test_download_without_a_known_sha256_warns_and_records_it(
    tmp_path: Path, server: _Server, caplog: pytest.LogCaptureFixture
) -> None:
    data = bundle_zip(tmp_path)
    server.files["/remote.zip"] = data
    with caplog.at_level(logging.WARNING, logger="wsiseg.models.pull"):
        path = pull(f"{server.url}/remote.zip", name="unchecked")
    assert path.name == "unchecked"
    assert any("no published sha256" in r.getMessage() and sha(data) in r.getMessage() for r in caplog.records)
    source = json.loads((path / "source.json").read_text())
    assert source["sha256"] == sha(data) and source["sha256_checked"] is False


def test_repeated_failures_keep_the_part_for_the_next_run(tmp_path: Path, server: _Server) -> None:
    data = bundle_zip(tmp_path)
    server.files["/remote.zip"] = data
    server.drop_after["/remote.zip"], server.drops = 4000, 2
    dest = tmp_path / "dl"
    with pytest.raises(PullError, match="after 2 attempts.*run the same command again to resume"):
        pull(f"{server.url}/remote.zip", sha256=sha(data), dest=dest, retries=1)
    assert (dest / "remote.zip.part").read_bytes() == data[:8000]
    pull(f"{server.url}/remote.zip", sha256=sha(data), dest=dest)
    assert server.requests[-1] == ("/remote.zip", "bytes=8000-")
    assert (dest / "remote.zip").read_bytes() == data


def test_http_errors_and_bad_arguments_are_one_clear_error(server: _Server) -> None:
    with pytest.raises(PullError, match="HTTP 404"):
        pull(f"{server.url}/missing.zip")
    with pytest.raises(PullError, match="neither a known model .* nor an http"):
        pull("/local/file.zip")
    with pytest.raises(PullError, match="must end in .zip"):
        pull(f"{server.url}/model.bin")
    with pytest.raises(PullError, match="not 64 hex digits"):
        pull("sam_vit_b", sha256="abc")


def test_sam_checkpoint_is_converted_then_imported(
    tmp_path: Path, home: Path, server: _Server, monkeypatch: Any
) -> None:
    checkpoint = b"pretend SAM checkpoint" * 100
    server.files["/sam_vit_x_123456.pth"] = checkpoint
    calls: list[tuple[bytes, str]] = []

    def convert_sam_checkpoint(pth: Path, out_dir: Path, *, name: str) -> Path:
        calls.append((Path(pth).read_bytes(), name))
        state = {f"{m}.w": torch.zeros(2) for m in ("image_encoder", "prompt_encoder", "mask_decoder")}
        manifest = {"name": name, "mpp": 0.25, "components": {"segmentor": {"architecture": "sam"}}}
        return write_bundle(out_dir, manifest, {"segmentor": state}).root

    module = types.ModuleType("wsiseg.models.sam.convert")
    module.convert_sam_checkpoint = convert_sam_checkpoint  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, module.__name__, module)
    path = pull(f"{server.url}/sam_vit_x_123456.pth", sha256=sha(checkpoint))
    assert calls == [(checkpoint, "sam_vit_x_123456")]
    assert path == home / "bundles" / "sam_vit_x_123456" and open_bundle(path).has("segmentor")
    assert sorted(p.name for p in (home / "bundles").iterdir()) == ["sam_vit_x_123456"]
    assert json.loads((path / "source.json").read_text())["kind"] == "sam-checkpoint"


def test_known_models_are_well_formed_official_sam_files() -> None:
    assert {"sam_vit_b", "sam_vit_l", "sam_vit_h"} <= set(KNOWN_MODELS)
    for name, entry in KNOWN_MODELS.items():
        assert entry.name == name and entry.kind == "sam-checkpoint"
        assert entry.url.startswith("https://dl.fbaipublicfiles.com/segment_anything/sam_")
        assert entry.sha256 is not None and entry.size_bytes is not None
    assert KNOWN_MODELS["sam_vit_b"].filename == "sam_vit_b_01ec64.pth"
    with pytest.raises(ValueError, match="kind must be"):
        KnownModel("x", "https://example.org/x.zip", "tarball", "")
    with pytest.raises(ValueError, match="url must be http"):
        KnownModel("x", "ftp://example.org/x.zip", "bundle-zip", "")


def test_cli_pull_downloads_and_reports_errors(tmp_path: Path, home: Path, server: _Server) -> None:
    data = bundle_zip(tmp_path)
    server.files["/remote.zip"] = data
    ok = CliRunner().invoke(models, ["pull", f"{server.url}/remote.zip", "--sha256", sha(data)])
    assert ok.exit_code == 0, ok.output
    assert "pulled" in ok.output and (home / "bundles" / "remote" / "manifest.json").is_file()
    bad = CliRunner().invoke(models, ["pull", f"{server.url}/remote.zip", "--sha256", "1" * 64, "--name", "other"])
    assert bad.exit_code == 1 and "imported nothing" in bad.output
    assert not (home / "bundles" / "other").exists()
