"""kiapi as pip installs it, not as the checkout runs it: the wheel and the sdist build with no
warning, install into fresh virtual environments, carry the served specs, and the installed
``kiapi`` serves its docs and both bundled models.

The fresh environments reuse the test environment's dependencies (a ``.pth`` line) instead of
downloading them again, so what is tested is kiapi's own packaging: its files, its entry
point, its package data.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import httpx
import pytest

from tests.support import free_port, wait_until_warm

ROOT = Path(__file__).resolve().parents[2]
SPECS = sorted(p.relative_to(ROOT / "specs").as_posix() for p in (ROOT / "specs").rglob("*.json"))


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    # `build` makes the sdist, then the wheel from that sdist (so the sdist is proven to build).
    done = subprocess.run(
        [sys.executable, "-m", "build", "--outdir", str(out), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    log = done.stdout + done.stderr
    assert "Deprecat" not in log and "SetuptoolsWarning" not in log, log[-3000:]
    assert "Successfully built kiapi-" in log and ".whl" in log, log[-3000:]
    return out


def fresh_venv(where: Path) -> Path:
    subprocess.run([sys.executable, "-m", "venv", str(where)], check=True, timeout=120)
    site = next((where / "lib").glob("python3*/site-packages"))
    (site / "kiapi-test-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return where / "bin"


def pip_install(bin_dir: Path, target: Path) -> None:
    done = subprocess.run(
        [str(bin_dir / "python"), "-m", "pip", "install", "--no-deps", "--no-index", str(target)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]


def test_the_wheel_carries_the_specs_and_the_license(dist):
    (wheel,) = dist.glob("kiapi-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"kiapi/_specs/{name}" for name in SPECS} <= names
    assert "kiapi/runtime/builtin_models.toml" in names  # the built-in catalog is package data
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    metadata = next(n for n in names if n.endswith(".dist-info/METADATA"))
    text = zipfile.ZipFile(wheel).read(metadata).decode()
    assert "License-Expression: MIT" in text


def test_the_installed_wheel_serves_docs_and_both_bundled_models(dist, tmp_path):
    bin_dir = fresh_venv(tmp_path / "venv")
    pip_install(bin_dir, next(dist.glob("kiapi-*.whl")))
    port = free_port()
    env = {**os.environ, "KIAPI_FILES_ROOT": str(tmp_path / "files"), "KIAPI_PORT": str(port)}
    env.pop("PYTHONPATH", None)
    setup = subprocess.run(
        [str(bin_dir / "kiapi"), "setup"], env=env, capture_output=True, text=True, timeout=600
    )
    assert setup.returncode == 0, setup.stdout + setup.stderr
    doctor = subprocess.run(
        [str(bin_dir / "kiapi"), "doctor"], env=env, capture_output=True, text=True, timeout=120
    )
    blas_line = next(line for line in doctor.stdout.splitlines() if " blas " in line)
    assert blas_line.startswith("ok ") and "OpenBLAS" in blas_line, doctor.stdout  # no root, no apt
    server = subprocess.Popen(
        [str(bin_dir / "kiapi"), "serve"],
        env=env,
        cwd=tmp_path,  # not the checkout: nothing may come from it
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_warm(url, server)
        for page in ("/v1/chat/docs.html", "/docs-assets/swagger-ui-bundle.js"):
            assert httpx.get(url + page, timeout=10).status_code == 200, page
        kiapi_path = httpx.get(f"{url}/v1/chat/openapi.json", timeout=10).json()
        assert "/v1/chat/completions" in kiapi_path["paths"]
        embedded = httpx.post(f"{url}/v1/embedding", json={"text": "hello"}, timeout=60)
        assert embedded.status_code == 200 and embedded.json()["dimension"] == 384
        chat = httpx.post(
            f"{url}/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2},
            timeout=120,
        )
        assert chat.status_code == 200, chat.text
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_the_sdist_installs_and_carries_the_specs(dist, tmp_path):
    bin_dir = fresh_venv(tmp_path / "venv")
    (sdist,) = dist.glob("kiapi-*.tar.gz")
    done = subprocess.run(
        [str(bin_dir / "python"), "-m", "pip", "install", "--no-deps", str(sdist)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    site = next((tmp_path / "venv" / "lib").glob("python3*/site-packages"))
    for name in SPECS:
        installed = site / "kiapi" / "_specs" / name
        assert installed.read_bytes() == (ROOT / "specs" / name).read_bytes()
