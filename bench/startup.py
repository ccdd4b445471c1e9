"""How fast ``scripts/serve.sh`` serves when nothing changed, and what the warm server costs.

    .venv/bin/python bench/startup.py [--runs 3]

Each run starts ``scripts/serve.sh --port P`` (its set-up already done: the first, untimed
run does it if needed) with the default warm-up (both bundled models), then measures from
spawn: the first HTTP answer from ``/health`` (any status), ``warm: true``, and the server's
RSS once warm. Prints the median and the worst of the runs. Targets: issue 18 (serve.sh
answering in under 3 s) and issue 16 (warm within 5 s, RSS under 500 MiB).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import free_port, machine, stop_server  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 120


def one_run(files_root: str) -> tuple[float, float, float]:
    """(seconds to first answer, seconds to warm, RSS MiB when warm) of one serve.sh start."""
    port = free_port()
    env = {**os.environ, "KIAPI_FILES_ROOT": files_root, "KIAPI_LOG_LEVEL": "warning"}
    started = time.perf_counter()
    server = subprocess.Popen(
        ["bash", str(ROOT / "scripts/serve.sh"), "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    answered = None
    try:
        while time.perf_counter() - started < TIMEOUT_S:
            if server.poll() is not None:
                raise SystemExit(f"serve.sh exited with {server.returncode}")
            try:
                response = httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)
            except httpx.HTTPError:
                time.sleep(0.01)
                continue
            answered = answered or time.perf_counter() - started
            if response.status_code == 200 and response.json().get("warm"):
                warm = time.perf_counter() - started
                rss = psutil.Process(server.pid).memory_info().rss / 2**20  # serve.sh execs
                return answered, warm, rss
            time.sleep(0.01)
        raise SystemExit(f"not warm within {TIMEOUT_S} s")
    finally:
        stop_server(server)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as files_root:
        one_run(files_root)  # set-up, if serve.sh finds anything changed: not timed
        runs = [one_run(files_root) for _ in range(args.runs)]
    print(f"machine: {machine()}; {args.runs} runs of scripts/serve.sh, nothing changed\n")
    print("| measure | median | worst | target |")
    print("|---|---|---|---|")
    rows = [
        ("spawn -> first answer (s)", [r[0] for r in runs], "< 3 (issue 18)"),
        ("spawn -> warm, both models (s)", [r[1] for r in runs], "<= 5 (issue 16)"),
        ("RSS when warm (MiB)", [r[2] for r in runs], "<= 500 (issue 16)"),
    ]
    for name, values, target in rows:
        print(f"| {name} | {statistics.median(values):.2f} | {max(values):.2f} | {target} |")


if __name__ == "__main__":
    main()
