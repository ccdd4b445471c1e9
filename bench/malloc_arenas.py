"""glibc malloc arenas: embedding throughput and resting RSS, side by side.

    .venv/bin/python bench/malloc_arenas.py [--rounds 2] [--warmup 300] [--requests 1500]

For each setting (``KIAPI_MALLOC_ARENAS=1``, the server's default, against ``0``: glibc's own
default of 8 per core) and each round, in alternation: start ``kiapi serve``, send
``--warmup`` embeddings of 1-400-word texts from 32 concurrent clients, read the resting RSS
(3 s idle: the server has handed memory back), send ``--requests`` more, read the resting RSS
again. Prints one row per run and the ratio of the medians. Loopback only; ~2.5 min per run
on 2 cores.

What it answers: glibc gives each thread that allocates its own arena, and ``malloc_trim``
cannot shrink the top of a thread arena, so the memory a burst leaves there stays resident.
One arena (the main heap, which ``malloc_trim`` does shrink) keeps the resting RSS flat; the
question is what it costs in throughput.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
from _common import free_port, machine, start_server, stop_server

WORDS = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "was",
    "for",
    "on",
    "that",
    "with",
    "as",
    "by",
    "at",
    "from",
    "river",
    "music",
    "house",
    "school",
    "water",
    "market",
    "system",
    "light",
    "history",
    "science",
    "language",
    "morning",
    "garden",
    "window",
    "mountain",
    "journey",
]
SETTINGS = {"1 arena (default)": "1", "glibc default (0)": "0"}


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


async def embed(url: str, count: int, rng: random.Random, concurrency: int = 32) -> float:
    """Embeddings of 1-400-word texts from ``concurrency`` clients; returns requests/s."""
    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=120) as client:

        async def one() -> None:
            text = " ".join(rng.choices(WORDS, k=rng.randint(1, 400)))
            async with gate:
                r = await client.post(f"{url}/v1/embedding", json={"text": text})
                r.raise_for_status()

        started = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(count)))
        return count / (time.perf_counter() - started)


def run(arenas: str, warmup: int, requests: int, seed: int) -> tuple[float, float, float]:
    port = free_port()
    with tempfile.TemporaryDirectory() as root:
        server, _ = start_server(port, root, {"KIAPI_MALLOC_ARENAS": arenas})
        try:
            url, rng = f"http://127.0.0.1:{port}", random.Random(seed)
            asyncio.run(embed(url, warmup, rng))
            time.sleep(3)
            warm = rss_mib(server.pid)
            rate = asyncio.run(embed(url, requests, rng))
            time.sleep(3)
            return rate, warm, rss_mib(server.pid)
        finally:
            stop_server(server)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--requests", type=int, default=1500)
    args = parser.parse_args()
    print(f"machine: {machine()}\n")
    print("| setting | round | req/s | RSS after warm-up MiB | RSS after the run MiB | growth |")
    print("|---|---|---|---|---|---|")
    rates: dict[str, list[float]] = {name: [] for name in SETTINGS}
    for round_ in range(1, args.rounds + 1):
        for name, arenas in SETTINGS.items():
            rate, warm, after = run(arenas, args.warmup, args.requests, seed=round_)
            rates[name].append(rate)
            print(
                f"| {name} | {round_} | {rate:.1f} | {warm:.0f} | {after:.0f} | "
                f"{(after - warm) / warm * 100:+.1f}% |",
                flush=True,
            )
    one, default = (statistics.median(rates[name]) for name in SETTINGS)
    print(f"\nthroughput, 1 arena / glibc default (medians): {one / default:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
