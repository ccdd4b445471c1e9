"""Crash safety of the Files API: a SIGKILL never exposes a partial file, never damages the
files stored before it, and its leftovers are removed when the server next starts.

Real processes, real SIGKILLs: the server runs as ``python -m kiapi serve`` (no wrapper, so the
pid we kill is the process that writes), and artifacts are written by a separate Python process
through the store's own API (``StagedFile.write`` / ``put_bytes``), paused at each interesting
point of the commit sequence by a monkeypatch and killed there.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import psutil
import pytest

from kiapi.runtime.files import FileStore

REPO_ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 30
BOUNDARY = "kiapi-crash-test"
UNKNOWN_ID = "file_" + "0" * 24


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def wait_until(predicate, timeout: float, what: str, interval: float = 0.02):
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def child_env() -> dict[str, str]:
    """The environment of a child process: no KIAPI_* setting leaks in from the caller (but
    where `kiapi setup` put the bundled models), and the child imports this checkout's kiapi."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("KIAPI_") or k == "KIAPI_PACKAGES_ROOT"
    }
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    return env


class Processes:
    """Every child process a test starts; all of them are killed when the test ends."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.children: list[subprocess.Popen] = []
        self.logs: list = []
        self.count = 0

    def popen(self, args: list[str], env: dict[str, str], **kwargs) -> subprocess.Popen:
        self.count += 1
        log = open(self.workdir / f"child-{self.count}.log", "wb")  # noqa: SIM115 - closed below
        self.logs.append(log)
        kwargs.setdefault("stdout", log)
        proc = subprocess.Popen(
            args, env=env, cwd=self.workdir, stderr=log, stdin=subprocess.DEVNULL, **kwargs
        )
        proc.log_path = log.name
        self.children.append(proc)
        return proc

    def cleanup(self) -> None:
        for proc in self.children:
            if proc.poll() is None:
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
            if proc.stdout is not None:
                proc.stdout.close()
        for log in self.logs:
            log.close()


def log_tail(proc: subprocess.Popen, limit: int = 4000) -> str:
    return Path(proc.log_path).read_text(errors="replace")[-limit:]


def sigkill(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(10) == -signal.SIGKILL


class Server:
    """``python -m kiapi serve`` on a free loopback port over ``root``; the Popen is the server
    process itself, not a wrapper."""

    def __init__(self, procs: Processes, root: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = child_env() | {
            "KIAPI_FILES_ROOT": str(root),
            "KIAPI_WARMUP": "none",
            "KIAPI_MAX_UPLOAD_MB": "512",
            "KIAPI_LOG_LEVEL": "info",
        }
        self.proc = procs.popen(
            [
                sys.executable,
                "-m",
                "kiapi",
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
            ],
            env,
        )
        self.client = httpx.Client(base_url=self.url, timeout=30)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                health = self.client.get("/health")
                if health.status_code == 200 and health.json()["warm"]:
                    break
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"server did not start:\n{log_tail(self.proc)}")
            time.sleep(0.05)
        # The pid we will kill is the one that listens on the port (and so writes the uploads).
        listening = {
            c.laddr.port
            for c in psutil.Process(self.proc.pid).net_connections("tcp")
            if c.status == psutil.CONN_LISTEN
        }
        assert self.port in listening, listening

    def stop(self) -> None:
        """A clean shutdown (SIGTERM; uvicorn re-raises the signal once it has shut down)."""
        self.client.close()
        self.proc.terminate()
        assert self.proc.wait(15) in (0, -signal.SIGTERM), log_tail(self.proc)
        assert "Application shutdown complete" in log_tail(self.proc, 100_000)

    def kill(self) -> None:
        self.client.close()
        sigkill(self.proc)


@pytest.fixture
def procs(tmp_path):
    processes = Processes(tmp_path)
    try:
        yield processes
    finally:
        processes.cleanup()


# -- what a restarted server must show ----------------------------------------------------------


def leftovers(root: Path) -> list[str]:
    """Crash debris: temp files and ``.bin`` files without a sidecar."""
    return sorted(
        p.name
        for p in root.iterdir()
        if p.name.startswith(".tmp-")
        or (p.suffix == ".bin" and not p.with_suffix(".json").exists())
    )


def assert_store_is_exactly(server: Server, root: Path, expected: dict[str, tuple[dict, str]]):
    """The server lists exactly ``expected`` (file_id -> (record, sha256)), each record's metadata
    and bytes are intact, and the directory holds nothing but their ``.bin`` and ``.json``."""
    listing = server.client.get("/v1/files")
    assert listing.status_code == 200, listing.text
    listed = {r["file_id"]: r for r in listing.json()["data"]}
    assert set(listed) == set(expected)
    for file_id, (record, digest) in expected.items():
        assert listed[file_id] == record
        got = server.client.get(f"/v1/files/{file_id}")
        assert got.status_code == 200 and got.json() == record
        download = server.client.get(f"/v1/files/{file_id}/download")
        assert download.status_code == 200
        assert sha256(download.content) == digest == record["meta"]["sha256"]
        assert len(download.content) == record["size"]
        assert download.headers["content-type"] == record["content_type"]
    assert leftovers(root) == []
    assert sorted(p.name for p in root.iterdir()) == sorted(
        f"{file_id}{suffix}" for file_id in expected for suffix in (".bin", ".json")
    )
    assert_unknown(server, UNKNOWN_ID)


def assert_unknown(server: Server, file_id: str) -> None:
    for path in (f"/v1/files/{file_id}", f"/v1/files/{file_id}/download"):
        response = server.client.get(path)
        assert response.status_code == 404, (path, response.text)


# -- SIGKILL during an upload ----------------------------------------------------------------------


UPLOADS = [
    ("notes.txt", "text/plain", b"hello, crash test\n"),
    ("pic \u00fc.png", "image/png", bytes(range(256)) * 800),
    ("big.bin", "application/octet-stream", os.urandom(4 * 1024 * 1024 + 123)),
    ("empty.dat", "application/octet-stream", b""),
]


def start_slow_upload(server: Server, declared_mb: int) -> socket.socket:
    """A raw-socket multipart upload whose Content-Length promises ``declared_mb`` MiB; only the
    headers and the part preamble are sent here."""
    preamble = (
        f"--{BOUNDARY}\r\n"
        'Content-Disposition: form-data; name="file"; filename="huge.bin"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    epilogue = f"\r\n--{BOUNDARY}--\r\n".encode()
    length = len(preamble) + declared_mb * 1024 * 1024 + len(epilogue)
    head = (
        "POST /v1/files HTTP/1.1\r\n"
        f"Host: 127.0.0.1:{server.port}\r\n"
        f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
        f"Content-Length: {length}\r\n\r\n"
    ).encode()
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    sock.sendall(head + preamble)
    return sock


def temp_files(root: Path) -> list[Path]:
    return [p for p in root.iterdir() if p.name.startswith(".tmp-")]


@pytest.mark.slow
def test_sigkill_during_upload_exposes_nothing_and_keeps_earlier_files(procs, tmp_path):
    root = tmp_path / "files"
    server = Server(procs, root)
    expected: dict[str, tuple[dict, str]] = {}
    for filename, content_type, payload in UPLOADS:
        response = server.client.post(
            "/v1/files", files={"file": (filename, payload, content_type)}
        )
        assert response.status_code == 200, response.text
        record = response.json()
        assert (record["filename"], record["content_type"], record["size"]) == (
            filename,
            content_type,
            len(payload),
        )
        assert record["meta"]["sha256"] == sha256(payload)
        expected[record["file_id"]] = (record, sha256(payload))

    # An 80 MiB upload, fed 256 KiB at a time until the server has put >= 2 MiB of it on disk.
    sock = start_slow_upload(server, declared_mb=80)
    try:
        chunk = os.urandom(256 * 1024)
        sent = 0
        partial = None
        deadline = time.monotonic() + 20
        while partial is None:
            assert sent < 40 * 1024 * 1024 and time.monotonic() < deadline, "nothing on disk"
            sock.sendall(chunk)
            sent += len(chunk)
            for _ in range(5):
                big = [p for p in temp_files(root) if p.stat().st_size >= 2 * 1024 * 1024]
                if big:
                    partial = big[0]
                    break
                time.sleep(0.01)
        # The server process itself holds the partial file open, and does not list it.
        open_paths = {f.path for f in psutil.Process(server.proc.pid).open_files()}
        assert str(partial) in open_paths
        assert {r["file_id"] for r in server.client.get("/v1/files").json()["data"]} == set(
            expected
        )
        server.kill()
    finally:
        sock.close()
    assert partial.exists() and partial.stat().st_size > 0  # the crash left debris behind
    assert leftovers(root) == [partial.name]

    # Restart on the same root: the earlier files, intact; the partial upload, gone.
    server = Server(procs, root)
    assert_store_is_exactly(server, root, expected)

    # The restarted server works, and everything survives a clean restart too.
    payload = b"after the crash" * 1000
    response = server.client.post("/v1/files", files={"file": ("after.txt", payload, "text/plain")})
    assert response.status_code == 200, response.text
    expected[response.json()["file_id"]] = (response.json(), sha256(payload))
    server.stop()
    server = Server(procs, root)
    assert_store_is_exactly(server, root, expected)
    server.stop()


# -- SIGKILL while an artifact is written --------------------------------------------------------

# Writes one artifact into the store at argv[1] through the store's API and is killed by the test
# at the point argv[2] names: "mid-write" streams a StagedFile forever; the other modes run
# put_bytes with a hook that announces "PAUSED <file_id> <sha256>" and then waits to be killed.
WRITER = textwrap.dedent(
    """
    import hashlib, os, sys, time
    from pathlib import Path

    import kiapi.runtime.files as files

    root, mode = Path(sys.argv[1]), sys.argv[2]
    store = files.FileStore(root, max_upload_bytes=1 << 40).open()

    def say(*words):
        print(*words, flush=True)

    def hold(file_id):
        say("PAUSED", file_id, digest)
        time.sleep(120)
        os._exit(3)  # never reached: the test kills this process first

    if mode == "mid-write":
        staged = store.stage()
        chunk = os.urandom(1 << 20)
        for i in range(256):
            staged.write(chunk)  # > the buffer size: goes straight to the file
            if i == 0:
                say("WRITING")
            time.sleep(0.02)
        say("NOT KILLED")
        time.sleep(120)
        os._exit(3)

    payload = os.urandom(8 << 20)
    digest = hashlib.sha256(payload).hexdigest()
    if mode == "before-rename":  # data written and fsynced in a temp file, not yet renamed
        files.FileStore._publish = lambda self, tmp, record: hold(record.file_id)
    elif mode == "before-sidecar":  # <id>.bin in place, no sidecar written
        files._write_json_atomically = lambda path, data: hold(data["file_id"])
    elif mode == "before-sidecar-rename":  # sidecar complete in a temp file, not yet renamed
        real_replace = os.replace

        def replace(src, dst):
            if str(dst).endswith(".json"):
                hold(Path(dst).stem)
            return real_replace(src, dst)

        os.replace = replace
    elif mode == "after-sidecar":  # committed; the directory fsync and index update not done
        real_write_json = files._write_json_atomically

        def write_json(path, data):
            real_write_json(path, data)
            hold(data["file_id"])

        files._write_json_atomically = write_json
    else:
        raise SystemExit(f"unknown mode {mode}")
    store.put_bytes(
        payload, filename="render.mp4", content_type="video/mp4", meta={"source": "artifact"}
    )
    say("NOT PAUSED")
    """
)


def read_line(proc: subprocess.Popen, timeout: float) -> str:
    """The next stdout line of ``proc``, waiting at most ``timeout`` seconds."""
    fd = proc.stdout.fileno()
    buffer = b""
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        while b"\n" not in buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not sel.select(left):
                raise AssertionError(f"no line from the writer in {timeout} s:\n{log_tail(proc)}")
            data = os.read(fd, 1)  # byte by byte: nothing past the line is consumed
            if not data:
                raise AssertionError(f"the writer exited early:\n{log_tail(proc)}")
            buffer += data
    return buffer.decode().strip()


def seed_store(root: Path) -> dict[str, tuple[dict, str]]:
    """Earlier artifacts, stored normally."""
    store = FileStore(root, max_upload_bytes=1 << 30).open()
    expected = {}
    for filename, content_type, payload in [
        ("report.md", "text/markdown", "# Report \u2713\n".encode() * 100),
        ("frame.png", "image/png", bytes(range(256)) * 64),
        ("audio.wav", "audio/wav", os.urandom(3 * 1024 * 1024)),
    ]:
        record = store.put_bytes(
            payload, filename=filename, content_type=content_type, meta={"source": "seed"}
        )
        expected[record.file_id] = (record.to_dict(), sha256(payload))
    return expected


ARTIFACT_SIZE = 8 << 20


@pytest.mark.slow
@pytest.mark.parametrize(
    "mode",
    ["mid-write", "before-rename", "before-sidecar", "before-sidecar-rename", "after-sidecar"],
)
def test_sigkill_while_writing_an_artifact(procs, tmp_path, mode):
    root = tmp_path / "files"
    expected = seed_store(root)
    seeded = {p.name for p in root.iterdir()}

    writer = procs.popen(
        [sys.executable, "-c", WRITER, str(root), mode], child_env(), stdout=subprocess.PIPE
    )
    crashed_id = None
    if mode == "mid-write":
        assert read_line(writer, 20) == "WRITING"
        # Killed while the temp file is demonstrably growing.
        first = wait_until(lambda: temp_files(root), 10, "the artifact's temp file")[0]
        size = first.stat().st_size
        wait_until(lambda: first.stat().st_size > size, 10, "the temp file to grow")
        assert str(first) in {f.path for f in psutil.Process(writer.pid).open_files()}
        sigkill(writer)
        assert 0 < first.stat().st_size < 256 << 20
        assert leftovers(root) == [first.name]
    else:
        marker, crashed_id, digest = read_line(writer, 20).split()
        assert marker == "PAUSED"
        sigkill(writer)
        bin_path, json_path = root / f"{crashed_id}.bin", root / f"{crashed_id}.json"
        new = {p.name for p in root.iterdir()} - seeded
        temps = temp_files(root)
        # The state the crash left, checked so that the test cannot pass vacuously.
        if mode == "before-rename":
            assert len(temps) == 1 and temps[0].stat().st_size == ARTIFACT_SIZE
            assert new == {temps[0].name}
        elif mode == "before-sidecar":
            assert new == {bin_path.name} and bin_path.stat().st_size == ARTIFACT_SIZE
            assert leftovers(root) == [bin_path.name]
        elif mode == "before-sidecar-rename":
            assert len(temps) == 1 and new == {bin_path.name, temps[0].name}
            assert json.loads(temps[0].read_bytes())["file_id"] == crashed_id
            assert not json_path.exists() and bin_path.stat().st_size == ARTIFACT_SIZE
        else:  # after-sidecar: committed before the crash, so it must survive it
            assert new == {bin_path.name, json_path.name}
            record = json.loads(json_path.read_bytes())
            assert record["size"] == ARTIFACT_SIZE and record["meta"]["sha256"] == digest
            assert (record["filename"], record["content_type"]) == ("render.mp4", "video/mp4")
            expected[crashed_id] = (record, digest)

    server = Server(procs, root)
    assert_store_is_exactly(server, root, expected)
    if crashed_id is not None and mode != "after-sidecar":
        assert_unknown(server, crashed_id)
    server.stop()
