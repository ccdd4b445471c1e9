"""A 300 MB upload streams to disk: server RSS grows by less than 50 MB (measured, printed)."""

import hashlib
import os
import socket
import subprocess
import sys
import threading
import time

import httpx
import psutil
import pytest

UPLOAD_MB = 300
RSS_BUDGET_MB = 50
BOUNDARY = b"kiapi-rss-test"
CHUNK = b"0123456789abcdef" * 4096  # 64 KiB


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(tmp_path):
    port = free_port()
    env = {**os.environ, "KIAPI_FILES_ROOT": str(tmp_path / "files"), "KIAPI_MAX_UPLOAD_MB": "512"}
    proc = subprocess.Popen([sys.executable, "-m", "kiapi", "serve", "--port", str(port)], env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            health = httpx.get(f"{url}/health")
            if health.status_code == 200 and health.json()["warm"]:
                break  # the warmup model load is done: it is not the upload's memory
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline and proc.poll() is None, "server did not start"
        time.sleep(0.1)
    yield url, psutil.Process(proc.pid)
    proc.terminate()
    proc.wait(10)


def multipart_body(total_chunks: int, digest):
    yield (
        b"--"
        + BOUNDARY
        + b'\r\nContent-Disposition: form-data; name="file"; filename="big.bin"\r\n'
        b"Content-Type: application/octet-stream\r\n\r\n"
    )
    for _ in range(total_chunks):
        digest.update(CHUNK)
        yield CHUNK
    yield b"\r\n--" + BOUNDARY + b"--\r\n"


@pytest.mark.slow
def test_300mb_upload_keeps_rss_flat(server):
    url, process = server
    httpx.get(f"{url}/v1/files")  # warm the request path once
    baseline = process.memory_info().rss
    peak = baseline
    done = threading.Event()

    def sample():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, process.memory_info().rss)
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    digest = hashlib.sha256()
    chunks = UPLOAD_MB * 1024 * 1024 // len(CHUNK)
    try:
        response = httpx.post(
            f"{url}/v1/files",
            content=multipart_body(chunks, digest),
            headers={"content-type": f"multipart/form-data; boundary={BOUNDARY.decode()}"},
            timeout=300,
        )
    finally:
        done.set()
        sampler.join()
    assert response.status_code == 200, response.text
    record = response.json()
    assert record["size"] == chunks * len(CHUNK)
    assert record["meta"]["sha256"] == digest.hexdigest()
    growth_mb = (peak - baseline) / 2**20
    print(
        f"\n300 MB upload: server RSS baseline {baseline / 2**20:.1f} MiB, "
        f"peak {peak / 2**20:.1f} MiB, growth {growth_mb:.1f} MiB (budget {RSS_BUDGET_MB})"
    )
    assert growth_mb < RSS_BUDGET_MB
