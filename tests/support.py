"""Test helpers: a live uvicorn server in a thread, a fake clock, spec response checks."""

from __future__ import annotations

import threading
import time
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
