"""How long one parse of the costliest allowed JSON bodies keeps other threads waiting:
``json.loads`` (one C call per document) against kiapi's body parser (``jsonbody.parse``,
which slices bodies over 1 MiB or 10,000 values, ``kiapi/http/sliced_json.py``).

    .venv/bin/python bench/json_gil.py

A ticker thread sleeps 0.5 ms in a loop on the side; the longest gap between two of its ticks
is how long the parsing thread held the GIL at a stretch (what the event loop, and so
``/health``, would wait). Prints a table: the body, its size, each parser's total time and
longest stall (best of 3).
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine  # noqa: E402
from hostile import bad_bodies  # noqa: E402

from kiapi.http.jsonbody import ValueCounter, parse  # noqa: E402

MIB = 1024 * 1024


def stall(work: Callable[[], object]) -> tuple[float, float]:
    """(seconds the work took, longest gap between the side thread's ticks)."""
    longest, stop = [0.0], threading.Event()

    def tick() -> None:
        last = time.perf_counter()
        while not stop.is_set():
            time.sleep(0.0005)
            now = time.perf_counter()
            longest[0] = max(longest[0], now - last)
            last = now

    ticker = threading.Thread(target=tick)
    ticker.start()
    time.sleep(0.01)
    started = time.perf_counter()
    with suppress(Exception):  # the bodies are invalid: kiapi's parser may refuse them
        work()
    took = time.perf_counter() - started
    stop.set()
    ticker.join()
    return took, longest[0]


def best(work: Callable[[], object], runs: int = 3) -> tuple[float, float]:
    results = [stall(work) for _ in range(runs)]
    return min(r[0] for r in results), min(r[1] for r in results)


def main() -> None:
    print(f"JSON parsing and the GIL, {machine()}")
    print("| body | MiB | json.loads | its longest stall | kiapi parse | its longest stall |")
    print("|---|---|---|---|---|---|")
    for name, body in bad_bodies().items():
        counter = ValueCounter(limit=10**9)
        for start in range(0, len(body), 65536):
            counter.feed(body[start : start + 65536])
        plain = best(lambda body=body: json.loads(body))
        kiapi = best(lambda body=body, n=counter.values: parse(body, "utf-8", n))
        print(
            f"| {name} | {len(body) / MIB:.1f} | {plain[0] * 1000:.0f} ms | "
            f"{plain[1] * 1000:.0f} ms | {kiapi[0] * 1000:.0f} ms | {kiapi[1] * 1000:.0f} ms |"
        )


if __name__ == "__main__":
    main()
