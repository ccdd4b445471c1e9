"""Embedding throughput and latency, direct and through the server, side by side in one run.

    .venv/bin/python bench/throughput.py [--seconds 3] [--clients 1,8,32,128] [--tokens 12,128,256]

Prints markdown tables for all-MiniLM-L6-v2 (the bundled model):

1. direct, in-process forward throughput (the server's own loader and ``embed``) at batch
   1, 8 and 32, and at batch 32 through mlx-embeddings' own BERT forward pass instead of
   kiapi's ``FastBert``; run in a subprocess so that its threads are gone before the server
   runs;
2. ``kiapi serve`` (a subprocess on a free loopback port) with batching on (the default) and
   off (``KIAPI_BATCH_MAX_ITEMS=1``): for each text length and each number of concurrent
   clients, req/s, p50 and p99 latency, and errors. Each client is one keep-alive connection
   sending one text per request, each text different;
3. per server: seconds from process start to ``warm: true``, RSS after warm-up and after the
   runs;
4. the peer server infinity-emb on the same model folder with its torch and its optimum
   (ONNX Runtime) engines, each from its own venv (``peers.py`` creates them on first use;
   ``--no-peers`` skips them).

The load generator is a minimal asyncio HTTP/1.1 client (no per-request parsing beyond the
status line and Content-Length) so that it costs the 2-core machine as little as possible; it
still shares the CPUs with the server, as any local client would. Texts are words drawn from
the model's vocabulary so each has exactly the stated token count (with [CLS] and [SEP]).

Bounded: a measurement lasts ``--seconds``, or until every client has had an answer inside
its window, at most 60 s, plus the time to drain what is in flight (about 6 minutes in all at
the defaults, most of it 256-token texts at 128 clients). Loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
from _common import (
    free_port,
    machine,
    percentile,
    start_peer,
    start_server,
    stop_server,
    target_row,
)

MODEL = "all-minilm-l6-v2"
TARGETS = {  # issue 4, all-MiniLM-L6-v2 on a 2-core machine
    "http_32_short_rps": 400.0,
    "http_vs_direct": 0.85,
    "p50_1_client_ms": 10.0,
    "http_32_128_rps": 35.0,
    "rss_mib": 400.0,
    "start_to_warm_s": 5.0,
}


# --------------------------------------------------------------------------- texts


def model_folder() -> Path:
    from kiapi.runtime.catalog import default_registry
    from kiapi.runtime.weights import locate

    spec = default_registry().resolve("embedding", MODEL)
    return locate(spec.name, spec.source)


def make_texts(tokens: int, count: int, seed: int = 0) -> list[str]:
    """``count`` different texts of exactly ``tokens`` tokens (with [CLS]/[SEP]) for MiniLM."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(model_folder() / "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.no_truncation()
    words = [
        w
        for w, _ in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
        if w.isalpha() and w.islower() and len(w) > 3 and not w.startswith("#")
    ][:5000]
    rng = random.Random(seed)
    texts = []
    while len(texts) < count:
        text = " ".join(rng.choice(words) for _ in range(tokens - 2))
        if len(tokenizer.encode(text).ids) == tokens:
            texts.append(text)
    return texts


# --------------------------------------------------------------------------- direct


def direct(tokens_list: list[int], seconds: float) -> dict[str, dict[str, float]]:
    """Run in this process: sentences/s of the engine at batch 1, 8, 32 per text length."""
    from kiapi.config import Settings
    from kiapi.runtime import blas, qmatmul

    settings = Settings(_env_file=None)
    blas.activate(settings.blas)  # KIAPI_BLAS, as the server reads it
    qmatmul.configure(settings.matmul_precision)  # KIAPI_MATMUL_PRECISION, likewise
    from kiapi.runtime.catalog import default_registry
    from kiapi.runtime.embedding import EmbeddingItem
    from kiapi.runtime.mlx_engine import load_embedding_model

    model = load_embedding_model(default_registry().resolve("embedding", MODEL)).model
    out: dict[str, dict[str, float]] = {}
    for tokens in tokens_list:
        texts = make_texts(tokens, 64)
        out[str(tokens)] = {}
        for batch in (1, 8, 32):
            items = [EmbeddingItem(text=t) for t in texts[:batch]]
            model.embed(items)
            count, started = 0, time.perf_counter()
            while time.perf_counter() - started < seconds:
                model.embed(items)
                count += batch
            out[str(tokens)][str(batch)] = count / (time.perf_counter() - started)
        # the same batch of 32 through mlx-embeddings' own BERT forward pass, for comparison
        fast, model.fast = model.fast, None
        items = [EmbeddingItem(text=t) for t in texts[:32]]
        model.embed(items)
        count, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            model.embed(items)
            count += 32
        out[str(tokens)]["plain32"] = count / (time.perf_counter() - started)
        model.fast = fast
    return out


def direct_in_subprocess(tokens_list: list[int], seconds: float) -> dict[str, dict[str, float]]:
    done = subprocess.run(
        [sys.executable, __file__, "--direct-only", "--tokens", ",".join(map(str, tokens_list))]
        + ["--seconds", str(seconds)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- load


MAX_WINDOW_S = 60.0


@dataclass
class LoadResult:
    clients: int
    done: int
    errors: int
    rps: float  # answers per second (closed loop: sum over clients of 1 / mean latency)
    latencies: list[float]
    batch_sizes: list[int]

    @property
    def mean_batch(self) -> float:
        return sum(self.batch_sizes) / len(self.batch_sizes) if self.batch_sizes else float("nan")

    def ms(self, q: float) -> float:
        return percentile(self.latencies, q) * 1000 if self.latencies else float("nan")


def request_bytes(path: str, body: dict) -> bytes:
    data = json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\n\r\n"
    )
    return head.encode() + data


BATCH_SIZE = re.compile(rb'"batch_size":\s*(\d+)')


async def read_response(reader: asyncio.StreamReader) -> tuple[int, int]:
    """The status and the ``timings.batch_size`` of one response (0 if absent)."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    body = await reader.readexactly(length)
    found = BATCH_SIZE.search(body, max(0, length - 400))
    return status, int(found.group(1)) if found else 0


async def load(port: int, requests: list[bytes], clients: int, seconds: float) -> LoadResult:
    """``clients`` connections sending requests back to back (a closed loop).

    The window opens once every client has had one answer; it closes when ``seconds`` have
    passed and every client has had at least one answer to a request sent inside it (at most
    ``MAX_WINDOW_S``). Throughput is each client's answers divided by its busy time, summed
    over clients (Little's law for a closed loop): with 32 clients answered in bursts of 32,
    counting answers inside a fixed window would be off by up to a whole burst.
    """
    ready = asyncio.Event()
    stop = asyncio.Event()
    warmed = 0
    window: dict[str, float] = {}
    per_client: list[list[float]] = [[] for _ in range(clients)]
    batch_sizes: list[int] = []
    errors = 0

    def maybe_stop() -> None:
        now = time.perf_counter()
        enough = now >= window["start"] + seconds and all(per_client)
        if enough or now >= window["start"] + MAX_WINDOW_S:
            stop.set()

    async def client(index: int) -> None:
        nonlocal warmed, errors
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        first, counter = True, index * 7919
        try:
            while not stop.is_set():
                counter += 1
                sent = time.perf_counter()
                writer.write(requests[counter % len(requests)])
                status, batch_size = await read_response(reader)
                answered = time.perf_counter()
                if first:
                    first = False
                    warmed += 1
                    if warmed == clients:
                        window["start"] = answered
                        ready.set()
                    continue
                if ready.is_set() and sent >= window["start"] and not stop.is_set():
                    per_client[index].append(answered - sent)
                    batch_sizes.append(batch_size)
                    errors += status != 200
                    maybe_stop()
        finally:
            writer.close()

    async def deadline() -> None:
        await ready.wait()
        while not stop.is_set():
            maybe_stop()
            await asyncio.sleep(0.05)

    await asyncio.gather(deadline(), *(client(i) for i in range(clients)))
    latencies = [lat for lats in per_client for lat in lats]
    rate = sum(len(lats) / sum(lats) for lats in per_client if lats)
    return LoadResult(clients, len(latencies) - errors, errors, rate, latencies, batch_sizes)


# --------------------------------------------------------------------------- servers


@dataclass
class ServerRun:
    name: str
    start_to_warm_s: float
    rss_warm_mib: float
    rss_after_mib: float
    results: dict[tuple[int, int], LoadResult]


def run_kiapi(name: str, env: dict[str, str], texts, clients, seconds) -> ServerRun:
    port = free_port()
    with tempfile.TemporaryDirectory() as files_root:
        server, warm_s = start_server(port, files_root, {"KIAPI_WARMUP": MODEL, **env})
        try:
            process = psutil.Process(server.pid)
            rss_warm = process.memory_info().rss / 2**20
            results = {}
            for tokens, bodies in texts.items():
                requests = [request_bytes("/v1/embedding", {"text": t}) for t in bodies]
                for n in clients:
                    results[tokens, n] = asyncio.run(load(port, requests, n, seconds))
            rss_after = process.memory_info().rss / 2**20
        finally:
            stop_server(server)
    return ServerRun(name, warm_s, rss_warm, rss_after, results)


# optimum: ONNX Runtime, infinity's fastest on CPU in float32; "torch:bfloat16" runs its torch
# engine in bfloat16 (oneDNN uses AMX where the CPU has it), the precision kiapi's products
# run in there by default (KIAPI_MATMUL_PRECISION=auto)
INFINITY_ENGINES = ("torch", "optimum", "torch:bfloat16")


def run_infinity(engine: str, texts, clients, seconds) -> ServerRun:
    """The peer server on the same folder, from its own venv (``peers.py``), one engine
    (``engine:dtype`` for another dtype than its default)."""
    from peers import PEER_ENV, onnx_copy, python_for

    engine, _, dtype = engine.partition(":")
    python = python_for(f"infinity-{engine}")
    model = ["--model-id", str(model_folder())]
    if engine == "optimum":
        # its ONNX copy, served under the folder's name; without --pooling-method mean this
        # engine pools the CLS token (all-MiniLM-L6-v2 is a mean-pooling model)
        model = ["--model-id", str(onnx_copy(model_folder(), MODEL))]
        model += ["--served-model-name", str(model_folder()), "--pooling-method", "mean"]
    port = free_port()
    server, warm_s = start_peer(
        [str(python), "-m", "infinity_emb.cli", "v2", *model]
        + ["--port", str(port), "--engine", engine, "--batch-size", "32"]
        + (["--dtype", dtype] if dtype else []),
        PEER_ENV,
        f"http://127.0.0.1:{port}/health",
        f"infinity ({engine})",
    )
    try:
        process = psutil.Process(server.pid)
        rss_warm = process.memory_info().rss / 2**20
        results = {}
        for tokens, bodies in texts.items():
            requests = [
                request_bytes("/embeddings", {"model": str(model_folder()), "input": [t]})
                for t in bodies
            ]
            for n in clients:
                results[tokens, n] = asyncio.run(load(port, requests, n, seconds))
        rss_after = process.memory_info().rss / 2**20
    finally:
        stop_server(server)
    name = f"infinity-emb 0.0.78, {engine} engine" + (f", {dtype}" if dtype else "")
    return ServerRun(name, warm_s, rss_warm, rss_after, results)


# --------------------------------------------------------------------------- report


def server_tables(runs: list[ServerRun]) -> list[str]:
    """Each server's load results, then its start-to-warm time and RSS, as markdown lines."""
    lines = [
        "| server | tokens | clients | req/s | p50 ms | p99 ms | mean batch | errors |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        for (tokens, n), r in run.results.items():
            lines.append(
                f"| {run.name} | {tokens} | {n} | {r.rps:.1f} | {r.ms(50):.1f} | {r.ms(99):.1f} "
                f"| {r.mean_batch:.1f} | {r.errors} |"
            )
    lines += [
        "",
        "| server | start to warm s | RSS warm MiB | RSS after runs MiB |",
        "|---|---|---|---|",
    ]
    for run in runs:
        lines.append(
            f"| {run.name} | {run.start_to_warm_s:.2f} | {run.rss_warm_mib:.0f} "
            f"| {run.rss_after_mib:.0f} |"
        )
    return lines


def report(direct_rates, runs: list[ServerRun], tokens_list, clients, args) -> None:
    from kiapi.config import Settings
    from kiapi.runtime import blas

    print(f"machine: {machine()}")
    print(f"BLAS: {blas.activate(Settings(_env_file=None).blas).describe()}")
    print(f"model: {MODEL}; {args.seconds:g} s per measurement\n")
    print("Direct, in-process (sentences/s):\n")
    print("| tokens | batch 1 | batch 8 | batch 32 | batch 32, plain mlx-embeddings forward |")
    print("|---|---|---|---|---|")
    for tokens in tokens_list:
        r = direct_rates[str(tokens)]
        print(f"| {tokens} | {r['1']:.1f} | {r['8']:.1f} | {r['32']:.1f} | {r['plain32']:.1f} |")
    print("\nThrough HTTP (one text per request):\n")
    print("\n".join(server_tables(runs)))
    on = runs[0]
    checks = []
    if (12, 32) in on.results and "12" in direct_rates:
        http32 = on.results[12, 32].rps
        checks.append(("32 clients, 12 tokens, req/s", http32, ">=", TARGETS["http_32_short_rps"]))
        ratio = http32 / direct_rates["12"]["32"]
        checks.append(("  as a share of direct batch 32", ratio, ">=", TARGETS["http_vs_direct"]))
    if (12, 1) in on.results:
        checks.append(
            ("1 client p50 ms", on.results[12, 1].ms(50), "<=", TARGETS["p50_1_client_ms"])
        )
    if (128, 32) in on.results:
        checks.append(("32 clients, 128 tokens, req/s", on.results[128, 32].rps, ">=", 35.0))
    rss = max(on.rss_warm_mib, on.rss_after_mib)
    checks.append(("server RSS MiB (max of warm, after)", rss, "<=", TARGETS["rss_mib"]))
    checks.append(("start to warm s", on.start_to_warm_s, "<=", TARGETS["start_to_warm_s"]))
    print("\nTargets (batching on):\n")
    print("| target | measured | goal | |")
    print("|---|---|---|---|")
    for check in checks:
        print(target_row(*check))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--clients", default="1,8,32,128")
    parser.add_argument("--tokens", default="12,128,256")
    parser.add_argument("--no-off", action="store_true", help="skip the batching-off server")
    parser.add_argument("--no-peers", action="store_true", help="skip the infinity servers")
    parser.add_argument("--direct-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    tokens_list = [int(t) for t in args.tokens.split(",")]
    clients = [int(c) for c in args.clients.split(",")]
    if args.direct_only:
        print(json.dumps(direct(tokens_list, min(args.seconds, 2.0))))
        return
    direct_rates = direct_in_subprocess(tokens_list, min(args.seconds, 2.0))
    texts = {t: make_texts(t, 512, seed=t) for t in tokens_list}
    runs = [run_kiapi("kiapi, batching on", {}, texts, clients, args.seconds)]
    if not args.no_off:
        off = run_kiapi(
            "kiapi, batching off", {"KIAPI_BATCH_MAX_ITEMS": "1"}, texts, clients, args.seconds
        )
        runs.append(off)
    if not args.no_peers:
        runs += [run_infinity(e, texts, clients, args.seconds) for e in INFINITY_ENGINES]
    report(direct_rates, runs, tokens_list, clients, args)


if __name__ == "__main__":
    main()
