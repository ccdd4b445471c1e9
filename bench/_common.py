"""Helpers the benchmark scripts share: the machine's description, free ports, percentiles and
a ``kiapi serve`` subprocess that is waited on until ``warm: true``."""

from __future__ import annotations

import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> str:
    return f"{cpu_name()}, {os.cpu_count()} CPUs, {platform.system()}"


def start_server(
    port: int, files_root: str, extra_env: dict[str, str] | None = None
) -> tuple[subprocess.Popen, float]:
    """Start ``kiapi serve`` on ``port``; return it and the seconds from spawn to ``warm``."""
    env = {
        **os.environ,
        "KIAPI_FILES_ROOT": files_root,
        "KIAPI_LOG_LEVEL": "warning",  # no access log line per request
        **(extra_env or {}),
    }
    started = time.perf_counter()
    server = subprocess.Popen(
        [sys.executable, "-m", "kiapi", "serve", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).json()["warm"]:
                return server, time.perf_counter() - started
        except httpx.HTTPError:
            pass
        if server.poll() is not None:
            raise SystemExit(f"server exited: {server.stderr.read().decode()[-2000:]}")
        time.sleep(0.02)
    server.kill()
    raise SystemExit("server did not become warm within 120 s")


def stop_server(server: subprocess.Popen) -> None:
    server.terminate()
    try:
        server.wait(15)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait(5)
