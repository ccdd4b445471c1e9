"""Test helpers: a live uvicorn server in a thread, a fake clock, spec response checks."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import uvicorn
from jsonschema import Draft202012Validator

from kiapi.specs import served_document


class LiveServer:
    """Runs an ASGI app with uvicorn on a free loopback port, lifespan on."""

    def __init__(self, app) -> None:
        config = uvicorn.Config(app, host="127.0.0.1", port=0, lifespan="on", log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("live server did not start")
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@contextmanager
def serving(settings) -> Iterator[tuple[LiveServer, Any]]:
    """A live server for ``settings`` once it is warm, with the runtime it made."""
    import httpx

    from kiapi.app import create_app
    from kiapi.runtime.core import Runtime

    made = []

    def runtime_factory(settings):
        made.append(Runtime(settings))
        return made[-1]

    with LiveServer(create_app(settings, runtime_factory=runtime_factory)) as server:
        wait_until(lambda: httpx.get(f"{server.url}/health").json()["warm"])
        yield server, made[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def wait_until_warm(url: str, server, timeout: float = 120.0) -> dict:
    """Poll ``url``/health until it says ``warm: true`` and return that answer. ``server`` is
    the ``kiapi serve`` subprocess (stderr piped, text): if it exits first, or the time runs
    out, the test fails with the end of its stderr."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            health = httpx.get(f"{url}/health", timeout=5).json()
            if health.get("warm"):
                return health
        except httpx.HTTPError:
            pass
        if server.poll() is not None:
            break
        time.sleep(0.1)
    if server.poll() is None:
        server.kill()
    raise AssertionError(f"{url} not warm within {timeout} s: {server.stderr.read()[-3000:]}")


def hold_the_worker(runtime) -> threading.Event:
    """Run a job that blocks ``runtime``'s worker until the returned event is set."""
    from kiapi.runtime.worker import JobOutput

    started, release = threading.Event(), threading.Event()

    def blocker():
        started.set()
        assert release.wait(60)
        return JobOutput(result={})

    runtime.submit("test-hold", {}, blocker)
    assert started.wait(10)
    return release


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def assert_matches_schema(spec_name: str, schema_name: str, instance: Any) -> None:
    """Validate ``instance`` against a component schema of a served (3.1) spec."""
    doc = served_document(spec_name)
    validator = Draft202012Validator(
        {"$ref": f"#/components/schemas/{schema_name}", "components": doc["components"]}
    )
    errors = list(validator.iter_errors(instance))
    assert not errors, [e.message for e in errors]


def png_bytes(size: tuple[int, int] = (64, 48), color: tuple[int, int, int] = (200, 30, 30)):
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, format="PNG")
    return out.getvalue()


class ImageServer:
    """A loopback HTTP server for image-URL inputs. ``pages`` maps a path to PNG bytes, to
    ``("redirect", location)``, to ``("typed", content_type, body)`` or to
    ``("drip", body, seconds)`` (sent a byte at a time, sleeping between bytes); anything else is
    404. Use as a context manager; ``url(path)``."""

    def __init__(self, pages: dict[str, Any]) -> None:
        import time
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                page = pages.get(self.path)
                kind = page[0] if isinstance(page, tuple) else None
                if kind == "redirect":
                    self.send_response(302)
                    self.send_header("Location", page[1])
                    self.end_headers()
                elif page is None:
                    self.send_error(404)
                elif kind == "drip":
                    self.send_response(200)
                    self.send_header("Content-Type", "image/png")
                    self.end_headers()
                    try:
                        for byte in page[1]:
                            self.wfile.write(bytes([byte]))
                            self.wfile.flush()
                            time.sleep(page[2])
                    except (BrokenPipeError, ConnectionResetError):
                        pass  # the client gave up, as it should
                else:
                    content_type, body = page[1:] if kind == "typed" else ("image/png", page)
                    self.send_response(200)
                    self.send_header("Content-Type", content_type)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server.server_port}{path}"

    def __enter__(self) -> ImageServer:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def put_in_hf_cache(cache: Path, repo: str, model_folder: Path) -> Path:
    """Copy ``model_folder`` into the Hugging Face cache ``cache`` the way ``hf download`` lays
    a repo out (blobs, a snapshot of relative symlinks, ``refs/main``); returns the repo dir."""
    import os
    import shutil

    revision = "0123456789abcdef0123456789abcdef01234567"
    root = cache / f"models--{repo.replace('/', '--')}"
    snapshot = root / "snapshots" / revision
    snapshot.mkdir(parents=True)
    (root / "blobs").mkdir()
    for i, file in enumerate(sorted(model_folder.iterdir())):
        blob = root / "blobs" / f"blob{i}"
        shutil.copy(file, blob)
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(revision)
    return root


def minilm_weight_bytes(bf16: bool) -> int:
    """all-MiniLM-L6-v2's float32 parameters and what FastBert adds: every matrix as bfloat16
    tiles with its float32 bias, or in float32 the fused query/key/value of 6 layers."""
    params = 22_713_216
    if bf16:
        matrices = 6 * (1152 * 384 + 384 * 384 + 2 * 1536 * 384)
        return params * 4 + matrices * 2 + 6 * (1152 + 384 + 1536 + 384) * 4
    return params * 4 + 6 * (1152 * 384 + 1152) * 4
